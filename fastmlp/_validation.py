"""The validation boundary: the only road into unchecked kernels.

Every public function that reaches a kernel passes its arrays and
hyper-parameters through these helpers first.  Each failure is a
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value
or shape) whose message names the argument and says how to fix it.
"""

from __future__ import annotations

import numbers
import os
import weakref
from collections.abc import Sequence

import numpy as np

from fastmlp.backends._aligned import empty_aligned
from fastmlp.backends.contract import (
    ACT_CODES,
    DTYPES,
    HIDDEN_ACTIVATIONS,
    LOSS_CODES,
    OUTPUT_ACTIVATIONS,
    VALID_OUTPUT_LOSS,
)


def check_dtype(dtype: object, name: str = "dtype") -> np.dtype:
    """Return ``np.dtype(float32|float64)`` or raise ``ValueError``/``TypeError``."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise TypeError(f"{name} must be 'float32' or 'float64', got {dtype!r}") from exc
    if dt.name not in DTYPES:
        raise ValueError(f"{name} must be 'float32' or 'float64', got {dt.name!r}")
    # native byte order: the kernels cannot read a byte-swapped ('>f8') buffer
    return np.dtype(dt.name)


def check_activation(act: object, name: str, *, output: bool = False) -> str:
    """Check an activation name against the lookup tables."""
    allowed = OUTPUT_ACTIVATIONS if output else HIDDEN_ACTIVATIONS
    if not isinstance(act, str):
        raise TypeError(f"{name} must be a string, one of {allowed}, got {type(act).__name__}")
    if act not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {act!r}")
    return act


def check_output_loss(output: str, loss: object) -> str:
    """Check the loss name and that it pairs with the output activation."""
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a string, one of {tuple(LOSS_CODES)}, got {type(loss).__name__}")
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {tuple(LOSS_CODES)}, got {loss!r}")
    if (output, loss) not in VALID_OUTPUT_LOSS:
        ok = sorted(o for o, lo in VALID_OUTPUT_LOSS if lo == loss)
        raise ValueError(f"loss={loss!r} needs output in {ok}, got output={output!r}")
    return loss


def check_act_code(act: object, name: str = "act") -> str:
    """Check any activation name known to the kernels (hidden or output)."""
    if not isinstance(act, str) or act not in ACT_CODES:
        raise ValueError(f"{name} must be one of {tuple(ACT_CODES)}, got {act!r}")
    return act


def check_int(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> int | None:
    """An integer (not bool) in ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within ``[low, high]`` (open ends when asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_seed(seed: object, name: str = "seed") -> int | None:
    """``None`` or an integer in ``[0, 2**64)``."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be None or a non-negative integer, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


#: largest array dimension the kernels accept: BLAS takes sizes and strides as C ``int``
MAX_DIM = 2**31 - 1


_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: the Cython kernels' exponent-bit scan (one pass, no temporary, no floating-point flags), once found
_FAST_FINITE: list = []


def _compiled_all_finite():
    """The compiled ``all_finite(list_of_arrays)`` of the Cython backend's loaded build, or None without one."""
    if not _FAST_FINITE:
        fn = None
        try:
            from fastmlp.backends import cython as _cy

            fn = getattr(_cy._k, "all_finite", None)
        except Exception:  # not built, or failed to load: the NumPy road below
            fn = None
        _FAST_FINITE.append(fn)
    return _FAST_FINITE[0]


def all_finite(a: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity, without a temporary of its size.

    With the Cython backend built, one compiled pass over the exponent bits;
    otherwise one summation pass decides almost every array (NaN and Inf
    propagate into the sum) and only when the sum is not finite (which a huge
    finite array can also cause) do min and max decide exactly.
    """
    if a.size == 0 or a.dtype.kind not in "fc":
        return True
    fast = _compiled_all_finite()
    if fast is not None and a.dtype in _FAST_DTYPES and a.flags.c_contiguous and a.flags.aligned:
        return bool(fast([a]))
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum()):
            return True
        return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


#: large arrays found finite, by identity, with a copy of a sample of their rows (at most _SEEN_MAX)
_SEEN: dict[tuple, tuple[weakref.ref, np.ndarray]] = {}
_SEEN_MAX = 8
#: arrays below this many elements are always scanned (a scan costs less than the bookkeeping)
_SEEN_MIN_SIZE = 1 << 16


def _seen_key(a: np.ndarray) -> tuple:
    return (id(a), a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _sample(a: np.ndarray) -> np.ndarray:
    """64 evenly spaced rows of ``a`` and, of rows wider than 1,024, about 1,024 evenly spaced columns (a view: the
    copy that is remembered stays below about 65,536 elements however wide ``X`` is)."""
    if not a.ndim:
        return a
    rows = a[:: max(1, a.shape[0] // 64)]
    return rows[:, :: max(1, a.shape[1] // 1024)] if a.ndim >= 2 else rows


def finite_checked(a: np.ndarray) -> bool:
    """:func:`all_finite`, remembering large arrays that passed.

    The same array object (same buffer, shape and strides), with an unchanged
    sample of 64 evenly spaced rows (of wide rows, about 1,024 of their columns), is not scanned again: a ``fit(epochs=1)``
    loop then pays the scan of ``X`` once, not per call.  A NaN written in place
    outside the sample afterwards is not seen here; in training it shows as a
    non-finite loss, and ``fit`` rolls the epoch back and says so.
    """
    if a.size < _SEEN_MIN_SIZE:
        return all_finite(a)
    key = _seen_key(a)
    hit = _SEEN.get(key)
    # the sample compared as it is (a memory compare, about 20x faster than hashing it: 784-column float64 X,
    # 0.35 ms -> 0.02 ms a call; a NaN in it compares unequal, so it is scanned again and refused)
    if hit is not None and hit[0]() is a and np.array_equal(_sample(a), hit[1]):
        return True
    if not all_finite(a):
        return False
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.pop(next(iter(_SEEN)))
    _SEEN[key] = (weakref.ref(a), _sample(a).copy())
    return True


#: copies of X from this size on start on a cache line (a few microseconds more than NumPy's own allocation:
#: not worth it for the rows of one prediction)
_ALIGN_FROM_BYTES = 1 << 20


def as_features(X: object, dtype: np.dtype, name: str = "X", n_features: int | None = None) -> np.ndarray:
    """Cast a feature matrix once to ``dtype``, C-contiguous, finite, 2-D.

    Accepts any real or unsigned/signed integer or boolean array-like; rejects
    complex, object, string and datetime data with a ``TypeError``.
    """
    if isinstance(X, np.ndarray):
        arr = X
    else:
        try:
            arr = np.asarray(X)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be a 2-D numeric array, could not convert: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (float, int, uint8 or bool), got dtype {arr.dtype}; "
            "convert it with np.asarray(X, dtype=float)"
        )
    if arr.ndim != 2:
        if arr.ndim == 1:
            fix = f"for one sample use {name}.reshape(1, -1); for one feature, {name}.reshape(-1, 1)"
        elif arr.ndim == 0:
            fix = f"pass a (n_samples, n_features) array, e.g. np.array([[{name}]])"
        else:  # images (n, rows, cols) and the like: one row per sample
            fix = f"flatten each sample with {name}.reshape(len({name}), -1)"
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}; {fix}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows: shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features but the network expects {n_features}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as a ValueError
        if (arr.dtype == dtype and arr.flags.c_contiguous) or arr.size * dtype.itemsize < _ALIGN_FROM_BYTES:
            out = np.ascontiguousarray(arr, dtype=dtype)  # no copy when X already has this dtype and layout
        else:
            # the one copy of a large X starts on a cache line: the compiled epochs then read its rows in place
            out = empty_aligned(arr.shape, dtype)
            np.copyto(out, arr, casting="unsafe")
    if not finite_checked(out):
        if not all_finite(arr):
            raise ValueError(f"{name} contains NaN or infinite values; remove or impute them first")
        raise ValueError(f"{name} overflows {dtype} (values too large); rescale it first")
    return out


def as_labels(y: object, n_samples: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Integer class indices ``(n_samples,)`` in ``[0, n_classes)``, as C-contiguous int64."""
    try:
        arr = np.asarray(y)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} must be a 1-D array of integer class labels: {exc}") from exc
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        hint = ""
        if arr.ndim == 2 and arr.size and arr.dtype.kind in "biuf" and np.isin(arr, (0, 1)).all() and \
                (arr.sum(axis=1) == 1).all():  # fmt: skip
            hint = f"; these look like one-hot rows: pass the class indices {name}.argmax(1)"
        raise ValueError(f"{name} must be 1-D integer class labels (n_samples,), got shape {arr.shape}{hint}")
    if arr.shape[0] != n_samples:
        raise ValueError(f"{name} has {arr.shape[0]} labels but X has {n_samples} rows; they must match")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise TypeError(f"{name} must hold integer class labels 0..{n_classes - 1}, got non-integer floats")
    elif arr.dtype.kind not in "iub":
        raise TypeError(
            f"{name} must hold integer class labels 0..{n_classes - 1}, got dtype {arr.dtype}; "
            "encode string labels first (e.g. np.unique(y, return_inverse=True))"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {n_classes}), got values in [{arr.min()}, {arr.max()}]"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_layers(layers: object) -> list[int]:
    """Layer sizes ``[n_in, n_hidden..., n_out]``: at least two positive integers."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence | np.ndarray):
        raise TypeError(f"layers must be a list of layer sizes like [784, 50, 10], got {type(layers).__name__}")
    sizes = [check_int(n, f"layers[{i}]", minimum=1) for i, n in enumerate(layers)]
    if len(sizes) < 2:
        raise ValueError(f"layers needs at least an input and an output size, got {list(sizes)}")
    for i, n in enumerate(sizes):
        if n > MAX_DIM:
            raise ValueError(f"layers[{i}] = {n} is larger than the kernels take ({MAX_DIM})")
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    if n_params * 8 > _memory_bytes():
        raise ValueError(f"layers {sizes} have {n_params:,} parameters ({n_params * 8 / 2**30:,.1f} GiB in float64), "
                         f"more than this machine's {_memory_bytes() / 2**30:,.1f} GiB of memory; use smaller layers")
    return sizes  # type: ignore[return-value]


def _memory_bytes() -> int:
    """Physical memory of this machine in bytes (2**62 where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 1 << 62


def check_parameters(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    dtype: np.dtype | None = None,
    *,
    finite: bool = False,
    sizes: Sequence[int] | None = None,
    what: str = "",
    writeable: bool = True,
) -> np.dtype:
    """Check that weights/biases chain, share one float dtype and no memory; return that dtype.

    With ``sizes`` (the layer widths ``[n_in, ..., n_out]``) the shapes must be
    exactly ``W_l (sizes[l+1], sizes[l])``; with ``finite``, no value may be NaN
    or infinite (the compiled kernels assume finite numbers).  ``what`` names
    the arrays in messages (default: weights/biases).
    """
    wn, bn = (f"{what} weights", f"{what} biases") if what else ("weights", "biases")
    for name, seq in ((wn, weights), (bn, biases)):
        if isinstance(seq, np.ndarray) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of numpy arrays (one per layer), got {type(seq).__name__}")
    if len(weights) != len(biases) or len(weights) == 0:
        raise ValueError(f"{wn} and {bn} must be non-empty lists of equal length, got {len(weights)} and {len(biases)}")
    if sizes is not None and len(weights) != len(sizes) - 1:
        raise ValueError(f"{wn} has {len(weights)} layers but the network has {len(sizes) - 1}")
    dt = dtype if dtype is not None else getattr(weights[0], "dtype", None)
    dt = check_dtype(dt, f"{wn} dtype")
    prev = None
    for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
        if not isinstance(W, np.ndarray) or not isinstance(b, np.ndarray):
            raise TypeError(f"{wn}[{i}] and {bn}[{i}] must be numpy arrays")
        if W.dtype != dt or b.dtype != dt:
            raise TypeError(f"{wn}[{i}]/{bn}[{i}] must be {dt}, got {W.dtype}/{b.dtype}")
        if W.ndim != 2 or b.ndim != 1 or b.shape[0] != W.shape[0]:
            raise ValueError(f"{wn}[{i}] must be (n_out, n_in) and {bn}[{i}] (n_out,), got {W.shape} and {b.shape}")
        if sizes is not None and W.shape != (sizes[i + 1], sizes[i]):
            raise ValueError(f"{wn}[{i}] has shape {W.shape} but layer {i} of the network is "
                             f"({sizes[i + 1]}, {sizes[i]}); put back arrays of the network's shapes")  # fmt: skip
        if not (W.flags.c_contiguous and b.flags.c_contiguous) or (
            writeable and not (W.flags.writeable and b.flags.writeable)
        ):
            raise ValueError(f"{wn}[{i}] and {bn}[{i}] must be writeable C-contiguous arrays; use np.ascontiguousarray")
        if not (W.flags.aligned and b.flags.aligned):
            raise ValueError(f"{wn}[{i}] and {bn}[{i}] must be aligned arrays; copy them with np.array(...)")
        if prev is not None and W.shape[1] != prev:
            raise ValueError(f"{wn}[{i}] has {W.shape[1]} inputs but layer {i - 1} has {prev} outputs")
        if max(W.shape) > MAX_DIM:
            raise ValueError(f"{wn}[{i}] has shape {W.shape}; a dimension above {MAX_DIM} is too large for BLAS")
        if finite and not (all_finite(W) and all_finite(b)):
            raise ValueError(f"{wn}[{i}]/{bn}[{i}] contain NaN or infinite values")
        prev = W.shape[0]
    # parameters are updated in place one after the other: two views of one buffer would corrupt each other
    params = [(f"{wn}[{i}]", W) for i, W in enumerate(weights)] + [(f"{bn}[{i}]", b) for i, b in enumerate(biases)]
    for j, (name_j, p) in enumerate(params):
        for name_k, q in params[j + 1 :]:
            if p.size and q.size and np.may_share_memory(p, q):
                raise ValueError(f"{name_j} and {name_k} share memory; pass separate arrays (copy one of them)")
    return dt


def as_sample_weight(sample_weight: object, n_samples: int, name: str = "sample_weight") -> np.ndarray:
    """Row weights: a fresh-enough C-contiguous float64 ``(n_samples,)`` array, finite and non-negative.

    A scalar is broadcast to every row (as scikit-learn's ``_check_sample_weight``).
    """
    if isinstance(sample_weight, (str, bytes)):
        raise TypeError(f"{name} must be an array of non-negative numbers, got {type(sample_weight).__name__}")
    try:
        arr = np.asarray(sample_weight)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of non-negative numbers: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n_samples, float(arr))
    if arr.ndim != 1 or arr.shape[0] != n_samples:
        raise ValueError(f"{name} must be 1-D with one weight per row ({n_samples}), got shape {arr.shape}")
    # always a copy (n floats): weights that are a view of a buffer the fit writes (a network's bias)
    # would otherwise change between epochs
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    if not np.isfinite(out).all() or (out < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return out


def as_kernel_array(
    a: object,
    name: str,
    dtype: np.dtype,
    ndim: int,
    shape: tuple[int | None, ...] | None = None,
    *,
    not_in: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """An input array of a kernel: right ndim, shape and dtype, finite, C-contiguous and aligned.

    Copied when it is not C-contiguous or aligned, or when it shares memory
    with one of the arrays ``not_in`` (the buffers the kernel writes), so
    that every backend reads the values it was given.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {a.dtype}; cast it with .astype(np.{dtype})")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(a.shape, shape, strict=True)):
            if want is not None and got != want:
                raise ValueError(f"{name} has shape {a.shape}; axis {axis} must be {want}")
    if a.ndim and max(a.shape) > MAX_DIM:
        raise ValueError(f"{name} has shape {a.shape}; a dimension above {MAX_DIM} is too large for BLAS, split it")
    if not finite_checked(a):
        raise ValueError(f"{name} contains NaN or infinite values; the kernels need finite numbers")
    out = np.require(a, requirements=["C", "A"])
    return detached(out, not_in) if out is a else out


def detached(a: np.ndarray, outputs: Sequence[np.ndarray]) -> np.ndarray:
    """``a``, or a copy of it when it shares memory with one of the buffers ``outputs`` a kernel writes."""
    if a.size and any(o.size and np.may_share_memory(a, o) for o in outputs):
        return a.copy()
    return a


def check_out(out: object, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An output buffer: writeable, C-contiguous, aligned, exact dtype and shape."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or None, got {type(out).__name__}")
    if out.dtype != dtype or out.shape != tuple(shape):
        raise ValueError(f"{name} must be {dtype} with shape {tuple(shape)}, got {out.dtype} {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable and out.flags.aligned):
        raise ValueError(f"{name} must be a writeable, aligned, C-contiguous array (e.g. from np.empty)")
    return out
