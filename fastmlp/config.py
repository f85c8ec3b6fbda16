"""Compiler flags of the Numba backend, set in one place.

Every ``@njit`` kernel in :mod:`fastmlp.backends.numba.kernels` takes its options from
:func:`jit_options`; no kernel sets a flag of its own (the one helper compiled apart, the
vectorized ``exp``, takes :func:`fastmath_without_reassoc`).  The values are read
once, at import, from these environment variables (unset means the default):

``FASTMLP_NUMBA_FASTMATH`` (default ``"safe"``)
    ``"safe"``: LLVM may contract ``a*b + c`` into FMAs, reassociate sums,
    use reciprocals and approximate functions, ignore the sign of zero — but
    it keeps IEEE NaN/Inf semantics, so a NaN reaching a kernel still comes
    out as NaN.  ``"1"``/``"full"``: all of fastmath, including "no NaN, no
    Inf" (the kernels never test for them; finiteness is checked on the
    Python side).  ``"0"``: strict IEEE, no FMA contraction (slower).
``FASTMLP_NUMBA_PARALLEL`` (default ``1``)
    Compile ``train_epoch`` with ``parallel=True`` so that one epoch can split
    every minibatch over threads (``prange``).  ``0`` compiles it serial; the
    results are the same up to rounding.
``FASTMLP_NUM_THREADS``
    The thread budget of both compiled backends, read by
    :mod:`fastmlp._threads` (not here).
``FASTMLP_NUMBA_CACHE`` (default ``1``)
    Cache compiled kernels on disk (``cache=True``) so that a second process
    loads them instead of compiling; ``NUMBA_CACHE_DIR`` moves the cache.
    Where Numba finds no writable place for it (the package on a read-only
    mount and no writable home directory), the backend turns caching off on
    first use with one warning (:func:`disable_cache`; :data:`CACHE_OFF_REASON`
    says why) instead of failing inside ``fit``.
``FASTMLP_NUMBA_BOUNDSCHECK`` (default ``0``)
    Debug switch: bounds-check every array access (slow).

This module does not import Numba.
"""

from __future__ import annotations

import os

__all__ = ["BOUNDSCHECK", "CACHE", "CACHE_OFF_REASON", "FASTMATH", "PARALLEL", "cache_problem", "disable_cache",
           "fastmath_without_reassoc", "jit_options", "pool_size"]  # fmt: skip

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

#: fastmath flags that keep NaN/Inf semantics (no ``nnan``/``ninf``)
SAFE_FASTMATH: frozenset[str] = frozenset({"contract", "reassoc", "arcp", "nsz", "afn"})
#: every LLVM fast-math flag (what ``fastmath=True`` sets)
_ALL_FASTMATH: frozenset[str] = SAFE_FASTMATH | {"nnan", "ninf"}


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False
    raise ValueError(f"${name} must be 0 or 1, got {raw!r}")


def _env_fastmath(name: str) -> bool | frozenset[str]:
    raw = os.environ.get(name)
    val = "safe" if raw is None else raw.strip().lower()
    if val == "safe":
        return SAFE_FASTMATH
    if val in _TRUE or val == "full":
        return True
    if val in _FALSE:
        return False
    raise ValueError(f"${name} must be 'safe', 'full'/1 or 0, got {raw!r}")


#: ``fastmath`` argument of every kernel: a set of LLVM flags, True (all) or False
FASTMATH: bool | frozenset[str] = _env_fastmath("FASTMLP_NUMBA_FASTMATH")
#: compile ``train_epoch`` with ``parallel=True``
PARALLEL: bool = _env_bool("FASTMLP_NUMBA_PARALLEL", True)
#: cache compiled kernels on disk
CACHE: bool = _env_bool("FASTMLP_NUMBA_CACHE", True)
#: bounds-check array accesses (debugging only)
BOUNDSCHECK: bool = _env_bool("FASTMLP_NUMBA_BOUNDSCHECK", False)
#: why :data:`CACHE` was turned off at run time (None while it was not)
CACHE_OFF_REASON: str | None = None


def jit_options(*, parallel: bool = False) -> dict[str, object]:
    """Keyword arguments for ``numba.njit`` shared by every kernel.

    Parameters
    ----------
    parallel : bool
        Whether this kernel uses ``prange``; it is compiled parallel only when
        :data:`PARALLEL` is also true.

    Returns
    -------
    dict
        ``fastmath``, ``cache``, ``boundscheck``, ``nogil``, ``error_model``
        (``"numpy"``: division by zero gives inf/nan instead of raising, so
        loops need no checks and vectorize) and ``parallel``.
    """
    fm = set(FASTMATH) if isinstance(FASTMATH, frozenset) else FASTMATH
    return {
        "fastmath": fm,
        "cache": CACHE,
        "boundscheck": BOUNDSCHECK,
        "nogil": True,
        "error_model": "numpy",
        "parallel": bool(parallel and PARALLEL),
    }


def fastmath_without_reassoc() -> bool | set[str]:
    """:data:`FASTMATH` less ``"reassoc"``: the flags of code whose rounding order matters (the range
    reduction of the kernels' ``exp``); the other flags (FMA contraction, ...) keep its accuracy."""
    if FASTMATH is False:
        return False
    flags = set(FASTMATH) if isinstance(FASTMATH, frozenset) else set(_ALL_FASTMATH)
    return flags - {"reassoc"}


def pool_size() -> int:
    """Threads in Numba's pool (``NUMBA_NUM_THREADS``): the most a parallel epoch can use."""
    import numba  # local: this module must stay importable without numba

    return int(numba.config.NUMBA_NUM_THREADS)


def cache_problem(py_func: object) -> str | None:
    """Why Numba could not cache ``py_func`` on disk, or None when it can.

    Asks Numba's own cache locators (``$NUMBA_CACHE_DIR``, ``__pycache__`` beside the source, the user's
    cache directory, ...) exactly as ``cache=True`` would, so that a kernel module whose directory and home
    are not writable is found out before a compilation raises ``RuntimeError: cannot cache function``.

    Parameters
    ----------
    py_func : function
        A Python function of the module to cache (its source file decides where the cache goes).

    Returns
    -------
    str or None
    """
    if not callable(py_func) or not hasattr(py_func, "__code__"):
        raise TypeError(f"py_func must be a Python function, got {type(py_func).__name__}")
    try:
        from numba.core.caching import FunctionCache
    except ImportError:  # a Numba without this module: let cache=True decide
        return None
    try:
        FunctionCache(py_func)
    except (RuntimeError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def disable_cache(reason: str) -> None:
    """Compile every kernel compiled from now on without the on-disk cache, with one ``RuntimeWarning``.

    Parameters
    ----------
    reason : str
        Why (kept in :data:`CACHE_OFF_REASON`, shown by ``fastmlp info``).
    """
    global CACHE, CACHE_OFF_REASON
    if not isinstance(reason, str) or not reason:
        raise TypeError("reason must be a non-empty string")
    import warnings

    CACHE, CACHE_OFF_REASON = False, reason
    warnings.warn(f"fastmlp: Numba cannot write its on-disk cache ({reason}); the numba backend compiles without "
                  "it (each new process compiles again). Set NUMBA_CACHE_DIR to a writable directory to cache, or "
                  "FASTMLP_NUMBA_CACHE=0 to silence this.", RuntimeWarning, stacklevel=3)  # fmt: skip
