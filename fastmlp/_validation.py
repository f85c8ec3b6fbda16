"""The validation boundary: the only road into unchecked kernels.

Every public function that reaches a kernel passes its arrays and
hyper-parameters through these helpers first.  Each failure is a
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value
or shape) whose message names the argument and says how to fix it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from fastmlp.backends._contract import (
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
    return dt


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


def check_int(value: object, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer (not bool) at least ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
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
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}; use X.reshape(len(X), -1)")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows: shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features but the network expects {n_features}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
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
        raise ValueError(f"{name} must be 1-D integer class labels (n_samples,), got shape {arr.shape}")
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
    return sizes  # type: ignore[return-value]


def check_parameters(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], dtype: np.dtype | None = None) -> np.dtype:
    """Check that weights/biases chain and share one float dtype; return that dtype."""
    if len(weights) != len(biases) or len(weights) == 0:
        raise ValueError(f"weights and biases must be non-empty lists of equal length, got {len(weights)} and {len(biases)}")
    dt = dtype if dtype is not None else np.asarray(weights[0]).dtype
    check_dtype(dt, "weights dtype")
    prev = None
    for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
        if not isinstance(W, np.ndarray) or not isinstance(b, np.ndarray):
            raise TypeError(f"weights[{i}] and biases[{i}] must be numpy arrays")
        if W.dtype != dt or b.dtype != dt:
            raise TypeError(f"weights[{i}]/biases[{i}] must be {dt}, got {W.dtype}/{b.dtype}")
        if W.ndim != 2 or b.ndim != 1 or b.shape[0] != W.shape[0]:
            raise ValueError(f"weights[{i}] must be (n_out, n_in) and biases[{i}] (n_out,), got {W.shape} and {b.shape}")
        if not (W.flags.c_contiguous and b.flags.c_contiguous and W.flags.writeable and b.flags.writeable):
            raise ValueError(f"weights[{i}] and biases[{i}] must be writeable C-contiguous arrays; use np.ascontiguousarray")
        if prev is not None and W.shape[1] != prev:
            raise ValueError(f"weights[{i}] has {W.shape[1]} inputs but layer {i - 1} has {prev} outputs")
        prev = W.shape[0]
    return np.dtype(dt)


def as_kernel_array(a: object, name: str, dtype: np.dtype, ndim: int, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """An input array of a kernel: right ndim, shape and dtype, C-contiguous (copied if not)."""
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
    return np.ascontiguousarray(a)


def check_out(out: object, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An output buffer: writeable, C-contiguous, exact dtype and shape."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or None, got {type(out).__name__}")
    if out.dtype != dtype or out.shape != tuple(shape):
        raise ValueError(f"{name} must be {dtype} with shape {tuple(shape)}, got {out.dtype} {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be writeable and C-contiguous")
    return out
