"""Threads: the one owner of the thread budget, the measured thread choice, the BLAS pin and the blocks.

* **Blocks follow the shape.**  A compiled epoch cuts every minibatch into
  :func:`n_blocks` row blocks (and every ``W`` into as many column blocks);
  the block count depends on the layer sizes and the batch size only, so a
  capped joblib worker, a one-thread fit and a two-thread fit compute the
  same bits.  Threads then take blocks in turn.
* **The budget.**  At most :func:`thread_budget` threads run: the CPUs this
  process may use, lowered by ``$FASTMLP_NUM_THREADS`` and by the innermost
  :func:`thread_limit` (a context variable, so concurrent fits in other
  threads or tasks keep their own caps).
* **The measured choice.**  On a machine busy with other work a split epoch
  can be many times slower than a one-thread epoch (each step waits at two
  barriers for a thread that may not be running): :class:`ThreadChoice` times
  both now and then and keeps the faster; the choice never changes results.
* **Fork safety.**  GNU OpenMP cannot be used in a child forked from a process
  that already ran an OpenMP team (the child hangs in the next parallel region;
  Numba kills it), which is what ``multiprocessing``'s default ``fork`` start
  method does.  A child forked after fastmlp ran threads therefore trains on
  one thread (:func:`forked_after_threads`); ``spawn`` and ``forkserver``
  children start fresh and get the whole budget.
* **The BLAS pin.**  Two levels of threads on few cores oversubscribe badly
  (two OpenMP threads each calling a two-thread BLAS: 15 s instead of 0.19 s an
  epoch), so while our threads run, the BLAS libraries are held on one thread
  (:func:`blas_pinned`) and restored after.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

__all__ = [
    "MAX_BLOCKS",
    "ThreadChoice",
    "blas_pinned",
    "cpu_count",
    "env_threads",
    "forked_after_threads",
    "max_threads",
    "n_blocks",
    "thread_budget",
    "thread_limit",
]

#: blocks of a minibatch at most (a power of two)
MAX_BLOCKS = 8
#: a block gets at least this many rows ...
MIN_BLOCK_ROWS = 32
#: ... and at least this many multiply-adds of the widest layer's forward product (below, two barriers a
#: step cost more than the work the second thread takes over)
MIN_BLOCK_MACS = 1_000_000
#: the slower thread count is timed again every this many epochs of a shape (four times as rarely when it
#: was more than three times slower)
PROBE_EVERY = 64
#: epochs per thread count whose best time is that count's speed
RECENT = 3

_ENV = "FASTMLP_NUM_THREADS"
_cap: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastmlp_thread_cap", default=None)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    """The largest thread count accepted anywhere: four times the CPUs."""
    return 4 * cpu_count()


def check_threads(value: object, name: str) -> int:
    """A thread count: an integer in ``[1, max_threads()]``, with a warning above the CPU count."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover - numpy is a dependency
            ok = False
        if not ok:
            raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    n = int(value)  # type: ignore[call-overload]
    top = max_threads()
    if not 1 <= n <= top:
        raise ValueError(f"{name} must be between 1 and {top} (4 x the {cpu_count()} CPUs here), got {n}")
    if n > cpu_count():
        warnings.warn(f"{name}={n} is more than the {cpu_count()} CPUs here; threads will wait for each other",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
    return n


_env_cache: tuple[str | None, int | None] | None = None


def env_threads() -> int | None:
    """``$FASTMLP_NUM_THREADS`` as a count (None when unset or empty).

    Raises
    ------
    ValueError
        Naming the variable, when it is not an integer in ``[1, max_threads()]``.
    """
    global _env_cache
    raw = os.environ.get(_ENV)
    if _env_cache is not None and _env_cache[0] == raw:
        return _env_cache[1]
    if raw is None or not raw.strip():
        value = None
    else:
        try:
            n = int(raw.strip())
        except ValueError:
            raise ValueError(f"${_ENV} must be a positive integer, got {raw!r}; unset it or set e.g. {_ENV}=2") from None
        top = max_threads()
        if not 1 <= n <= top:
            raise ValueError(f"${_ENV} must be between 1 and {top} (4 x the CPUs), got {raw!r}")
        if n > cpu_count():
            warnings.warn(f"${_ENV}={n} is more than the {cpu_count()} CPUs here", RuntimeWarning, stacklevel=2)
        value = n
    _env_cache = (raw, value)
    return value


# ------------------------------------------------------------------------------ fork safety
#: set once this process ran a compiled kernel on more than one thread (an OpenMP team or Numba's pool)
_threads_used = False
#: set in a child forked after that: its OpenMP runtime is unusable, every epoch runs on one thread
_forked_after_threads = False


def note_threads_used(n: int) -> None:
    """Called by the backends before they run ``n`` threads (an OpenMP team, Numba's parallel pool)."""
    global _threads_used
    if n > 1:
        _threads_used = True


def forked_after_threads() -> bool:
    """Whether this process was forked from one that had run fastmlp's threads (then: one thread)."""
    return _forked_after_threads


def _after_fork_in_child() -> None:
    global _forked_after_threads
    if _threads_used:
        _forked_after_threads = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def thread_budget() -> int:
    """Threads a compiled epoch may use now: ``$FASTMLP_NUM_THREADS`` (default: the CPUs), under the active
    cap; one in a child forked after the parent ran threads (see the module's notes on fork safety)."""
    if _forked_after_threads:
        return 1
    env = env_threads()
    n = cpu_count() if env is None else env
    cap = _cap.get()
    if cap is not None:
        n = min(n, cap)
    return max(1, n)


def current_cap() -> int | None:
    """The innermost :func:`thread_limit` of this thread or task, or None."""
    return _cap.get()


def n_blocks(sizes: Sequence[int], batch_size: int) -> int:
    """Row blocks of a minibatch (and column blocks of a ``W``): a power of two set by the shape alone.

    Each block keeps at least :data:`MIN_BLOCK_ROWS` rows and
    :data:`MIN_BLOCK_MACS` multiply-adds of the widest layer, and there are at
    most :data:`MAX_BLOCKS`; 784-50-10 at batch 100 gets 2.
    """
    macs = max(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)) * int(batch_size)
    nb = 1
    while nb < MAX_BLOCKS and batch_size >= 2 * nb * MIN_BLOCK_ROWS and macs >= 2 * nb * MIN_BLOCK_MACS:
        nb *= 2
    return nb


class ThreadChoice:
    """Per-key record of seconds per sample by thread count, and the choice it implies.

    ``choose(key, n)`` returns ``n`` until ``n`` threads were timed twice (the
    first epoch of a shape is cold), then 1 until one thread was timed, then the
    faster of the two, timing the slower again
    every :data:`PROBE_EVERY` epochs of that key (four times as rarely when it was
    more than three times slower).  A thread count's speed is the best of its
    last :data:`RECENT` epochs: a machine's noise only ever slows an epoch down,
    so one epoch slowed by a neighbour (or by a core the host parked during a
    pause) does not move the choice for the next ``PROBE_EVERY`` epochs.
    Thread-safe.
    """

    def __init__(self) -> None:
        self.speed: dict[tuple, dict[int, float]] = {}
        self.calls: dict[tuple, int] = {}
        self._recent: dict[tuple, list[float]] = {}
        self._lock = threading.Lock()

    def choose(self, key: tuple, n: int) -> int:
        """Threads for the next epoch of ``key`` when up to ``n`` may run."""
        if n < 2:
            return 1
        with self._lock:
            calls = self.calls[key] = self.calls.get(key, 0) + 1
            seen = self.speed.get(key, {})
            # n threads are timed twice before one thread is tried: the first epoch of a shape is cold
            # (the thread team starts, the work buffers fault in) and alone it would often lose to one thread
            if n not in seen or len(self._recent.get((key, n), ())) == 1:
                return n
            if 1 not in seen:
                return 1
            best, other = (1, n) if seen[1] < seen[n] else (n, 1)
            every = PROBE_EVERY * (4 if seen[other] > 3 * seen[best] else 1)
            return other if calls % every == 0 else best

    def record(self, key: tuple, n_threads: int, seconds: float, n_samples: int) -> None:
        """Note that an epoch of ``key`` over ``n_samples`` rows took ``seconds`` on ``n_threads`` threads."""
        with self._lock:
            recent = self._recent.setdefault((key, n_threads), [])
            recent.append(seconds / max(1, n_samples))
            del recent[:-RECENT]
            self.speed.setdefault(key, {})[n_threads] = min(recent)


# ------------------------------------------------------------------------------ caps
_limit_lock = threading.Lock()
_limit_depth = 0
_limit_stack: ExitStack | None = None


@contextmanager
def thread_limit(n: int | None) -> Iterator[None]:
    """Cap fastmlp's epoch threads at ``n`` inside the block (``None``: no cap); nests, innermost wins.

    The cap of fastmlp's own threads is a context variable: it holds for the
    calling thread (or asyncio task) only.  BLAS/OpenMP (threadpoolctl) and
    Numba's thread count are process-wide or per-thread settings of those
    libraries; they are lowered too, BLAS only from the main thread (OpenBLAS
    ignores the call from other threads, at times only the restore), the first
    caller in sets it and the last one out restores it.
    """
    global _limit_depth, _limit_stack
    if n is None:
        yield
        return
    n = check_threads(n, "n_threads")
    token = _cap.set(n if _cap.get() is None else min(n, _cap.get()))  # type: ignore[type-var]
    with _limit_lock:
        if _limit_depth == 0:
            _limit_stack = _process_limits(n)
        _limit_depth += 1
    numba = sys.modules.get("numba")  # only when already imported (the numba backend loaded it)
    old_numba = None
    try:
        if numba is not None:
            try:
                old_numba = numba.get_num_threads()
                numba.set_num_threads(max(1, min(n, int(numba.config.NUMBA_NUM_THREADS))))
            except Exception:  # a broken or stubbed numba must not break the cap
                old_numba = None
        yield
    finally:
        if old_numba is not None:
            numba.set_num_threads(old_numba)
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0 and _limit_stack is not None:
                _limit_stack.close()
                _limit_stack = None
        _cap.reset(token)


def _process_limits(n: int) -> ExitStack:
    stack = ExitStack()
    if threading.current_thread() is threading.main_thread():
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - a dependency
            return stack
        stack.enter_context(threadpool_limits(limits=n))
    return stack


# ------------------------------------------------------------------------------ the BLAS pin
_blas_controller: object = None
_pin_lock = threading.Lock()
_pin_depth = 0
_pin_saved: list[tuple[object, int]] = []


def _blas_libs() -> list | None:
    """threadpoolctl's controllers of the BLAS libraries loaded now, SciPy's included; None if there are none."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency
        return None
    if _blas_controller is None:
        try:  # the Cython kernels call SciPy's BLAS, a different OpenBLAS from NumPy's: load it first
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError:
            pass
        _blas_controller = ThreadpoolController()
    libs = [lib for lib in _blas_controller.lib_controllers if lib.user_api == "blas"]  # type: ignore[attr-defined]
    return libs or None


@contextmanager
def blas_pinned() -> Iterator[bool]:
    """Hold every BLAS library on one thread while inside.

    Nesting and concurrent epochs from several Python threads share one pin; the
    last to leave restores the original counts.  Yields False when no BLAS can
    be found (then nothing is pinned and callers should stay on one thread).
    """
    global _pin_depth
    with _pin_lock:
        if _pin_depth == 0:
            libs = _blas_libs()
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


def pinned() -> bool:
    """Whether a :func:`blas_pinned` block is active (in any thread)."""
    return _pin_depth > 0
