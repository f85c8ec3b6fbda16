"""Numba backend: the kernels of :mod:`fastmlp.backends.reference`, compiled.

Same names, signatures and semantics as the reference (the spec, see
:mod:`fastmlp.backends.contract`); the arguments arrive validated by
:class:`fastmlp.backends.Backend`.  Every kernel, the whole training epoch
included, runs compiled for every target kind, loss, optimizer and option of
the contract.

Importing this module imports Numba (an ``ImportError`` says why when it
cannot) but compiles nothing: each kernel is compiled for a dtype on its first
call, or loaded from Numba's on-disk cache (``__pycache__`` beside
:mod:`fastmlp.backends.numba.kernels`, or ``$NUMBA_CACHE_DIR``) when an
earlier process compiled it.  Flags live in :mod:`fastmlp.config`.

``train_epoch`` runs a whole epoch in one compiled call.  The weights and each
optimizer state slot are packed into flat vectors for the call (one signature
serves every depth) and copied back into the caller's arrays afterwards; that
copy is a few hundred kB against an epoch of matrix products.  Threads follow
:mod:`fastmlp._threads`: the minibatch is cut into ``n_blocks(sizes, batch)``
row blocks whatever the thread count, so one thread and several compute the
same bits, and the thread count is the measured faster one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np

try:
    import numba
except Exception as exc:  # any failure (missing, broken llvmlite, NumPy mismatch) makes the backend unavailable
    raise ImportError(f"the numba backend needs the 'numba' package, which failed to import: {exc}") from exc

if getattr(numba.config, "DISABLE_JIT", False):
    # the kernels are written for the compiler (intrinsics, typed overloads): as plain Python they cannot run
    raise ImportError("the numba backend cannot run with NUMBA_DISABLE_JIT=1 (its kernels need the compiler); "
                      "unset NUMBA_DISABLE_JIT, or use backend='cython' or 'numpy'")  # fmt: skip

from fastmlp import _threads, config
from fastmlp.backends._aligned import ALIGN, empty_aligned
from fastmlp.backends.contract import NO_DROP, EpochPlan, OptimizerState

NAME = "numba"

__all__ = [
    "NAME",
    "dropout_mask",
    "fit_context",
    "forward",
    "forward_network",
    "hidden_delta",
    "inplace_update",
    "output_delta",
    "train_epoch",
]

_kernels = None
_load_lock = threading.Lock()
#: held around parallel launches where the threading layer cannot take concurrent ones (workqueue)
_launch_lock = threading.Lock()
#: measured thread choice of train_epoch (see fastmlp._threads)
_choice = _threads.ThreadChoice()
#: stand-ins for the arguments a call does not read (labels with dense targets, weights when unweighted)
_NO_LABELS = np.empty(0, np.int64)
_NO_WEIGHTS = np.empty(0, np.float64)


def _k():
    """The kernel module, imported on first use (its import defines kernels but compiles nothing)."""
    global _kernels
    if _kernels is None:
        with _load_lock:
            if _kernels is None:
                from fastmlp.backends.numba import kernels

                if config.CACHE:  # a cache Numba cannot write would fail every compilation: do without it
                    problem = config.cache_problem(kernels.forward.py_func)
                    if problem:
                        config.disable_cache(problem)
                _kernels = kernels
    return _kernels


def _aligned(a: np.ndarray) -> np.ndarray:
    # the compiled signatures expect aligned arrays; an unaligned view (rare: a packed record or memmap) is copied
    return a if a.flags.aligned else a.copy()


#: buffers of the compiled epoch start on cache lines, and so does every matrix in them: a row of 784 float32 is
#: then 49 whole lines, and the tiles' vector loads never split a line (see fastmlp.backends._aligned)
_ALIGN = ALIGN


def _pad(n: int, dtype: np.dtype) -> int:
    """``n`` elements rounded up to whole ``_ALIGN``-byte lines."""
    per = max(1, _ALIGN // np.dtype(dtype).itemsize)
    return -(-n // per) * per


def _offsets(lengths: Sequence[int], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Aligned start of each of the consecutive matrices of ``lengths`` elements, and the elements in all."""
    offs = np.zeros(len(lengths), np.int64)
    total = 0
    for i, n in enumerate(lengths):
        offs[i] = total
        total += _pad(int(n), dtype)
    return offs, total


def _theta_layout(sizes: Sequence[int], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Where ``W_l`` starts in the epoch's theta (``b_l`` right after it), and theta's length."""
    L = len(sizes) - 1
    return _offsets([sizes[i + 1] * sizes[i] + sizes[i + 1] for i in range(L)], dtype)


def _pack(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], woff: np.ndarray, n: int,
          dtype: np.dtype) -> np.ndarray:  # fmt: skip
    """``W_0, b_0, W_1, b_1, ...`` in one aligned vector of ``n`` elements, ``W_l`` from ``woff[l]`` (the
    padding between layers is zero and read by nothing)."""
    theta = empty_aligned(n, dtype, zero=True)
    for W, b, off in zip(weights, biases, woff, strict=True):
        theta[off : off + W.size] = W.ravel()
        theta[off + W.size : off + W.size + b.size] = b
    return theta


def _unpack(theta: np.ndarray, woff: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
    for W, b, off in zip(weights, biases, woff, strict=True):
        W.ravel()[...] = theta[off : off + W.size]  # ravel of a C-contiguous array is a view
        b[...] = theta[off + W.size : off + W.size + b.size]


def _flat_state(state: OptimizerState, woff: np.ndarray, n_params: int, dtype: np.dtype) -> np.ndarray:
    """The state slots as rows of one ``(max(1, n_slots), n_params)`` matrix, each laid out as theta."""
    n_slots = len(state.weights)
    if n_slots == 0:
        return np.zeros((1, 0), dtype)  # read by no optimizer without slots
    S = empty_aligned(n_slots * n_params, dtype, zero=True).reshape(n_slots, n_params)
    for s in range(n_slots):
        S[s] = _pack(state.weights[s], state.biases[s], woff, n_params, dtype)
    return S


def _targets(Y: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(labels, dense, is_dense)`` for the kernels: the targets in their slot, a stand-in in the other."""
    if Y.ndim == 2:
        return _NO_LABELS, _aligned(Y), True
    return _aligned(Y), np.empty((0, 0), dtype), False


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


def output_delta(A: np.ndarray, Y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
    """Delta of the loss w.r.t. the output pre-activation, unweighted (``c_i = 1/n``).

    Parameters
    ----------
    A : ndarray (n_samples, n_classes)
        Output activations.
    Y : ndarray
        int64 labels ``(n_samples,)`` (0/1 for one unit) or dense targets ``(n_samples, n_classes)`` of ``A``'s dtype.
    output, loss : int
        Output activation and loss codes (a pair of the contract).
    out : ndarray (n_samples, n_classes)
        The delta, written in place.

    Returns
    -------
    loss_sum : float
        Data loss summed over the samples (float64).
    n_correct : int
        Rows whose prediction matches the target (the contract's rules).
    """
    Yl, Yd, dense = _targets(Y, A.dtype)
    ls, nc = _k().output_delta[A.dtype](_aligned(A), Yl, Yd, dense, output, loss, out)
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
    """Output activations ``out (n_samples, n_classes)`` of the whole network for ``X (n_samples, n_in)``.

    The compiled one-layer ``forward`` (a BLAS product, then bias and activation) runs layer by layer on the
    arrays as they are: no packed copy of the parameters per call, which took 784-100-10 float32's one-row
    ``predict_proba`` from 19.4 to 13.2 us (10,000 rows: the same time).
    """
    fwd = _k().forward[X.dtype]
    A = _aligned(X)
    L = len(weights)
    for i in range(L):
        Z = out if i == L - 1 else np.empty((X.shape[0], weights[i].shape[0]), X.dtype)
        fwd(A, _aligned(weights[i]), _aligned(biases[i]), output_act if i == L - 1 else hidden_act, Z)
        A = Z


def n_chunks_for(sizes: Sequence[int], batch_size: int, n_used: int) -> int:
    """Row blocks of each minibatch of an epoch over ``n_used`` rows: :func:`fastmlp._threads.n_blocks` of the
    shape when the parallel variant is compiled (:data:`fastmlp.config.PARALLEL`), else 1."""
    if not config.PARALLEL or n_used <= 0:
        return 1
    return _threads.n_blocks(list(sizes), min(int(batch_size), int(n_used)))


def fit_context(sizes: list[int], batch_size: int) -> AbstractContextManager[bool]:
    """Context for a whole ``fit``: keeps the BLAS on one thread across epochs when they are split over threads.

    Between epochs the validation pass would otherwise wake OpenBLAS's own
    threads, which then spin for a while and slow the next epoch down.
    """
    if n_chunks_for(sizes, batch_size, batch_size) > 1 and _threads.thread_budget() > 1 and config.pool_size() > 1:
        return _threads.blas_pinned()
    return nullcontext(False)


def _serialize_parallel_calls() -> bool:
    """Whether parallel kernels must not run concurrently: Numba's ``workqueue`` threading layer (the one it
    falls back to without OpenMP or TBB) aborts the process on concurrent launches; unknown before the first
    launch, so that one is serialized too."""
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel kernel launched yet
        return True


def _on_threads(kern, args: tuple, n_threads: int):
    """``kern(*args)`` (a parallel kernel) with Numba's pool of this thread set to ``n_threads``, restored after."""
    _threads.note_threads_used(n_threads)
    old = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        if _serialize_parallel_calls():
            with _launch_lock:
                return kern(*args)
        return kern(*args)
    finally:
        numba.set_num_threads(old)


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

    Updates ``weights``, ``biases`` and ``state`` (its arrays and its step
    count ``t``) in place and returns ``(loss_sum, penalty_sum, n_correct)``.

    Each minibatch is cut into ``n_chunks_for(plan.sizes, batch, n_used)`` row
    blocks; with more than one the parallel-compiled variant runs, on the
    thread count :class:`fastmlp._threads.ThreadChoice` measured to be faster
    (at most the blocks, :func:`fastmlp._threads.thread_budget` and Numba's
    pool), with the BLAS held on one thread meanwhile.  The result depends on
    the blocks only.
    """
    n_used = order.shape[0]
    n_chunks = n_chunks_for(plan.sizes, plan.batch_size, n_used)
    call = (X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight)
    if n_chunks == 1:
        return _epoch(*call, n_chunks=1, parallel=False, n_threads=1)
    if _threads.forked_after_threads():  # the parent's OpenMP runtime is unusable here: no parallel variant
        return _epoch(*call, n_chunks=n_chunks, parallel=False, n_threads=1)
    key = (plan.sizes, plan.batch_size, X.dtype.char)
    timed = _k().train_epoch.is_compiled(X.dtype, True)  # a first call's compilation is not a speed
    n_threads = _choice.choose(key, min(n_chunks, _threads.thread_budget(), config.pool_size()))
    # two levels of threads oversubscribe the cores: the BLAS runs on one thread while ours run
    with _threads.blas_pinned() if n_threads > 1 else nullcontext(True) as pinned:
        if not pinned:  # no BLAS found, so it cannot be kept off our threads: stay on one
            n_threads = 1
        t0 = time.perf_counter()
        out = _epoch(*call, n_chunks=n_chunks, parallel=True, n_threads=n_threads)
        if timed:
            _choice.record(key, n_threads, time.perf_counter() - t0, n_used)
    return out


def _workspace(sizes: Sequence[int], thresholds: Sequence[int], rows: int, n_chunks: int, woff: np.ndarray,
               n_params: int, weighted: bool, dtype: np.dtype) -> tuple:  # fmt: skip
    """The buffers of one compiled epoch (see :func:`fastmlp.backends.numba.kernels.train_epoch`), allocated
    here so that the kernel allocates nothing: ``(pan, bufs, offs, T, wts, grad, parts, part_corr)``.  Every
    buffer and every matrix in it starts on a ``_ALIGN``-byte boundary."""
    L = len(sizes) - 1
    aoff, n_acts = _offsets([rows * s for s in sizes], dtype)
    drop = [rows * sizes[i] for i in range(L) if thresholds[i] < NO_DROP]
    dropped, n_drop = _offsets(drop, dtype)
    moff = np.zeros(L, np.int64)
    j = 0
    for i in range(L):
        if thresholds[i] < NO_DROP:
            moff[i] = dropped[j]
            j += 1
    doff, n_deltas = _offsets([rows * s for s in sizes[1:]], dtype)

    # a block's panel: its rows of a TN product (at most ceil(n / n_chunks), rounded up to tiles of 4) times
    # the reduction (the next layer's width for a hidden delta, the batch for a weight gradient)
    def tiles(n: int) -> int:
        return (-(-n // n_chunks) + 3) // 4 * 4

    pan = _pad(max(4, tiles(rows) * max(sizes[2:], default=0), max(tiles(s) for s in sizes[1:]) * rows), dtype)
    pan = -(-pan // 4) * 4  # whole rows of 4 (the padding already is, for 4- and 8-byte elements)
    bufs = (empty_aligned(n_acts, dtype), empty_aligned(n_drop, dtype), empty_aligned(n_drop, dtype),
            empty_aligned(n_deltas, dtype), empty_aligned(n_chunks * pan, dtype))  # fmt: skip
    return (pan, bufs, (woff, aoff[:L + 1], moff, doff[:L]), np.empty((rows, sizes[-1]), dtype),
            np.empty(rows if weighted else 0), empty_aligned(n_params, dtype), np.empty((2, n_chunks)),
            np.empty(n_chunks, np.int64))  # fmt: skip


def _epoch(X: np.ndarray, Y: np.ndarray, order: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
           state: OptimizerState, lrs: np.ndarray, plan: EpochPlan, step0: int, sample_weight: np.ndarray | None, *,
           n_chunks: int, parallel: bool, n_threads: int) -> tuple[float, float, int]:  # fmt: skip
    """:func:`train_epoch` with the blocks, the variant and the thread count given (``n_threads`` only matters
    for the parallel variant)."""
    sizes = np.array(plan.sizes, dtype=np.int64)
    woff, n_params = _theta_layout(plan.sizes, X.dtype)
    theta = _pack(weights, biases, woff, n_params, X.dtype)
    S = _flat_state(state, woff, n_params, X.dtype)
    Yl, Yd, dense = _targets(Y, X.dtype)
    weighted = sample_weight is not None
    sw = _aligned(sample_weight) if weighted else _NO_WEIGHTS
    K = _k()
    kern = K.train_epoch[X.dtype, parallel]
    rows = max(1, min(int(plan.batch_size), int(order.shape[0])))
    work = _workspace(plan.sizes, plan.thresholds, rows, n_chunks, woff, n_params, weighted, X.dtype)
    args = (
        _aligned(X), Yl, Yd, dense, sw, weighted, _aligned(order), theta, S, sizes, _aligned(lrs),
        (plan.hidden_code, plan.output_code, plan.loss_code), int(plan.batch_size), float(plan.l2), float(plan.l1),
        float(plan.alpha), plan.thresholds_array, plan.scales_array, plan.optimizer_code,
        (float(plan.momentum), float(plan.beta1), float(plan.beta2), float(plan.eps)), plan.eps_code,
        np.uint64(plan.seed), int(step0), int(state.t), int(n_chunks), rows, *work,
        K.forward_block[X.dtype], K.update_block[X.dtype],
    )  # fmt: skip
    loss_sum, pen_sum, n_correct = _on_threads(kern, args, n_threads) if parallel else kern(*args)
    _unpack(theta, woff, weights, biases)
    for s in range(len(state.weights)):
        _unpack(S[s], woff, state.weights[s], state.biases[s])
    if plan.optimizer != "gradient":
        state.t += plan.n_steps(order.shape[0])
    return float(loss_sum), float(pen_sum), int(n_correct)


def describe() -> str:
    """One line on the Numba settings, for ``fastmlp info``."""
    _k()  # finds out whether the on-disk cache can be written
    return (f"numba {numba.__version__}, parallel {'on' if config.PARALLEL else 'off'}, "
            f"{config.pool_size()} threads, fastmath {config.FASTMATH!r}, cache {'on' if config.CACHE else 'off'}"
            f"{f' ({config.CACHE_OFF_REASON})' if config.CACHE_OFF_REASON else ''}")  # fmt: skip
