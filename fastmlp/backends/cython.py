"""Cython backend: the kernel contract compiled, with a whole epoch in one call.

The kernels live in :mod:`fastmlp._cython` (one source, ``_kernels.pxi``,
compiled three times).  This adapter picks the build for this CPU:

``avx512``
    ``-mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma``, loaded when the
    CPU has them; it does the matrix products with its own register-tiled
    kernels (``_simd_gemm.h``), single-threaded, instead of SciPy's BLAS;
``avx2``
    ``-mavx2 -mfma``, loaded when the CPU has AVX2 and FMA;
``baseline``
    the platform's baseline ISA, loaded otherwise.

``$FASTMLP_CYTHON_ISA`` (``avx512``, ``avx2`` or ``baseline``) forces one;
:data:`VARIANT` says which loaded.  Importing this module raises ``ImportError``
with the reason when no build can load (the registry then reports the backend
unavailable).

:func:`train_epoch` splits every minibatch over :data:`OPENMP` threads when
that pays: with the avx512 build's own kernels for every network but the
tiniest, with BLAS when the network is small enough that OpenBLAS would run its
gemms single-threaded anyway (DESIGN §4); meanwhile SciPy's BLAS is pinned to
one thread (two levels of threads on two cores oversubscribe badly) and
restored afterwards.  ``$FASTMLP_NUM_THREADS`` (or :data:`NUM_THREADS`) sets the
number of threads; 1 turns the scheme off.

The raw kernels take validated, C-contiguous arrays of one float dtype and
integer codes; use them through ``fastmlp.get_backend("cython")``.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import ModuleType

import numpy as np

from fastmlp import config
from fastmlp.backends._contract import ACT_CODES, LOSS_CODES
from fastmlp.backends._threads import ThreadChoice

NAME = "cython"

__all__ = [
    "NAME",
    "NUM_THREADS",
    "OPENMP",
    "VARIANT",
    "dropout_mask",
    "forward",
    "forward_network",
    "hidden_delta",
    "inplace_update",
    "output_delta",
    "train_epoch",
]

_ISA_ENV = "FASTMLP_CYTHON_ISA"
#: splitting every minibatch over our threads pays between these sizes of the largest layer's
#: forward gemm (multiply-adds per minibatch): below, two barriers a step cost more than the work
#: saved; above, OpenBLAS's own threads on the big gemms win (DESIGN §4: 784-50-10 at batch 100
#: wants our split, 784-256-256-10 wants OpenBLAS's)
_SPLIT_MIN_MACS = 200_000
_SPLIT_MAX_MACS = 8_000_000


def _cpu_features() -> tuple[dict | None, set[str]]:
    """NumPy's CPU dispatch table (None if unavailable) and the flags of /proc/cpuinfo (empty if unreadable)."""
    feats = None
    for modname in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            feats = __import__(modname, fromlist=["__cpu_features__"]).__cpu_features__
            break
        except (ImportError, AttributeError):
            continue
    flags: set[str] = set()
    if feats is None:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    return feats, flags


def _cpu_has(numpy_names: tuple[str, ...], cpuinfo_flags: tuple[str, ...]) -> bool:
    feats, flags = _cpu_features()
    if feats is not None:
        return all(feats.get(f) for f in numpy_names)
    return set(cpuinfo_flags) <= flags


def cpu_has_avx2() -> bool:
    """Whether this CPU (and OS) supports AVX2 and FMA, from NumPy's CPU dispatch table or /proc/cpuinfo."""
    return _cpu_has(("AVX2", "FMA3"), ("avx2", "fma"))


def cpu_has_avx512() -> bool:
    """Whether this CPU (and OS) supports AVX-512 F, DQ, BW and VL plus AVX2 and FMA (what the avx512 build uses)."""
    return _cpu_has(("AVX2", "FMA3", "AVX512F", "AVX512DQ", "AVX512BW", "AVX512VL"),
                    ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"))  # fmt: skip


_VARIANTS = ("avx512", "avx2", "baseline")


def _load() -> tuple[ModuleType, str]:
    isa = os.environ.get(_ISA_ENV, "").strip().lower() or "auto"
    if isa not in ("auto", *_VARIANTS):
        raise ImportError(f"${_ISA_ENV} must be one of {', '.join(_VARIANTS)} (or unset), got {isa!r}")
    has = {"avx512": cpu_has_avx512, "avx2": cpu_has_avx2, "baseline": lambda: True}
    if isa != "auto" and not has[isa]():
        raise ImportError(f"${_ISA_ENV}={isa} but this CPU lacks the instructions that build needs")
    errors = []
    for variant in _VARIANTS if isa == "auto" else (isa,):
        if not has[variant]():
            continue
        modname = "_kernels" if variant == "baseline" else f"_kernels_{variant}"
        try:
            mod = importlib.import_module(f"fastmlp._cython.{modname}")
        except ImportError as exc:
            errors.append(f"{variant}: {exc}")
            if isa != "auto":
                raise ImportError(f"the {variant} build of the Cython kernels does not load: {exc}") from exc
            continue
        return mod, variant
    raise ImportError(
        f"the Cython kernels are not built or do not load ({'; '.join(errors)}); build them with "
        "`python setup.py build_ext --inplace` or reinstall with `pip install .`"
    )


_k, VARIANT = _load()

if _k.ACT_CODES != ACT_CODES or _k.LOSS_CODES != LOSS_CODES:
    raise ImportError("the Cython kernels were compiled with other activation/loss codes than _contract.py: rebuild them")

#: whether the loaded build has OpenMP (multi-threaded ``train_epoch``)
OPENMP: bool = bool(_k.HAVE_OPENMP)
#: whether the loaded build does its matrix products with its own SIMD kernels (avx512) rather than BLAS
SIMD_GEMM: bool = bool(getattr(_k, "SIMD_GEMM", False))


#: threads of ``train_epoch`` (None: choose per shape, at most 2 and the CPUs available)
NUM_THREADS: int | None = config.NUM_THREADS  # $FASTMLP_NUM_THREADS, parsed once in fastmlp.config

forward = _k.forward
output_delta = _k.output_delta
hidden_delta = _k.hidden_delta
inplace_update = _k.inplace_update
dropout_mask = _k.dropout_mask
#: rows from which predicting splits its chunks of 256 rows over our threads
_PARALLEL_FORWARD_ROWS = 512


def forward_network(X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int,
                    output_act: int, out: np.ndarray) -> None:  # fmt: skip
    """Output activations ``out (n_samples, n_classes)`` of the whole network for ``X (n_samples, n_in)``.

    On its own this runs on one thread, with SciPy's BLAS as it is set.  Inside a ``fit`` (or
    ``compat.train``) that holds the BLAS on one thread (:func:`fit_context`), inputs of two chunks of
    256 rows or more are split over two OpenMP threads instead: the validation pass then neither runs
    single-threaded nor wakes OpenBLAS's own workers, which would keep spinning into the next epoch.
    The avx512 build, which calls no BLAS, always splits such inputs.
    """
    n_threads = 1
    if OPENMP and (_pin_depth > 0 or SIMD_GEMM) and X.shape[0] >= _PARALLEL_FORWARD_ROWS:
        n_threads = min(NUM_THREADS if NUM_THREADS is not None else _cpus(), 2)
    _k.forward_network(X, weights, biases, hidden_act, output_act, out, n_threads)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

_blas_controller: object = None
_pin_lock = threading.Lock()
_pin_depth = 0
_pin_saved: list[tuple[object, int]] = []


def _scipy_blas_libs() -> list | None:
    """threadpoolctl's controllers of SciPy's BLAS (the one the kernels call), or None if it cannot be found."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    import scipy

    # wheels vendor it in site-packages/scipy.libs, other builds inside the package or a shared system library
    roots = (os.path.dirname(scipy.__file__), os.path.dirname(scipy.__file__) + ".libs")
    blas = [lib for lib in _blas_controller.lib_controllers if lib.user_api == "blas"]  # type: ignore[attr-defined]
    prefixes = tuple(os.path.realpath(r) + os.sep for r in roots)
    mine = [lib for lib in blas if os.path.realpath(lib.filepath).startswith(prefixes)]
    return (mine or blas) or None  # a BLAS shared with NumPy: pin it too, only for the epoch


@contextmanager
def _blas_pinned() -> Iterator[bool]:
    """Pin SciPy's BLAS to one thread while inside (nesting and concurrent epochs from several Python
    threads share one pin; the last to leave restores the original counts).  Yields False when the
    BLAS cannot be found, and then pins nothing."""
    global _pin_depth
    with _pin_lock:
        if _pin_depth == 0:
            libs = _scipy_blas_libs()
            if libs is not None:
                _pin_saved[:] = [(lib, lib.num_threads) for lib in libs]
                for lib, n in _pin_saved:
                    if n != 1:
                        lib.set_num_threads(1)  # type: ignore[attr-defined]
                _pin_depth = 1
        else:
            libs = []
            _pin_depth += 1
    if libs is None:
        yield False
        return
    try:
        yield True
    finally:
        with _pin_lock:
            _pin_depth -= 1
            if _pin_depth == 0:
                for lib, n in _pin_saved:
                    if n != 1:
                        lib.set_num_threads(n)  # type: ignore[attr-defined]
                _pin_saved.clear()


def fit_context(sizes: list[int], batch_size: int) -> AbstractContextManager[bool]:
    """Context for a whole ``fit``: keeps SciPy's BLAS on one thread across epochs when they are split
    over our threads.  Between epochs the validation pass would otherwise wake OpenBLAS's own threads,
    which then spin for a while and slow the next epoch down (measured: 0.13 s epochs instead of 0.07 s
    for 784-50-10 float32)."""
    if _n_threads(list(sizes), batch_size) > 1:
        return _blas_pinned()
    return nullcontext(False)


def _n_blocks(sizes: list[int], batch_size: int) -> int:
    """How many blocks each minibatch (rows) and each ``W`` (columns) is cut into.

    The result of an epoch depends on the blocks, not on how many threads run them.  With
    ``NUM_THREADS`` set the blocks follow it; otherwise they follow the shape only: two where
    splitting pays (DESIGN §4), one elsewhere.
    """
    if NUM_THREADS is not None:
        return NUM_THREADS if OPENMP else 1
    if batch_size < 2 or _cpus() < 2:
        return 1
    macs = max(a * b for a, b in zip(sizes[:-1], sizes[1:])) * batch_size
    if SIMD_GEMM:  # our kernels run on our threads only: split everything that is not tiny
        return 2 if macs >= _SPLIT_MIN_MACS else 1
    return 2 if _SPLIT_MIN_MACS <= macs <= _SPLIT_MAX_MACS else 1


_choice = ThreadChoice()


def _choose_threads(key: tuple, n_blocks: int) -> int:
    """Threads for the next epoch: ``$FASTMLP_NUM_THREADS`` when set, else measured (:mod:`._threads`)."""
    if n_blocks < 2 or not OPENMP:
        return 1
    if NUM_THREADS is not None:
        return min(NUM_THREADS, n_blocks)
    return _choice.choose(key, n_blocks)


def _n_threads(sizes: list[int], batch_size: int) -> int:
    """Upper bound of the threads an epoch of this shape may use (for pinning BLAS)."""
    return _n_blocks(sizes, batch_size) if OPENMP else 1


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
    """One epoch of minibatch SGD in one compiled call (semantics of ``reference.train_epoch``).

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    y : ndarray of int64 (n_samples,)
    order : ndarray of int64 (n_used,)
        Rows in visiting order; the last minibatch may be partial.
    weights, biases : lists of ndarray ``(n_out, n_in)`` / ``(n_out,)``
        Updated in place.
    lrs : ndarray of float64 (n_steps,)
    hidden_act, output_act, loss : int
        Activation and loss codes.
    batch_size : int
    l2, l1 : float
    thresholds : ndarray of int64 (n_layers,)
        Dropout keep thresholds (``2**24``: no dropout on that layer's input).
    scales : ndarray of float64 (n_layers,)
    seed, step0 : int

    Returns
    -------
    loss_sum : float
        Data loss summed over the epoch's samples, each measured before its update.
    n_correct : int
    """
    sizes = [X.shape[1]] + [W.shape[0] for W in weights]
    args = (X, y, order, list(weights), list(biases), lrs, hidden_act, output_act, loss, batch_size, l2, l1,
            thresholds, scales, seed, step0)  # fmt: skip
    n_blocks = _n_blocks(sizes, batch_size)
    if n_blocks > 1:
        key = (tuple(sizes), batch_size, X.dtype.char)
        n_threads = _choose_threads(key, n_blocks)
        with _blas_pinned() as pinned:
            if not pinned:  # BLAS not found, so it cannot be kept off our threads: stay on one
                n_threads = 1
            t0 = time.perf_counter()
            result = _k.train_epoch(*args, n_threads, n_blocks)
            _choice.record(key, n_threads, time.perf_counter() - t0, order.shape[0])
            return result
    return _k.train_epoch(*args, 1, 1)


def describe() -> str:
    """One line on the loaded build, for ``fastmlp info``."""
    debug = ", debug build (bounds checking on)" if getattr(_k, "DEBUG_BUILD", False) else ""
    products = "own SIMD kernels" if SIMD_GEMM else "SciPy's BLAS"
    return f"variant {VARIANT} (matrix products: {products}), OpenMP {'on' if OPENMP else 'off'}{debug}"
