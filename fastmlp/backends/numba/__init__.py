"""Numba backend: the kernels of :mod:`fastmlp.backends.reference`, compiled.

Same names, signatures and semantics as the reference (the spec); the
arguments arrive validated by :class:`fastmlp.backends.Backend`.  Importing
this module imports Numba (an ``ImportError`` says why when it cannot) but
compiles nothing: each kernel is compiled for a dtype on its first call, or
loaded from Numba's on-disk cache (``fastmlp/_numba/__pycache__`` or
``$NUMBA_CACHE_DIR``) when an earlier process compiled it.  Flags live in
:mod:`fastmlp.config`.

``train_epoch`` runs a whole epoch in one compiled call.  The weights are
packed into one flat vector for the call (one signature serves every depth)
and copied back into the caller's arrays afterwards; that copy is a few
hundred kB against an epoch of gemms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

try:
    import numba  # noqa: F401 - the import is the availability check
except Exception as exc:  # any failure (missing, broken llvmlite, NumPy mismatch) makes the backend unavailable
    raise ImportError(f"the numba backend needs the 'numba' package, which failed to import: {exc}") from exc

from fastmlp import _threads, config
from fastmlp.backends import reference as _ref
from fastmlp.backends.contract import ACT_CODES, LOSS_CODES, EpochPlan, OptimizerState

NAME = "numba"

__all__ = [
    "NAME",
    "dropout_mask",
    "forward",
    "forward_network",
    "hidden_delta",
    "inplace_update",
    "output_delta",
    "train_epoch",
]

_kernels = None
_load_lock = threading.Lock()
#: measured thread choice of train_epoch (see fastmlp._threads)
_choice = _threads.ThreadChoice()


def _k():
    """The kernel module, imported on first use (its import defines kernels but compiles nothing)."""
    global _kernels
    if _kernels is None:
        with _load_lock:
            if _kernels is None:
                from fastmlp.backends.numba import kernels

                _kernels = kernels
    return _kernels


def _aligned(a: np.ndarray) -> np.ndarray:
    # the compiled signatures expect aligned arrays; an unaligned view (rare: a packed record or memmap) is copied
    return a if a.flags.aligned else a.copy()


def _flat(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``W_0, b_0, W_1, b_1, ...`` into one vector; return it with the layer sizes."""
    sizes = np.array([weights[0].shape[1]] + [W.shape[0] for W in weights], dtype=np.int64)
    parts = []
    for W, b in zip(weights, biases, strict=True):
        parts.append(W.ravel())
        parts.append(b)
    return np.concatenate(parts), sizes


def _unflat(theta: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
    off = 0
    for W, b in zip(weights, biases, strict=True):
        W.ravel()[...] = theta[off : off + W.size]  # ravel of a C-contiguous array is a view
        off += W.size
        b[...] = theta[off : off + b.size]
        off += b.size


def forward(A: np.ndarray, W: np.ndarray, b: np.ndarray, act: int, out: np.ndarray) -> None:
    """``out = act(A @ W.T + b)``.

    Parameters
    ----------
    A : ndarray (n_samples, n_in)
    W : ndarray (n_out, n_in)
    b : ndarray (n_out,)
    act : int
        Activation code (:data:`fastmlp.backends.contract.ACT_CODES`).
    out : ndarray (n_samples, n_out)
        Written in place.
    """
    _k().forward[W.dtype](_aligned(A), _aligned(W), _aligned(b), act, out)


def output_delta(A: np.ndarray, y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
    """Delta of the loss w.r.t. the output pre-activation, from integer labels.

    Parameters
    ----------
    A : ndarray (n_samples, n_classes)
        Output activations.
    y : ndarray of int64 (n_samples,)
    output, loss : int
        Output activation and loss codes.
    out : ndarray (n_samples, n_classes)
        The delta, written in place.

    Returns
    -------
    loss_sum : float
        Data loss summed over the samples (float64).
    n_correct : int
        Rows whose first arg-max equals the label.
    """
    if y.ndim == 2 or not _k_supports(output, loss, A.shape[1]):
        return _ref.output_delta(A, y, output, loss, out)
    ls, nc = _k().output_delta[A.dtype](_aligned(A), _aligned(y), output, loss, out)
    return float(ls), int(nc)


def hidden_delta(
    D_next: np.ndarray, W_next: np.ndarray, A: np.ndarray, act: int, mask: np.ndarray | None, out: np.ndarray
) -> None:
    """``out = (D_next @ W_next) * mask * act'(A)``.

    Parameters
    ----------
    D_next : ndarray (n_samples, n_next)
    W_next : ndarray (n_next, n_units)
    A : ndarray (n_samples, n_units)
        The layer's activation output (before dropout).
    act : int
    mask : ndarray (n_samples, n_units) or None
    out : ndarray (n_samples, n_units)
    """
    use = mask is not None
    m = _aligned(mask) if use else out  # any array of the right type; unused when use is False
    _k().hidden_delta[A.dtype](_aligned(D_next), _aligned(W_next), _aligned(A), act, m, use, out)


def inplace_update(W: np.ndarray, b: np.ndarray, D: np.ndarray, A: np.ndarray, lr: float, l2: float, l1: float) -> None:
    """SGD step in place on ``W (n_out, n_in)`` and ``b (n_out,)`` from ``D (n, n_out)`` and ``A (n, n_in)``.

    ``W <- max(0, 1 - lr*l2) W - lr*l1*sign(W) - lr D.T @ A``; ``b <- b - lr sum(D, 0)``.
    """
    _k().inplace_update[W.dtype](W, b, _aligned(D), _aligned(A), float(lr), float(l2), float(l1))


def dropout_mask(seed: int, step: int, layer: int, keep_threshold: int, scale: float, out: np.ndarray) -> None:
    """Fill ``out (n_rows, n_units)`` with ``scale`` where the counter-based hash keeps a unit, else 0.

    ``seed`` is in ``[0, 2**64)``; a unit is kept iff its 24-bit draw is below ``keep_threshold``.
    """
    _k().dropout_mask[out.dtype](np.uint64(seed), int(step), int(layer), int(keep_threshold), float(scale), out)


def forward_network(
    X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int, output_act: int, out: np.ndarray
) -> None:
    """Output activations ``out (n_samples, n_classes)`` of the whole network for ``X (n_samples, n_in)``."""
    if output_act == ACT_CODES["exp"]:
        _ref.forward_network(X, weights, biases, hidden_act, output_act, out)
        return
    theta, sizes = _flat(weights, biases)
    _k().forward_network[X.dtype](_aligned(X), theta, sizes, hidden_act, output_act, out)


def _k_supports(output: int, loss: int, k: int) -> bool:
    """Whether the compiled output delta covers this pair (the labels kind, the lecture's losses)."""
    return loss in (LOSS_CODES["mse"], LOSS_CODES["ce"]) and output != ACT_CODES["exp"] and k >= 2


def train_epoch(
    X: np.ndarray,
    Y: np.ndarray,
    order: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    state: OptimizerState,
    lrs: np.ndarray,
    plan: EpochPlan,
    step0: int,
    sample_weight: np.ndarray | None,
) -> tuple[float, float, int]:
    """One epoch in one compiled call (semantics of :func:`fastmlp.backends.reference.train_epoch`).

    Returns ``(loss_sum, penalty_sum, n_correct)``.
    """
    if (plan.target != "labels" or plan.optimizer != "sgd" or plan.alpha or sample_weight is not None
            or not _k_supports(plan.output_code, plan.loss_code, plan.sizes[-1])):  # fmt: skip
        return _ref.train_epoch(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight)
    theta, sizes = _flat(weights, biases)
    bs = plan.batch_size
    n_chunks = _threads.n_blocks(plan.sizes, min(bs, order.shape[0])) if config.PARALLEL else 1
    # the chunks depend on the shape only; how many threads run them does not change the result:
    # measure one and several now and then and keep the faster
    key = (plan.sizes, bs, X.dtype.char)
    n_threads = _choice.choose(key, min(n_chunks, _threads.thread_budget(), config.pool_size()))
    entry = _k().train_epoch
    # a first call's compilation is not a speed
    timed = entry.is_compiled(X.dtype, n_chunks > 1)
    kern = entry[X.dtype, n_chunks > 1]
    args = (
        _aligned(X), _aligned(Y), _aligned(order), theta, sizes, _aligned(lrs),
        plan.hidden_code, plan.output_code, plan.loss_code, int(bs), float(plan.l2), float(plan.l1),
        plan.thresholds_array, plan.scales_array, np.uint64(plan.seed), int(step0), n_chunks,
    )  # fmt: skip
    if n_chunks > 1:
        import numba as nb

        old = nb.get_num_threads()
        nb.set_num_threads(n_threads)
        try:
            # two levels of threads oversubscribe the cores: BLAS runs single-threaded meanwhile
            with _threads.blas_pinned():
                t0 = time.perf_counter()
                loss_sum, n_correct = kern(*args)
                if timed:
                    _choice.record(key, n_threads, time.perf_counter() - t0, order.shape[0])
        finally:
            nb.set_num_threads(old)
    else:
        loss_sum, n_correct = kern(*args)
    _unflat(theta, weights, biases)
    return float(loss_sum), 0.0, int(n_correct)


def describe() -> str:
    """One line on the Numba settings, for ``fastmlp info``."""
    import numba

    return (f"numba {numba.__version__}, parallel {'on' if config.PARALLEL else 'off'}, "
            f"{config.pool_size()} threads, fastmath {config.FASTMATH!r}, cache {'on' if config.CACHE else 'off'}")  # fmt: skip
