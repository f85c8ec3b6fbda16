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

from fastmlp import config
from fastmlp.backends._threads import ThreadChoice

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
_controller = None
#: a minibatch is split over threads only when every thread gets at least this many rows
MIN_ROWS_PER_THREAD = 16
#: measured thread choice of train_epoch (see fastmlp.backends._threads)
_choice = ThreadChoice()


def _k():
    """The kernel module, imported on first use (its import defines kernels but compiles nothing)."""
    global _kernels
    if _kernels is None:
        with _load_lock:
            if _kernels is None:
                from fastmlp._numba import kernels

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
        Activation code (:data:`fastmlp.backends._contract.ACT_CODES`).
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
    theta, sizes = _flat(weights, biases)
    _k().forward_network[X.dtype](_aligned(X), theta, sizes, hidden_act, output_act, out)


def _blas_controller():
    global _controller
    if _controller is None:
        # Numba's np.dot calls SciPy's BLAS (scipy.linalg.cython_blas), a different OpenBLAS from NumPy's:
        # load it first so that the controller sees it
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


def n_chunks_for(batch_size: int, sizes: Sequence[int]) -> int:
    """Threads to split each minibatch over: ``config.num_threads()`` when compiled parallel and worth it.

    Each thread must get at least :data:`MIN_ROWS_PER_THREAD` rows; otherwise
    the epoch runs on one thread and BLAS keeps its own threads.
    """
    if not config.PARALLEL:
        return 1
    t = config.num_threads()
    while t > 1 and batch_size < t * MIN_ROWS_PER_THREAD:
        t -= 1
    return t


def train_epoch(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    lrs: np.ndarray,
    hidden_act: int,
    output_act: int,
    loss: int,
    batch_size: int,
    l2: float,
    l1: float,
    thresholds: np.ndarray,
    scales: np.ndarray,
    seed: int,
    step0: int,
) -> tuple[float, int]:
    """One epoch of minibatch SGD in one compiled call (see :func:`fastmlp.backends.reference.train_epoch`).

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    y : ndarray of int64 (n_samples,)
    order : ndarray of int64 (n_used,)
    weights, biases : lists of ndarray
        ``W (n_out, n_in)``, ``b (n_out,)`` per layer, updated in place.
    lrs : ndarray of float64 (n_steps,)
    hidden_act, output_act, loss : int
    batch_size : int
    l2, l1 : float
    thresholds : ndarray of int64 (n_layers,)
    scales : ndarray of float64 (n_layers,)
    seed, step0 : int

    Returns
    -------
    loss_sum : float
    n_correct : int
    """
    theta, sizes = _flat(weights, biases)
    n_chunks = n_chunks_for(min(batch_size, order.shape[0]), sizes.tolist())
    # the chunks depend on the shape and config only; how many threads run them does not change the
    # result: unless FASTMLP_NUM_THREADS says, measure one and n_chunks now and then and keep the faster
    key = (tuple(sizes.tolist()), batch_size, X.dtype.char)
    n_threads = n_chunks if config.NUM_THREADS is not None else _choice.choose(key, n_chunks)
    # the serial variant for one chunk (a parallel region per step costs a barrier); the parallel one
    # otherwise, also when it runs on one thread: the two variants compile to different float32 roundings
    entry = _k().train_epoch
    # a first call's compilation is not a speed
    timed = config.NUM_THREADS is None and entry.is_compiled(X.dtype, n_chunks > 1)
    kern = entry[X.dtype, n_chunks > 1]
    args = (
        _aligned(X), _aligned(y), _aligned(order), theta, sizes, _aligned(lrs),
        int(hidden_act), int(output_act), int(loss), int(batch_size), float(l2), float(l1),
        _aligned(thresholds), _aligned(scales), np.uint64(seed), int(step0), n_chunks,
    )  # fmt: skip
    if n_chunks > 1:
        import numba as nb

        nb.set_num_threads(n_threads)
        # two levels of threads oversubscribe the cores (DESIGN §4): BLAS runs single-threaded meanwhile
        with _blas_controller().limit(limits=1, user_api="blas"):
            t0 = time.perf_counter()
            loss_sum, n_correct = kern(*args)
            if timed:
                _choice.record(key, n_threads, time.perf_counter() - t0, order.shape[0])
    else:
        loss_sum, n_correct = kern(*args)
    _unflat(theta, weights, biases)
    return float(loss_sum), int(n_correct)


def describe() -> str:
    """One line on the Numba settings, for ``fastmlp info``."""
    import numba

    return (f"numba {numba.__version__}, parallel {'on' if config.PARALLEL else 'off'}, "
            f"{config.num_threads()} threads, fastmath {config.FASTMATH!r}, cache {'on' if config.CACHE else 'off'}")  # fmt: skip
