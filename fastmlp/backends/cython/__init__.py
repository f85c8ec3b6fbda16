"""Cython backend: the kernel contract compiled, with a whole epoch in one call.

The kernels are one Cython source, ``_kernels.pxi``, compiled three times by
``setup.py``.  This adapter picks the build for this CPU:

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

Every kernel of :class:`fastmlp.backends.contract.RawBackend` is compiled:
:func:`train_epoch` runs a whole epoch (every target kind, loss, penalty,
sample weights and optimizer of the contract) in one call without the GIL.
Threads follow :mod:`fastmlp._threads`: every minibatch is cut into
``n_blocks(sizes, batch_size)`` row blocks (and every ``W`` into as many
column blocks), a count set by the shape alone, so the result never depends on
how many threads run them; up to ``min(n_blocks, thread_budget())`` OpenMP
threads take the blocks in turn (``$FASTMLP_NUM_THREADS`` and
``fastmlp._threads.thread_limit`` lower the budget), and a
:class:`~fastmlp._threads.ThreadChoice` times one thread against several and
keeps the faster.  While an epoch is cut into several blocks, the BLAS
libraries are held on one thread (``blas_pinned``) and restored afterwards.

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
from fastmlp.backends.contract import (
    ACT_CODES,
    EPS_MODES,
    EXP_CAP,
    LOSS_CODES,
    OPTIMIZER_CODES,
    TARGET_CODES,
    EpochPlan,
    OptimizerState,
)

NAME = "cython"

__all__ = [
    "NAME",
    "OPENMP",
    "SIMD_GEMM",
    "SIMD_INFER",
    "VARIANT",
    "describe",
    "dropout_mask",
    "fit_context",
    "forward",
    "forward_network",
    "forward_network_checked",
    "hidden_delta",
    "inplace_update",
    "output_delta",
    "train_epoch",
]

_ISA_ENV = "FASTMLP_CYTHON_ISA"


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
#: written by setup.py beside the kernels when it could not compile them (no compiler, a compiler error)
_NOT_BUILT = "NOT_BUILT.txt"


def _fix_for(errors: list[str]) -> str:
    """What to do about the load errors: install the OpenMP runtime, or a compiler, or build the kernels."""
    text = " ".join(errors)
    if "libgomp" in text:
        return ("the GNU OpenMP runtime is missing: install it (Debian/Ubuntu: `apt-get install libgomp1`; "
                "Fedora/RHEL: `dnf install libgomp`; Alpine: `apk add libgomp`)")  # fmt: skip
    why = _not_built_note()
    if why:
        return (f"they were not compiled when fastmlp was installed ({why}); install a C compiler (Debian/Ubuntu: "
                "`apt-get install gcc`) and reinstall fastmlp, or use the numba or numpy backend")  # fmt: skip
    return "build them with `python setup.py build_ext --inplace` or reinstall with `pip install .`"


def _not_built_note() -> str:
    """What setup.py recorded when it could not compile the kernels ('' when it compiled them)."""
    try:
        with open(os.path.join(os.path.dirname(__file__), _NOT_BUILT)) as f:
            return " ".join(f.read().split())
    except OSError:
        return ""


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
                raise ImportError(f"the {variant} build of the Cython kernels does not load: {exc}; "
                                  f"{_fix_for(errors)}") from exc  # fmt: skip
            continue
        return mod, variant
    if errors and all("No module named" in e for e in errors) and _not_built_note():  # never compiled: say why
        raise ImportError("the Cython kernels" + _fix_for(errors).removeprefix("they"))
    raise ImportError(f"the Cython kernels are not built or do not load ({'; '.join(errors)}); {_fix_for(errors)}")


_k, VARIANT = _load()

_COMPILED_CODES = {"activation": (_k.ACT_CODES, ACT_CODES), "loss": (_k.LOSS_CODES, LOSS_CODES),
                   "target": (_k.TARGET_CODES, TARGET_CODES), "optimizer": (_k.OPTIMIZER_CODES, OPTIMIZER_CODES),
                   "eps_mode": (_k.EPS_MODES, EPS_MODES), "exp cap": (_k.EXP_CAP, EXP_CAP)}  # fmt: skip
_stale = [what for what, (built, spec) in _COMPILED_CODES.items() if built != spec]
if _stale:
    raise ImportError(f"the Cython kernels were compiled with other {', '.join(_stale)} codes than contract.py: "
                      "rebuild them (`python setup.py build_ext --inplace`)")

#: whether the loaded build has OpenMP (multi-threaded ``train_epoch``)
OPENMP: bool = bool(_k.HAVE_OPENMP)
#: whether the loaded build does its matrix products with its own SIMD kernels (avx512) rather than BLAS
SIMD_GEMM: bool = bool(getattr(_k, "SIMD_GEMM", False))
#: whether inference runs the build's own SIMD kernels (the avx512 and avx2 builds; no BLAS call)
SIMD_INFER: bool = bool(getattr(_k, "SIMD_INFER", False))


forward = _k.forward
hidden_delta = _k.hidden_delta
inplace_update = _k.inplace_update
dropout_mask = _k.dropout_mask
output_delta = _k.output_delta
#: rows from which predicting splits its chunks of 64 rows over our threads
_PARALLEL_FORWARD_ROWS = 512


def forward_network(X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int,
                    output_act: int, out: np.ndarray) -> None:  # fmt: skip
    """Output activations ``out (n_samples, n_out)`` of the whole network for ``X (n_samples, n_in)``.

    The avx512 and avx2 builds run their own SIMD kernels, no BLAS, and split inputs of 512 rows or more
    over two OpenMP threads.  The baseline build calls SciPy's BLAS: on its own it runs on one thread with
    the BLAS as it is set; inside a ``fit`` (or ``compat.train``) that holds the BLAS on one thread
    (:func:`fit_context`) it splits such inputs too, so that the validation pass neither runs
    single-threaded nor wakes OpenBLAS's own workers, which would keep spinning into the next epoch.
    Each row's result does not depend on the split.
    """
    forward_network_checked(X, weights, biases, hidden_act, output_act, out, check=False)


def forward_network_checked(X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int,
                            output_act: int, out: np.ndarray, check: bool = True) -> bool:  # fmt: skip
    """:func:`forward_network` that also tests every weight and bias for NaN and infinity: False when one holds
    such a value (``out`` is then meaningless).  The SIMD builds test the weights in the first chunk's products
    (no pass of its own), the baseline build scans them first."""
    n_threads = 1
    if OPENMP and X.shape[0] >= _PARALLEL_FORWARD_ROWS and (_threads.pinned() or SIMD_INFER):
        n_threads = min(_threads.thread_budget(), 2)
        _threads.note_threads_used(n_threads)
    return _k.forward_network(X, weights if type(weights) is list else list(weights),
                              biases if type(biases) is list else list(biases), hidden_act, output_act, out,
                              n_threads, check)  # fmt: skip


def fit_context(sizes: list[int], batch_size: int) -> AbstractContextManager[bool]:
    """Context for a whole ``fit``: keeps the BLAS on one thread across epochs when they are split over our
    threads.  Between epochs the validation pass would otherwise wake OpenBLAS's own threads, which then
    spin for a while and slow the next epoch down (measured: 0.13 s epochs instead of 0.07 s for 784-50-10
    float32)."""
    if OPENMP and _threads.n_blocks(list(sizes), batch_size) > 1 and _threads.thread_budget() > 1:
        return _threads.blas_pinned()
    return nullcontext(False)


#: seconds per sample of each epoch shape on one thread and on several (the measured thread choice)
_choice = _threads.ThreadChoice()


def _threads_for(plan: EpochPlan, n_used: int) -> tuple[int, int, tuple | None]:
    """``(n_threads, n_blocks, key)`` for an epoch of ``plan`` over ``n_used`` rows.

    The blocks follow the shape (:func:`fastmlp._threads.n_blocks` of the sizes and the batch, or the
    whole epoch when it has fewer rows); the threads are the measured choice between one and
    ``min(n_blocks, thread_budget())``.  ``key`` is the :data:`_choice` record to time the epoch under,
    None when only one thread may run.
    """
    blocks = _threads.n_blocks(plan.sizes, min(plan.batch_size, n_used)) if OPENMP else 1
    most = min(blocks, _threads.thread_budget())
    if most < 2:
        return 1, blocks, None
    key = (plan.sizes, plan.batch_size, plan.dtype, plan.optimizer)
    return _choice.choose(key, most), blocks, key


def _run(X: np.ndarray, Y: np.ndarray, order: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
         state: OptimizerState, lrs: np.ndarray, plan: EpochPlan, step0: int, sample_weight: np.ndarray | None,
         n_threads: int, n_blocks: int) -> tuple[float, float, int]:  # fmt: skip
    """The compiled epoch on ``n_threads`` threads over ``n_blocks`` blocks; advances ``state.t``."""
    _threads.note_threads_used(n_threads)
    res = _k.train_epoch(
        X, Y, order, list(weights), list(biases), [list(s) for s in state.weights], [list(s) for s in state.biases],
        lrs, sample_weight, plan.hidden_code, plan.output_code, plan.loss_code, plan.target_code, plan.batch_size,
        plan.l2, plan.l1, plan.alpha, plan.thresholds_array, plan.scales_array, plan.optimizer_code, plan.momentum,
        plan.beta1, plan.beta2, plan.eps, plan.eps_code, plan.seed, step0, state.t, n_threads, n_blocks,
    )  # fmt: skip
    if plan.optimizer != "gradient":
        state.t += plan.n_steps(order.shape[0])
    return res


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

    Updates ``weights``, ``biases`` and ``state`` in place and returns ``(loss_sum, penalty_sum,
    n_correct)``; see :mod:`fastmlp.backends.contract`.  When the shape cuts minibatches into blocks
    (a network small enough that BLAS threads would not pay on its products anyway), the BLAS is held
    on one thread for the epoch, whichever thread count then runs, so that one and several threads are
    timed alike; with more than one thread allowed, the epoch's time is recorded for the choice.
    """
    n_threads, n_blocks, key = _threads_for(plan, order.shape[0])
    if n_blocks < 2:
        return _run(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight, 1, 1)
    with _threads.blas_pinned() as pinned:
        if not pinned and not SIMD_GEMM:  # a BLAS we cannot find cannot be kept off our threads: stay on one
            n_threads = 1
        if key is None:  # one thread may run: nothing to choose or time
            return _run(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight, 1, n_blocks)
        t0 = time.perf_counter()
        res = _run(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight, n_threads, n_blocks)
        _choice.record(key, n_threads, time.perf_counter() - t0, order.shape[0])
    return res


def describe() -> str:
    """One line on the loaded build, for ``fastmlp info``."""
    debug = ", debug build (bounds checking on)" if getattr(_k, "DEBUG_BUILD", False) else ""
    products = "own SIMD kernels" if SIMD_GEMM else "SciPy's BLAS"
    try:
        threads = f", up to {_threads.thread_budget()} epoch threads" if OPENMP else ""
    except ValueError as exc:  # a bad $FASTMLP_NUM_THREADS: say so rather than fail the report
        threads = f", threads: {exc}"
    return f"variant {VARIANT} (matrix products: {products}), OpenMP {'on' if OPENMP else 'off'}{threads}{debug}"
