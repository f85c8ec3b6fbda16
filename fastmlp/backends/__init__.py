"""Backend registry: the kernel contract behind validating entry points.

A *raw* backend is a module implementing the functions of
:mod:`fastmlp.backends.reference` on validated, C-contiguous arrays with
integer activation codes.  :class:`Backend` wraps one and is the only public
road into its kernels: every method validates dtypes, shapes, contiguity and
hyper-parameters, allocates output buffers when none are given, then calls the
raw kernel.

``"auto"`` picks the fastest backend that loads (cython, then numba, then
numpy); ``FASTMLP_BACKEND`` overrides the default.  When "auto" has to fall
back, the reason is logged once.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends._contract import ACT_CODES, KEEP_BITS, LOSS_CODES, keep_threshold

#: dropout counters (seed aside) are hashed as 64-bit integers; the Numba kernels take them as int64
_MAX_COUNTER = 2**63 - 1

__all__ = ["Backend", "available_backends", "backend_errors", "get_backend"]

logger = logging.getLogger("fastmlp")

#: backend name -> module implementing the raw kernels, fastest first
_MODULES: dict[str, str] = {
    "cython": "fastmlp.backends.cython",
    "numba": "fastmlp.backends.numba",
    "numpy": "fastmlp.backends.reference",
}
_AUTO_ORDER = ("cython", "numba", "numpy")
_cache: dict[str, Backend] = {}
_errors: dict[str, str] = {}
_fallback_logged = False


class Backend:
    """Validating front of one raw kernel module.

    Parameters
    ----------
    module : module
        Implements ``forward``, ``output_delta``, ``hidden_delta``,
        ``inplace_update``, ``dropout_mask``, ``forward_network`` and
        ``train_epoch`` on validated inputs.
    """

    def __init__(self, module: ModuleType) -> None:
        self.name: str = module.NAME
        self._raw = module

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    @property
    def raw(self) -> ModuleType:
        """The unchecked kernel module (for code that has validated its inputs already)."""
        return self._raw

    # ------------------------------------------------------------------ kernels
    def forward(self, A: np.ndarray, W: np.ndarray, b: np.ndarray, act: str, out: np.ndarray | None = None) -> np.ndarray:
        """``act(A @ W.T + b)``.

        Parameters
        ----------
        A : ndarray (n_samples, n_in)
        W : ndarray (n_out, n_in)
        b : ndarray (n_out,)
        act : {'identity', 'sigmoid', 'tanh', 'relu', 'softmax'}
        out : ndarray (n_samples, n_out), optional

        Returns
        -------
        ndarray (n_samples, n_out)
        """
        dt = _float_dtype(W, "W")
        W = V.as_kernel_array(W, "W", dt, 2)
        A = V.as_kernel_array(A, "A", dt, 2, (None, W.shape[1]))
        b = V.as_kernel_array(b, "b", dt, 1, (W.shape[0],))
        code = ACT_CODES[V.check_act_code(act)]
        out = _out(out, "out", dt, (A.shape[0], W.shape[0]))
        A, W, b = (V.detached(a, [out]) for a in (A, W, b))
        if out.size:
            self._raw.forward(A, W, b, code, out)
        return out

    def output_delta(
        self, A: np.ndarray, y: np.ndarray, output: str, loss: str, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, int]:
        """Output-layer delta from integer labels.

        Parameters
        ----------
        A : ndarray (n_samples, n_classes)
            Output activations.
        y : array of int (n_samples,)
            Class indices.
        output : {'sigmoid', 'softmax', 'identity'}
        loss : {'mse', 'ce'}
        out : ndarray (n_samples, n_classes), optional

        Returns
        -------
        delta : ndarray (n_samples, n_classes)
        loss_sum : float
            Data loss summed over the samples.
        n_correct : int
        """
        dt = _float_dtype(A, "A")
        A = V.as_kernel_array(A, "A", dt, 2)
        V.check_activation(output, "output", output=True)
        V.check_output_loss(output, loss)
        yy = V.as_labels(y, A.shape[0], A.shape[1])
        out = _out(out, "out", dt, A.shape)
        A = V.detached(A, [out])
        if A.size == 0:
            return out, 0.0, 0
        loss_sum, n_correct = self._raw.output_delta(A, yy, ACT_CODES[output], LOSS_CODES[loss], out)
        return out, float(loss_sum), int(n_correct)

    def hidden_delta(
        self,
        D_next: np.ndarray,
        W_next: np.ndarray,
        A: np.ndarray,
        act: str,
        mask: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(D_next @ W_next) * mask * act'(A)``.

        Parameters
        ----------
        D_next : ndarray (n_samples, n_next)
        W_next : ndarray (n_next, n_units)
        A : ndarray (n_samples, n_units)
            The layer's activation output (before dropout).
        act : {'identity', 'sigmoid', 'tanh', 'relu'}
        mask : ndarray (n_samples, n_units), optional
            Dropout multipliers used in the forward pass.
        out : ndarray (n_samples, n_units), optional
        """
        dt = _float_dtype(W_next, "W_next")
        W_next = V.as_kernel_array(W_next, "W_next", dt, 2)
        D_next = V.as_kernel_array(D_next, "D_next", dt, 2, (None, W_next.shape[0]))
        A = V.as_kernel_array(A, "A", dt, 2, (D_next.shape[0], W_next.shape[1]))
        V.check_activation(act, "act")
        if mask is not None:
            mask = V.as_kernel_array(mask, "mask", dt, 2, A.shape)
        out = _out(out, "out", dt, A.shape)
        W_next, D_next, A = (V.detached(a, [out]) for a in (W_next, D_next, A))
        if mask is not None:
            mask = V.detached(mask, [out])
        if out.size:
            self._raw.hidden_delta(D_next, W_next, A, ACT_CODES[act], mask, out)
        return out

    def inplace_update(
        self, W: np.ndarray, b: np.ndarray, D: np.ndarray, A: np.ndarray, lr: float, l2: float = 0.0, l1: float = 0.0
    ) -> None:
        """SGD step on ``W (n_out, n_in)`` and ``b (n_out,)`` in place from ``D (n, n_out)`` and ``A (n, n_in)``.

        ``W <- max(0, 1 - lr*l2) W - lr*l1*sign(W) - lr D.T @ A``; ``b <- b - lr D.sum(0)``.
        """
        V.check_parameters([W], [b], finite=True)
        dt = W.dtype
        D = V.as_kernel_array(D, "D", dt, 2, (None, W.shape[0]), not_in=[W, b])
        A = V.as_kernel_array(A, "A", dt, 2, (D.shape[0], W.shape[1]), not_in=[W, b])
        lr = V.check_float(lr, "lr", low=0.0)
        l2 = V.check_float(l2, "l2", low=0.0)
        l1 = V.check_float(l1, "l1", low=0.0)
        self._raw.inplace_update(W, b, D, A, lr, l2, l1)

    def dropout_mask(
        self,
        seed: int,
        step: int,
        layer: int,
        n_rows: int,
        n_units: int,
        keep: float,
        scale: float | None = None,
        dtype: object = "float64",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Counter-based dropout multipliers ``(n_rows, n_units)``: ``scale`` (default ``1/keep``) or 0."""
        seed = V.check_seed(seed)
        step = V.check_int(step, "step", minimum=0, maximum=_MAX_COUNTER)
        layer = V.check_int(layer, "layer", minimum=0, maximum=_MAX_COUNTER)
        n_rows = V.check_int(n_rows, "n_rows", minimum=0)
        n_units = V.check_int(n_units, "n_units", minimum=0)
        keep = V.check_float(keep, "keep", low=0.0, high=1.0, low_open=True)
        scale = 1.0 / keep if scale is None else V.check_float(scale, "scale", low=0.0)
        dt = V.check_dtype(dtype)
        out = _out(out, "out", dt, (n_rows, n_units))
        if out.size:
            self._raw.dropout_mask(seed or 0, step, layer, keep_threshold(keep), scale, out)
        return out

    def forward_network(
        self, X: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], hidden_act: str, output_act: str
    ) -> np.ndarray:
        """Output activations ``(n_samples, n_classes)`` of a whole network on ``X (n_samples, n_in)``."""
        weights, biases = _layer_list(weights, "weights"), _layer_list(biases, "biases")
        dt = V.check_parameters(weights, biases, finite=True)
        X = V.as_kernel_array(X, "X", dt, 2, (None, weights[0].shape[1]))
        V.check_activation(hidden_act, "hidden_act")
        V.check_activation(output_act, "output_act", output=True)
        out = np.empty((X.shape[0], weights[-1].shape[0]), dtype=dt)
        if out.size:
            self._raw.forward_network(X, weights, biases, ACT_CODES[hidden_act], ACT_CODES[output_act], out)
        return out

    def train_epoch(
        self,
        X: np.ndarray,
        y: np.ndarray,
        order: np.ndarray,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray],
        lrs: np.ndarray | float,
        *,
        hidden_act: str = "sigmoid",
        output_act: str = "sigmoid",
        loss: str = "mse",
        batch_size: int = 100,
        l2: float = 0.0,
        l1: float = 0.0,
        keep: Sequence[float] | None = None,
        inverted: bool = True,
        seed: int = 0,
        step0: int = 0,
    ) -> tuple[float, int]:
        """One epoch of minibatch SGD, updating ``weights`` and ``biases`` in place.

        Parameters
        ----------
        X : ndarray (n_samples, n_in)
            Features in the network's dtype.
        y : array of int (n_samples,)
            Class indices.
        order : array of int (n_used,)
            Row indices in visiting order; ``n_used <= n_samples`` (leave out rows
            to drop a partial last batch).
        weights, biases : lists of ndarray
            ``W (n_out, n_in)`` and ``b (n_out,)`` per layer, updated in place.
        lrs : float or ndarray (n_steps,)
            Learning rate of each minibatch step, ``n_steps = ceil(n_used / batch_size)``.
        keep : sequence of float (n_layers,), optional
            Keep probability of each layer's input (1 = no dropout).
        inverted : bool
            Scale kept units by ``1/keep`` at training time (inverted dropout).
        seed, step0 : int
            Dropout hash seed and the global step number of the first minibatch.

        Returns
        -------
        loss_sum : float
            Data loss summed over the epoch's samples (before each update).
        n_correct : int
        """
        weights, biases = _layer_list(weights, "weights"), _layer_list(biases, "biases")
        dt = V.check_parameters(weights, biases, finite=True)
        L = len(weights)
        X = V.as_kernel_array(X, "X", dt, 2, (None, weights[0].shape[1]), not_in=weights + biases)
        V.check_activation(hidden_act, "hidden_act")
        V.check_activation(output_act, "output_act", output=True)
        V.check_output_loss(output_act, loss)
        yy = V.as_labels(y, X.shape[0], weights[-1].shape[0])
        order = _as_order(order, X.shape[0])
        batch_size = V.check_int(batch_size, "batch_size", minimum=1)
        n_steps = -(-order.shape[0] // batch_size)
        # a batch larger than the epoch is the whole epoch (and must fit the kernels' C integers)
        batch_size = min(batch_size, max(order.shape[0], 1))
        lrs_arr = _as_lrs(lrs, n_steps)
        l2 = V.check_float(l2, "l2", low=0.0)
        l1 = V.check_float(l1, "l1", low=0.0)
        if keep is not None and (isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence | np.ndarray)):
            raise TypeError(f"keep must be a sequence of {L} keep probabilities, got {type(keep).__name__}")
        keeps = [1.0] * L if keep is None else [V.check_float(k, "keep", low=0.0, high=1.0, low_open=True) for k in keep]
        if len(keeps) != L:
            raise ValueError(f"keep needs one probability per layer input ({L}), got {len(keeps)}")
        thresholds = np.array([keep_threshold(k) for k in keeps], dtype=np.int64)
        scales = np.array([1.0 / k if inverted else 1.0 for k in keeps], dtype=np.float64)
        thresholds[thresholds >= (1 << KEEP_BITS)] = 1 << KEEP_BITS
        seed = V.check_seed(seed) or 0
        step0 = V.check_int(step0, "step0", minimum=0, maximum=_MAX_COUNTER - n_steps)
        if n_steps == 0:
            return 0.0, 0
        loss_sum, n_correct = self._raw.train_epoch(
            X, yy, order, weights, biases, lrs_arr,
            ACT_CODES[hidden_act], ACT_CODES[output_act], LOSS_CODES[loss],
            batch_size, l2, l1, thresholds, scales, seed, step0,
        )  # fmt: skip
        return float(loss_sum), int(n_correct)


def _float_dtype(a: object, name: str) -> np.dtype:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    return V.check_dtype(a.dtype, f"{name}.dtype")


def _layer_list(seq: object, name: str) -> list[np.ndarray]:
    if isinstance(seq, np.ndarray) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list of numpy arrays (one per layer), got {type(seq).__name__}")
    return list(seq)


def _as_lrs(lrs: object, n_steps: int) -> np.ndarray:
    """A fresh float64 ``(n_steps,)`` array of finite, non-negative learning rates."""
    if isinstance(lrs, (str, bytes)):
        raise TypeError(f"lrs must be a float or an array of floats, got {type(lrs).__name__}")
    try:
        arr = np.asarray(lrs)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"lrs must be a float or an array of floats: {exc}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"lrs must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n_steps):
        raise ValueError(f"lrs must be a float or one learning rate per minibatch step ({n_steps}), got shape {arr.shape}")
    # always a copy: the kernels must not see a learning rate change under them (e.g. a view of a bias)
    out = np.array(np.broadcast_to(arr.astype(np.float64), (n_steps,)), dtype=np.float64, order="C")
    if not (np.isfinite(out).all() and (out >= 0).all()):
        raise ValueError("lrs must be finite, non-negative learning rates, one per minibatch step")
    return out


def _out(out: np.ndarray | None, name: str, dt: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dt)
    return V.check_out(out, name, dt, shape)


def _as_order(order: object, n: int) -> np.ndarray:
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"order must be a 1-D integer array of row indices, got {arr.dtype} shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"order must index rows of X in [0, {n}), got values in [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _load(name: str) -> Backend:
    if name in _cache:
        return _cache[name]
    if name in _errors:
        raise ImportError(f"backend {name!r} is not available: {_errors[name]}")
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:
        _errors[name] = f"{type(exc).__name__}: {exc}"
        raise ImportError(f"backend {name!r} is not available: {_errors[name]}") from exc
    _cache[name] = Backend(module)
    return _cache[name]


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, fastest first."""
    names = []
    for name in _AUTO_ORDER:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def backend_errors() -> dict[str, str]:
    """Why each unavailable backend failed to load (name -> error)."""
    available_backends()
    return dict(_errors)


def get_backend(name: str | Backend | None = "auto") -> Backend:
    """Return the backend called ``name``.

    Parameters
    ----------
    name : {'auto', 'cython', 'numba', 'numpy'} or Backend or None
        ``None`` and ``'auto'`` read ``$FASTMLP_BACKEND`` (default ``'auto'``);
        ``'auto'`` is the fastest available, logging once when it has to fall
        back past an unavailable compiled backend.

    Raises
    ------
    ValueError
        For an unknown name.
    ImportError
        When the named backend cannot load here (the message says why).
    """
    global _fallback_logged
    if isinstance(name, Backend):
        return name
    if name is None or name == "auto":
        name = os.environ.get("FASTMLP_BACKEND", "auto") or "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    name = name.lower()
    if name == "reference":
        name = "numpy"
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, _MODULES))}")
    if name != "auto":
        return _load(name)
    skipped = []
    for cand in _AUTO_ORDER:
        try:
            be = _load(cand)
        except ImportError:
            skipped.append(cand)
            continue
        if skipped and not _fallback_logged:
            _fallback_logged = True
            reasons = "; ".join(f"{s}: {_errors[s]}" for s in skipped)
            logger.warning("fastmlp: backend 'auto' falls back to %r (%s)", cand, reasons)
        return be
    raise ImportError("no fastmlp backend could be loaded")  # numpy always loads; unreachable in practice
