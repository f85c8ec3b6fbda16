"""Cython backend: the kernel contract compiled, with a whole epoch in one call.

The kernels live in :mod:`fastmlp.backends.cython` (one source, ``_kernels.pxi``,
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
import time
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

import numpy as np

from fastmlp import _threads
from fastmlp.backends import reference as _ref
from fastmlp.backends.contract import ACT_CODES, LOSS_CODES, EpochPlan, OptimizerState

NAME = "cython"

__all__ = [
    "NAME",
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
            mod = importlib.import_module(f"fastmlp.backends.cython.{modname}")
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
    raise ImportError("the Cython kernels were compiled with other activation/loss codes than contract.py: rebuild them")

#: whether the loaded build has OpenMP (multi-threaded ``train_epoch``)
OPENMP: bool = bool(_k.HAVE_OPENMP)
#: whether the loaded build does its matrix products with its own SIMD kernels (avx512) rather than BLAS
SIMD_GEMM: bool = bool(getattr(_k, "SIMD_GEMM", False))


forward = _k.forward
hidden_delta = _k.hidden_delta
inplace_update = _k.inplace_update
dropout_mask = _k.dropout_mask
#: rows from which predicting splits its chunks of 256 rows over our threads
_PARALLEL_FORWARD_ROWS = 512


def output_delta(A: np.ndarray, Y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
    """Output delta against labels or a dense target matrix (semantics of ``reference.output_delta``)."""
    if Y.ndim == 2 or not _k_supports(output, loss, A.shape[1]):
        return _ref.output_delta(A, Y, output, loss, out)
    return _k.output_delta(A, Y, output, loss, out)


def forward_network(X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int,
                    output_act: int, out: np.ndarray) -> None:  # fmt: skip
    """Output activations ``out (n_samples, n_classes)`` of the whole network for ``X (n_samples, n_in)``.

    On its own this runs on one thread, with SciPy's BLAS as it is set.  Inside a ``fit`` (or
    ``compat.train``) that holds the BLAS on one thread (:func:`fit_context`), inputs of two chunks of
    256 rows or more are split over two OpenMP threads instead: the validation pass then neither runs
    single-threaded nor wakes OpenBLAS's own workers, which would keep spinning into the next epoch.
    The avx512 build, which calls no BLAS, always splits such inputs.
    """
    if output_act == ACT_CODES["exp"]:
        _ref.forward_network(X, weights, biases, hidden_act, output_act, out)
        return
    n_threads = 1
    if OPENMP and (_threads.pinned() or SIMD_GEMM) and X.shape[0] >= _PARALLEL_FORWARD_ROWS:
        n_threads = min(_threads.thread_budget(), 2)
    _k.forward_network(X, weights, biases, hidden_act, output_act, out, n_threads)


def fit_context(sizes: list[int], batch_size: int) -> AbstractContextManager[bool]:
    """Context for a whole ``fit``: keeps the BLAS on one thread across epochs when they are split over our
    threads.  Between epochs the validation pass would otherwise wake OpenBLAS's own threads, which then
    spin for a while and slow the next epoch down (measured: 0.13 s epochs instead of 0.07 s for 784-50-10
    float32)."""
    if OPENMP and _threads.n_blocks(list(sizes), batch_size) > 1 and _threads.thread_budget() > 1:
        return _threads.blas_pinned()
    return nullcontext(False)


_choice = _threads.ThreadChoice()


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
    """One epoch in one compiled call without the GIL (semantics of ``reference.train_epoch``).

    Returns ``(loss_sum, penalty_sum, n_correct)``; see :mod:`fastmlp.backends.contract`.
    """
    if (plan.target != "labels" or plan.optimizer != "sgd" or plan.alpha or sample_weight is not None
            or not _k_supports(plan.output_code, plan.loss_code, plan.sizes[-1])):  # fmt: skip
        return _ref.train_epoch(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight)
    sizes = list(plan.sizes)
    bs = plan.batch_size
    args = (X, Y, order, list(weights), list(biases), lrs, plan.hidden_code, plan.output_code, plan.loss_code,
            bs, plan.l2, plan.l1, plan.thresholds_array, plan.scales_array, plan.seed, step0)  # fmt: skip
    n_blocks = _threads.n_blocks(sizes, min(bs, order.shape[0])) if OPENMP else 1
    if n_blocks > 1:
        key = (tuple(sizes), bs, X.dtype.char)
        n_threads = _choice.choose(key, min(n_blocks, _threads.thread_budget()))
        with _threads.blas_pinned() as pinned:
            if not pinned:  # BLAS not found, so it cannot be kept off our threads: stay on one
                n_threads = 1
            t0 = time.perf_counter()
            ls, nc = _k.train_epoch(*args, n_threads, n_blocks)
            _choice.record(key, n_threads, time.perf_counter() - t0, order.shape[0])
            return ls, 0.0, nc
    ls, nc = _k.train_epoch(*args, 1, 1)
    return ls, 0.0, nc


def describe() -> str:
    """One line on the loaded build, for ``fastmlp info``."""
    debug = ", debug build (bounds checking on)" if getattr(_k, "DEBUG_BUILD", False) else ""
    products = "own SIMD kernels" if SIMD_GEMM else "SciPy's BLAS"
    return f"variant {VARIANT} (matrix products: {products}), OpenMP {'on' if OPENMP else 'off'}{debug}"
