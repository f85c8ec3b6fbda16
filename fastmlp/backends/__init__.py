"""Backend registry: the kernel contract behind validating entry points.

A *raw* backend is a module implementing the functions of
:mod:`fastmlp.backends.reference` on validated, C-contiguous arrays with
integer activation codes.  :class:`Backend` wraps one and is the only public
road into its kernels: every method validates dtypes, shapes, contiguity and
hyper-parameters, allocates output buffers when none are given, then calls the
raw kernel.

``"auto"`` picks the fastest backend that loads (cython, then numba, then
numpy); ``FASTMLP_BACKEND`` overrides the default.  When "auto" has to fall
back, the reason is logged once.  It also watches the first call of each
kernel (per dtype) of the backend it stands on: a compiled backend that
imported but fails there (a library it cannot load, a kernel Numba cannot
compile) is then given up for the next one, once and with the reason logged;
the call is repeated on the next backend (parameters restored first) and
:func:`backend_errors` reports the failure from then on.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends import _chunked
from fastmlp.backends.contract import (
    ACT_CODES,
    LOSS_CODES,
    EpochPlan,
    EpochStats,
    OptimizerState,
    Params,
    keep_threshold,
    plan_epoch,
)

#: dropout counters (seed aside) are hashed as 64-bit integers; the Numba kernels take them as int64
_MAX_COUNTER = 2**63 - 1

__all__ = [
    "AutoBackend",
    "Backend",
    "EpochPlan",
    "EpochStats",
    "OptimizerState",
    "Params",
    "PreparedEpochs",
    "available_backends",
    "backend_errors",
    "get_backend",
    "plan_epoch",
]

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
_auto: AutoBackend | None = None
_auto_lock = threading.Lock()
#: the raw kernels whose first call per dtype 'auto' watches
_WATCHED = frozenset({"forward", "output_delta", "hidden_delta", "inplace_update", "dropout_mask", "forward_network",
                      "forward_network_checked", "train_epoch"})  # fmt: skip
#: errors about the arguments rather than the backend: 'auto' does not fall back on them
_CALLER_ERRORS = (ValueError, TypeError, ArithmeticError, MemoryError)


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
        act : {'identity', 'sigmoid', 'tanh', 'relu', 'softmax', 'exp'}
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
        self, A: np.ndarray, Y: np.ndarray, output: str, loss: str, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, int]:
        """Output-layer delta, unweighted (``c_i = 1/n``), from integer labels or a dense target matrix.

        Parameters
        ----------
        A : ndarray (n_samples, n_classes)
            Output activations.
        Y : ndarray
            Class indices ``(n_samples,)`` (0/1 for one unit), or dense targets ``(n_samples, n_classes)``
            of ``A``'s dtype.
        output : {'sigmoid', 'softmax', 'identity', 'exp'}
        loss : {'mse', 'ce', 'squared_error', 'poisson'}
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
        out = _out(out, "out", dt, A.shape)
        if isinstance(Y, np.ndarray) and Y.ndim == 2 and Y.dtype.kind == "f":
            Yc = V.as_kernel_array(Y, "Y", dt, 2, A.shape, not_in=[out])
        else:
            Yc = V.detached(V.as_labels(Y, A.shape[0], max(A.shape[1], 2), "Y"), [out])
        A = V.detached(A, [out])
        if A.size == 0:
            return out, 0.0, 0
        loss_sum, n_correct = self._raw.output_delta(A, Yc, ACT_CODES[output], LOSS_CODES[loss], out)
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
            self._forward_network_into(X, weights, biases, hidden_act, output_act, out)
        return out

    def _forward_network_into(self, X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
                              hidden_act: str, output_act: str, out: np.ndarray) -> None:  # fmt: skip
        """:meth:`forward_network` into ``out`` for callers that validated everything already (``Network``'s
        inference, ``compat``): the one road from above ``backends/`` into the raw whole-network kernel."""
        self._raw.forward_network(X, weights, biases, ACT_CODES[hidden_act], ACT_CODES[output_act], out)

    def _forward_network_checked(self, X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
                                 hidden_act: str, output_act: str, out: np.ndarray) -> bool:  # fmt: skip
        """:meth:`_forward_network_into` plus the test of every weight and bias for NaN and infinity (a value
        can change in place between calls): False, with ``out`` meaningless, when one holds such a value.

        A backend whose raw module has ``forward_network_checked`` tests in the same pass (the Cython SIMD
        builds fold the test into the first rows' products); the others scan first.
        """
        fused = getattr(self._raw, "forward_network_checked", None)
        if fused is not None:
            return bool(fused(X, weights, biases, ACT_CODES[hidden_act], ACT_CODES[output_act], out))
        if not all(V.all_finite(a) for a in (*weights, *biases)):
            return False
        self._forward_network_into(X, weights, biases, hidden_act, output_act, out)
        return True

    def prepare(self, X: np.ndarray, Y: np.ndarray, plan: EpochPlan, *,
                sample_weight: np.ndarray | None = None) -> PreparedEpochs:  # fmt: skip
        """Validate the data of a run of epochs once; the result runs epochs on it.

        Parameters
        ----------
        X : ndarray (n_samples, n_in)
            Features in the plan's dtype.
        Y : ndarray
            Integer class labels ``(n_samples,)`` (``plan.target == 'labels'``; 0/1 for one
            output unit) or a dense target matrix ``(n_samples, n_out)`` of the plan's dtype.
        plan : EpochPlan
            From :func:`fastmlp.backends.contract.plan_epoch`.
        sample_weight : ndarray (n_samples,), optional
            Non-negative row weights.

        Returns
        -------
        PreparedEpochs
            ``epochs(order, params, state, lrs, step0) -> EpochStats``.
        """
        if not isinstance(plan, EpochPlan):
            raise TypeError(f"plan must be an EpochPlan from fastmlp.backends.contract.plan_epoch, got {type(plan).__name__}")
        dt = np.dtype(plan.dtype)
        X = V.as_kernel_array(X, "X", dt, 2, (None, plan.sizes[0]))
        n = X.shape[0]
        k = plan.sizes[-1]
        if plan.target == "labels":
            Yc = V.as_labels(Y, n, max(k, 2), "Y")
        else:
            Yc = V.as_kernel_array(Y, "Y", dt, 2, (n, k))
        sw = None if sample_weight is None else V.as_sample_weight(sample_weight, n)
        return PreparedEpochs(self, X, Yc, plan, sw)

    def train_epoch(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        order: np.ndarray,
        params: Params | tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
        state: OptimizerState | None,
        lrs: np.ndarray | float,
        plan: EpochPlan,
        step0: int = 0,
        *,
        sample_weight: np.ndarray | None = None,
    ) -> EpochStats:
        """One training epoch, updating the parameters and the optimizer state in place.

        Parameters
        ----------
        X, Y, plan, sample_weight
            As :meth:`prepare`.
        order : array of int (n_used,)
            Row indices in visiting order; ``n_used <= n_samples``.
        params : (weights, biases)
            ``W (n_out, n_in)`` and ``b (n_out,)`` per layer, matching ``plan.sizes``; updated in place.
        state : OptimizerState or None
            The optimizer's arrays (``OptimizerState.zeros(plan.optimizer, plan.sizes, plan.dtype)``);
            ``None`` for plain SGD.
        lrs : float or ndarray (n_steps,)
            Learning rate of each minibatch step, ``n_steps = ceil(n_used / plan.batch_size)``.
        step0 : int
            Global step number of the first minibatch (dropout masks).

        Returns
        -------
        EpochStats
            ``(loss_sum, penalty_sum, n_correct)`` (see :mod:`fastmlp.backends.contract`).
        """
        return self.prepare(X, Y, plan, sample_weight=sample_weight)(order, params, state, lrs, step0)


class PreparedEpochs:
    """Epochs over validated data: ``epochs(order, params, state, lrs, step0) -> EpochStats``.

    Made by :meth:`Backend.prepare`.  Each call checks what changes between
    epochs (the order, the rates, the parameters and state: shapes, dtype,
    finiteness, memory apart from the data), then runs one compiled epoch.
    """

    def __init__(self, backend: Backend, X: np.ndarray, Y: np.ndarray, plan: EpochPlan, sw: np.ndarray | None) -> None:
        self.backend, self.X, self.Y, self.plan, self.sw = backend, X, Y, plan, sw

    def __repr__(self) -> str:
        return f"PreparedEpochs({self.backend.name!r}, {self.X.shape[0]} rows, {self.plan.optimizer!r})"

    def __call__(self, order: np.ndarray, params: Params | tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
                 state: OptimizerState | None, lrs: np.ndarray | float, step0: int = 0) -> EpochStats:  # fmt: skip
        plan = self.plan
        weights, biases = _params(params)
        V.check_parameters(weights, biases, np.dtype(plan.dtype), finite=True, sizes=plan.sizes)
        state = _check_state(state, plan, weights, biases)
        written = [*weights, *biases, *state.arrays()]
        X, Y = V.detached(self.X, written), V.detached(self.Y, written)
        sw = None if self.sw is None else V.detached(self.sw, written)
        order = V.detached(_as_order(order, X.shape[0]), written)
        n_steps = plan.n_steps(order.shape[0])
        lrs_arr = _as_lrs(lrs, n_steps)
        if sw is not None and order.size:
            sums = np.add.reduceat(sw[order], np.arange(0, order.shape[0], plan.batch_size))
            if (sums <= 0).any():
                bad = int(np.argmax(sums <= 0))
                raise ValueError(f"sample_weight sums to 0 over minibatch {bad} of this epoch; give every "
                                 "minibatch some weight (or drop the zero-weight rows)")  # fmt: skip
        step0 = V.check_int(step0, "step0", minimum=0, maximum=_MAX_COUNTER - n_steps)
        if n_steps == 0:
            return EpochStats(0.0, 0.0, 0)
        if _chunked.needs_chunks(plan, order.shape[0]):  # bounded memory for full-batch epochs of many rows
            ls, ps, nc = _chunked.chunked_epoch(self.backend.raw, X, Y, order, weights, biases, state, lrs_arr, plan,
                                                step0, sw)  # fmt: skip
        else:
            ls, ps, nc = self.backend.raw.train_epoch(X, Y, order, weights, biases, state, lrs_arr, plan, step0, sw)
        return EpochStats(float(ls), float(ps), int(nc))


def _params(params: object) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if isinstance(params, (str, bytes, np.ndarray)) or not isinstance(params, Sequence) or len(params) != 2:
        raise TypeError("params must be a pair (weights, biases) of lists of numpy arrays")
    return _layer_list(params[0], "weights"), _layer_list(params[1], "biases")


def _check_state(state: OptimizerState | None, plan: EpochPlan, weights: list[np.ndarray],
                 biases: list[np.ndarray]) -> OptimizerState:  # fmt: skip
    """The optimizer state for ``plan``: right kind, shapes, dtype, writeable and apart from the parameters."""
    if state is None:
        if plan.n_slots:
            raise ValueError(f"optimizer {plan.optimizer!r} needs its state: pass "
                             "OptimizerState.zeros(plan.optimizer, plan.sizes, plan.dtype)")  # fmt: skip
        return OptimizerState(plan.optimizer)
    if not isinstance(state, OptimizerState):
        raise TypeError(f"state must be an OptimizerState or None, got {type(state).__name__}")
    if state.kind != plan.optimizer or len(state.weights) != plan.n_slots or len(state.biases) != plan.n_slots:
        raise ValueError(f"state is for optimizer {state.kind!r} with {len(state.weights)} slots; "
                         f"the plan's optimizer is {plan.optimizer!r} with {plan.n_slots}")  # fmt: skip
    V.check_int(state.t, "state.t", minimum=0, maximum=_MAX_COUNTER)
    dt = np.dtype(plan.dtype)
    for s in range(plan.n_slots):
        V.check_parameters(state.weights[s], state.biases[s], dt, finite=True, sizes=plan.sizes,
                           what=f"state slot {s}")  # fmt: skip
    arrays = state.arrays()
    params = [*weights, *biases]
    for i, a in enumerate(arrays):
        for p in params:
            if a.size and p.size and np.may_share_memory(a, p):
                raise ValueError("the optimizer state shares memory with the parameters; pass separate arrays")
        for b in arrays[i + 1 :]:
            if a.size and b.size and np.may_share_memory(a, b):
                raise ValueError("two optimizer state arrays share memory; pass separate arrays")
    return state


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
    global _fallback_logged, _auto
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
    if _auto is not None:
        return _auto
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
        with _auto_lock:
            if _auto is None:
                _auto = AutoBackend(be)
        return _auto
    raise ImportError("no fastmlp backend could be loaded")  # numpy always loads; unreachable in practice


class AutoBackend(Backend):
    """``get_backend('auto')``: the fastest backend that loads, given up for the next one if it fails when
    first used.

    It validates as every :class:`Backend` and runs the kernels of the backend it stands on (``name`` is that
    backend's).  Until a kernel has run once for a dtype, an exception from it other than a ``ValueError``,
    ``TypeError``, ``ArithmeticError`` or ``MemoryError`` (which concern the arguments) marks the backend as
    failed (:func:`backend_errors` says why, :func:`available_backends` leaves it out), logs the fallback
    once, restores the parameters a training call may have changed, and repeats the call on the next backend
    of the order; the NumPy reference, last, is never given up.

    Parameters
    ----------
    backend : Backend
        The backend to start on.
    """

    def __init__(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a Backend, got {type(backend).__name__}")
        self._current = backend
        self._proven: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._guard = _FirstUseGuard(self)

    @property
    def name(self) -> str:  # type: ignore[override]
        """The name of the backend now in use."""
        return self._current.name

    @property
    def _raw(self) -> ModuleType:  # type: ignore[override]
        return self._guard  # type: ignore[return-value]

    @property
    def current(self) -> Backend:
        """The backend now in use."""
        return self._current

    def _call(self, fn: str, *args: object) -> object:
        be = self._current
        key = (be.name, fn, _dtype_name(args))
        if key in self._proven:
            return getattr(be.raw, fn)(*args)
        saved = _snapshot(fn, args)
        try:
            out = getattr(be.raw, fn)(*args)
        except _CALLER_ERRORS:
            raise
        except Exception as exc:
            if not self._give_up(be, fn, exc):
                raise
            _restore(saved)
            return self._call(fn, *args)
        self._proven.add(key)
        return out

    def _give_up(self, be: Backend, fn: str, exc: Exception) -> bool:
        """Move past ``be`` after its first ``fn`` raised ``exc``; False when there is nothing to move to."""
        with self._lock:
            if self._current is not be:  # another thread moved on already
                return True
            if be.name not in _AUTO_ORDER or be.name == _AUTO_ORDER[-1]:
                return False
            reason = f"failed at its first {fn}: {type(exc).__name__}: {exc}"
            nxt = None
            for cand in _AUTO_ORDER[_AUTO_ORDER.index(be.name) + 1 :]:
                try:
                    nxt = _load(cand)
                    break
                except ImportError:
                    continue
            if nxt is None:
                return False
            _errors[be.name] = reason
            _cache.pop(be.name, None)
            logger.warning("fastmlp: backend 'auto' falls back from %r to %r: %r %s", be.name, nxt.name, be.name, reason)
            self._current = nxt
            return True


class _FirstUseGuard:
    """What :attr:`AutoBackend.raw` returns: the raw module of the backend in use, its watched kernels
    routed through :meth:`AutoBackend._call`; setting an attribute sets it on that module."""

    def __init__(self, auto: AutoBackend) -> None:
        object.__setattr__(self, "_auto", auto)

    def __getattr__(self, name: str) -> object:
        auto = object.__getattribute__(self, "_auto")
        attr = getattr(auto.current.raw, name)
        if name in _WATCHED and callable(attr):
            return functools.partial(auto._call, name)
        return attr

    def __setattr__(self, name: str, value: object) -> None:
        setattr(object.__getattribute__(self, "_auto").current.raw, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_auto").current.raw, name)

    def __repr__(self) -> str:
        return f"<raw kernels of {object.__getattribute__(self, '_auto').current.name!r}, first calls watched>"


def _dtype_name(args: tuple) -> str:
    for a in args:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            return a.dtype.name
    return ""


def _snapshot(fn: str, args: tuple) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Copies of what a watched kernel writes besides its output buffer (the parameters and the optimizer
    state of a training call), to undo a failed first call with."""
    if fn == "train_epoch":
        weights, biases, state = args[3], args[4], args[5]
        return [(a, a.copy()) for a in (*weights, *biases, *state.arrays())] + [(state, state.t)]  # type: ignore[list-item]
    if fn == "inplace_update":
        return [(args[0], args[0].copy()), (args[1], args[1].copy())]  # type: ignore[attr-defined]
    return None


def _restore(saved: list | None) -> None:
    for target, value in saved or ():
        if isinstance(target, np.ndarray):
            target[...] = value
        else:  # the optimizer state's step count
            target.t = value
