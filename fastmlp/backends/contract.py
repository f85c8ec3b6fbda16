"""The kernel contract shared by every backend: codes, masks, losses, the epoch plan and the raw protocol.

Every backend (``reference``, ``cython``, ``numba``) implements the functions of
:class:`RawBackend` with the same semantics; :mod:`fastmlp.backends.reference`
is the executable spec.  This module holds what they must agree on bit for
bit -- the integer codes compiled kernels switch on, the counter-based
dropout masks -- and the one road into a training epoch: :func:`plan_epoch`
turns validated options into a frozen :class:`EpochPlan`, and every caller
(fit, lr_find, compat, mc_dropout, bench) hands that plan to
``train_epoch(X, Y, order, params, state, lrs, plan, step0)``.
Nothing above ``backends/`` builds kernel arguments by hand.

Layout
------
``W`` is ``(n_out, n_in)`` and ``b`` is ``(n_out,)``, C-contiguous, one float
dtype per network.  ``A`` is a layer input ``(n_samples, n_in)``.

Targets (``plan.target``)
-------------------------
``labels``: int64 class indices ``y (n,)``; with ``k >= 2`` output units the
target of row ``i`` is ``onehot(y_i)`` (never materialised), with one output
unit it is ``y_i`` itself (0 or 1: binary logistic regression).  ``dense``: a
float target matrix ``Y (n, k)`` of the network's dtype (regression, several
outputs, multi-label indicators, soft labels).  Below ``t`` is the target row.

Output delta and data loss (``G = dL/dZ`` of the output pre-activation)
-----------------------------------------------------------------------
A minibatch ``B`` of ``n_b`` rows has weights ``w_i`` (1 without sample
weights) and ``s = sum_B w_i``.  With ``c_i = w_i / s``:

============== ============ ======================================= =========================================
loss           output       delta row ``G_i``                        per-sample loss ``l_i`` (float64)
============== ============ ======================================= =========================================
``mse``        sigmoid      ``g * a * (1 - a)``, ``g = 2 c_i (a-t)`` ``mean_j (a_j - t_j)^2`` (the notebook's)
``mse``        softmax      ``a * (g - sum(g * a))``                 same
``mse``        identity     ``g``                                    same
``squared_error`` identity  ``c_i (a - t)``                          ``1/2 mean_j (a_j - t_j)^2`` (scikit-learn)
``ce``         softmax      ``c_i (a - t)``                          ``-sum_j t_j log p_j``
``ce``         sigmoid      ``c_i (a - t)``                          ``-sum_j [t_j log p_j + (1-t_j) log(1-p_j)]``
``poisson``    exp          ``c_i (a - t)``                          ``sum_j [t_j log(t_j/a_j) - t_j + a_j]``
============== ============ ======================================= =========================================

``p = clip(a, eps, 1 - eps)`` with ``eps`` the machine epsilon of the
network's dtype (scikit-learn's ``log_loss`` clip); ``0 log 0 = 0``.  The
minibatch adds ``n_b * sum_B w_i l_i / s`` to the epoch's ``loss_sum``
(``sum_B l_i`` when unweighted), scikit-learn's ``batch_loss * batch_len``.

Penalties and the update
------------------------
``G_W = G^T A`` (the layer's input after dropout), ``G_b = sum_B G``.
scikit-learn's ``alpha`` adds ``alpha / s * W`` to ``G_W`` (and
``n_b * alpha/2 * sum_l ||W_l||^2 / s`` to the epoch's ``penalty_sum``, from
the weights before the step); the lecture's ``l2`` is decoupled decay,
``W <- max(0, 1 - lr l2) W``, and ``l1`` subtracts ``lr l1 sign(W)`` (both
from the weights before the step).  Biases are never penalized.  With
``u`` the optimizer's update of ``(G_W, G_b)`` at step rate ``lr``:
``W <- max(0, 1 - lr l2) W - lr l1 sign(W) + u_W`` and ``b <- b + u_b``.

==============  ===========================================================================
optimizer       update ``u`` of a parameter with gradient ``g`` (state updated in place)
==============  ===========================================================================
``sgd``         ``u = -lr g``
``momentum``    ``v = mu v - lr g``; ``u = v`` (scikit-learn's SGD with momentum)
``nesterov``    ``v = mu v - lr g``; ``u = mu v - lr g`` (scikit-learn's Nesterov)
``adam``        ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``; with ``c1 = 1 - b1^t``,
                ``c2 = 1 - b2^t``: ``u = -lr sqrt(c2)/c1 * m / (sqrt(v) + eps)`` (scikit-learn),
                or with ``eps_mode='torch'``: ``u = -(lr/c1) * m / (sqrt(v)/sqrt(c2) + eps)``
``adamw``       ``adam`` with ``eps_mode='torch'``; its weight decay is the decoupled ``l2``
``gradient``    no update: ``G_W, G_b`` are written to the state (for L-BFGS)
==============  ===========================================================================

``t`` is the optimizer's step count: step ``i`` of an epoch uses
``t = state.t + i + 1``, and ``state.t`` grows by the epoch's steps.

Epoch
-----
For step ``i`` the rows ``order[i*bs:(i+1)*bs]`` (the last minibatch may be
partial) are gathered, go forward (with input dropout on layer input ``l``
when ``thresholds[l] < 2**24``), give the output delta, then every hidden
delta with the weights before the step, then every layer's update with
rate ``lrs[i]``.  Dropout masks use step ``step0 + i``.  The epoch returns
:class:`EpochStats`: the data loss sum, the ``alpha`` penalty sum (both as
above, measured before each update) and the rows whose prediction matched:
the arg-max equals the label (for one output unit: ``a > 0.5`` equals
``y == 1``); for dense targets and a sigmoid output every unit's ``a > 0.5``
equals ``t > 0.5``, for other outputs the arg-maxes agree (one unit: ``a > 0.5``
equals ``t > 0.5``).

Dropout masks (counter-based, identical on every backend)
---------------------------------------------------------
With ``mix64`` the splitmix64 finalizer and ``G = 0x9E3779B97F4A7C15``, all
arithmetic modulo 2**64::

    key      = mix64(mix64(seed + G * (layer + 1)) + G * (step + 1))
    h[r, u]  = mix64(key + G * (r * n_units + u + 1))
    keep[r, u] = (h[r, u] >> 40) < floor(keep * 2**24)

``layer`` is the index of the layer whose *input* is masked (0 = the
network's input, ``l`` = the output of hidden layer ``l``), ``r`` the row
within the minibatch, ``u`` the unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

#: integer codes of the activations, as the compiled kernels switch on them
ACT_CODES: dict[str, int] = {"identity": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "softmax": 4, "exp": 5}
#: activations allowed on hidden layers
HIDDEN_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu", "identity")
#: activations allowed on the output layer
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax", "identity", "exp")
#: integer codes of the losses
LOSS_CODES: dict[str, int] = {"mse": 0, "ce": 1, "squared_error": 2, "poisson": 3}
#: (output activation, loss) pairs that have a delta kernel
VALID_OUTPUT_LOSS: frozenset[tuple[str, str]] = frozenset(
    {
        ("sigmoid", "mse"),
        ("softmax", "mse"),
        ("identity", "mse"),
        ("softmax", "ce"),
        ("sigmoid", "ce"),
        ("identity", "squared_error"),
        ("exp", "poisson"),
    }
)
#: the output activation each loss goes with when none is given
DEFAULT_OUTPUT: dict[str, str] = {"mse": "sigmoid", "ce": "softmax", "squared_error": "identity", "poisson": "exp"}
#: integer codes of the target kinds
TARGET_CODES: dict[str, int] = {"labels": 0, "dense": 1}
#: integer codes of the optimizers (``gradient`` stores the full-batch gradient instead of stepping)
OPTIMIZER_CODES: dict[str, int] = {"sgd": 0, "momentum": 1, "nesterov": 2, "adam": 3, "adamw": 4, "gradient": 5}
#: state slots each optimizer keeps per parameter (velocity; first and second moments; the gradient)
OPTIMIZER_SLOTS: dict[str, int] = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2, "gradient": 1}
#: where Adam's epsilon goes: scikit-learn's ``sqrt(v) + eps`` or PyTorch's ``sqrt(v / c2) + eps``
EPS_MODES: dict[str, int] = {"sklearn": 0, "torch": 1}

#: dtypes a network may use
DTYPES: tuple[str, ...] = ("float32", "float64")
#: the exp of the sigmoid, the softmax and the exp output is taken of at most this (no overflow to inf)
EXP_CAP: dict[str, float] = {"float32": 88.0, "float64": 708.0}

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
#: a uniform draw keeps 24 bits of the hash
KEEP_BITS = 24
#: the dropout threshold of a layer input that is never dropped
NO_DROP = 1 << KEEP_BITS


def log_eps(dtype: object) -> float:
    """Probabilities are clipped to ``[eps, 1 - eps]`` inside a log: the dtype's machine epsilon."""
    return float(np.finfo(np.dtype(dtype)).eps)  # type: ignore[arg-type]


def keep_threshold(keep: float) -> int:
    """Integer threshold for the 24-bit draw: a unit is kept iff ``(h >> 40) < threshold``."""
    return min(math.floor(float(keep) * (1 << KEEP_BITS)), NO_DROP)


def _mix64_int(z: int) -> int:
    """splitmix64 finalizer on one Python int (modulo 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def mask_key(seed: int, step: int, layer: int) -> int:
    """The per-(seed, step, layer) key of the dropout hash, as a Python int in [0, 2**64)."""
    inner = _mix64_int((int(seed) + GOLDEN * (int(layer) + 1)) & MASK64)
    return _mix64_int((inner + GOLDEN * (int(step) + 1)) & MASK64)


def mix64(z: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finalizer on a ``uint64`` array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(MIX1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def mask_bits(seed: int, step: int, layer: int, n_rows: int, n_units: int, keep: float) -> np.ndarray:
    """Boolean keep-mask ``(n_rows, n_units)`` of the counter-based generator."""
    return mask_bits_thr(seed, step, layer, n_rows, n_units, keep_threshold(keep))


def mask_bits_thr(seed: int, step: int, layer: int, n_rows: int, n_units: int, threshold: int,
                  row0: int = 0) -> np.ndarray:  # fmt: skip
    """:func:`mask_bits` from the integer threshold of :func:`keep_threshold`; the rows are those from ``row0``
    of the minibatch (``r = row0 .. row0 + n_rows - 1`` in the counter)."""
    key = np.uint64(mask_key(seed, step, layer))
    counter = np.arange(row0 * n_units + 1, (row0 + n_rows) * n_units + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(key + np.uint64(GOLDEN) * counter)
    return ((h >> np.uint64(40)) < np.uint64(threshold)).reshape(n_rows, n_units)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class EpochPlan:
    """Everything a training epoch needs besides the data, the parameters and the rates; frozen.

    Build it with :func:`plan_epoch`; every field is validated there.  The
    string fields name the choice, the ``*_code`` properties give the
    integers compiled kernels switch on.

    Attributes
    ----------
    sizes : tuple of int
        Layer widths ``(n_in, n_1, ..., n_out)``.
    dtype : {'float32', 'float64'}
    batch_size : int
        Rows per minibatch (the last one of an epoch may be partial).
    hidden, output, loss : str
        Hidden and output activations and the loss (a pair of :data:`VALID_OUTPUT_LOSS`).
    target : {'labels', 'dense'}
    l2, l1 : float
        Decoupled decay per step ``W <- max(0, 1 - lr l2) W`` and the L1 step ``lr l1 sign(W)``.
    alpha : float
        scikit-learn's L2 penalty: ``alpha / s * W`` added to the gradient.
    thresholds : tuple of int
        Dropout keep threshold of each layer's input (:data:`NO_DROP`: never dropped).
    scales : tuple of float
        Multiplier of a kept unit of each layer's input.
    optimizer : str
        One of :data:`OPTIMIZER_CODES`.
    momentum, beta1, beta2, eps : float
        The optimizer's hyper-parameters (unused ones are 0).
    eps_mode : {'sklearn', 'torch'}
        Where Adam's epsilon goes.
    seed : int
        Seed of the dropout masks, in ``[0, 2**64)``.
    """

    sizes: tuple[int, ...]
    dtype: str
    batch_size: int
    hidden: str
    output: str
    loss: str
    target: str = "labels"
    l2: float = 0.0
    l1: float = 0.0
    alpha: float = 0.0
    thresholds: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    optimizer: str = "sgd"
    momentum: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    eps_mode: str = "sklearn"
    seed: int = 0
    _arrays: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    # integer codes, for compiled kernels
    @property
    def hidden_code(self) -> int:
        return ACT_CODES[self.hidden]

    @property
    def output_code(self) -> int:
        return ACT_CODES[self.output]

    @property
    def loss_code(self) -> int:
        return LOSS_CODES[self.loss]

    @property
    def target_code(self) -> int:
        return TARGET_CODES[self.target]

    @property
    def optimizer_code(self) -> int:
        return OPTIMIZER_CODES[self.optimizer]

    @property
    def eps_code(self) -> int:
        return EPS_MODES[self.eps_mode]

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def n_slots(self) -> int:
        """State arrays the optimizer keeps per parameter."""
        return OPTIMIZER_SLOTS[self.optimizer]

    @property
    def delta_scale(self) -> float:
        """Factor of ``c_i (a - t)`` in the output delta: 2 for the notebook's MSE, 1 otherwise."""
        return 2.0 if self.loss == "mse" else 1.0

    @property
    def thresholds_array(self) -> np.ndarray:
        """``thresholds`` as a read-only int64 array ``(n_layers,)``."""
        return self._cached("thr", lambda: np.array(self.thresholds, dtype=np.int64))

    @property
    def scales_array(self) -> np.ndarray:
        """``scales`` as a read-only float64 array ``(n_layers,)``."""
        return self._cached("sc", lambda: np.array(self.scales, dtype=np.float64))

    @property
    def has_dropout(self) -> bool:
        return any(t < NO_DROP for t in self.thresholds)

    def n_steps(self, n_rows: int) -> int:
        """Minibatch steps of an epoch over ``n_rows`` rows."""
        return -(-int(n_rows) // self.batch_size)

    def _cached(self, key: str, make) -> np.ndarray:
        arr = self._arrays.get(key)
        if arr is None:
            arr = make()
            arr.setflags(write=False)
            self._arrays[key] = arr
        return arr

    def replace(self, **changes: object) -> EpochPlan:
        """A copy with some fields changed (validated again by :func:`plan_epoch`)."""
        fields = {k: getattr(self, k) for k in _PLAN_FIELDS}
        fields.update(changes)
        keep = [_threshold_keep(t) for t in fields.pop("thresholds")]
        scales = fields.pop("scales")
        return plan_epoch(**fields, keep=keep, scales=scales)  # type: ignore[arg-type]


_PLAN_FIELDS = ("sizes", "dtype", "batch_size", "hidden", "output", "loss", "target", "l2", "l1", "alpha",
                "thresholds", "scales", "optimizer", "momentum", "beta1", "beta2", "eps", "eps_mode", "seed")  # fmt: skip


def _threshold_keep(t: int) -> float:
    return 1.0 if t >= NO_DROP else t / float(NO_DROP)


def _finite(value: object, name: str, low: float = 0.0, high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and (v > high or (high_open and v == high))):
        bound = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be finite and in {bound}, got {value!r}")
    return v


def plan_epoch(
    sizes: Sequence[int],
    dtype: object,
    *,
    batch_size: int,
    hidden: str,
    output: str,
    loss: str,
    target: str = "labels",
    l2: float = 0.0,
    l1: float = 0.0,
    alpha: float = 0.0,
    keep: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    inverted: bool = True,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
    eps_mode: str = "sklearn",
    seed: int = 0,
) -> EpochPlan:
    """Validate training options and freeze them into an :class:`EpochPlan`.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths ``[n_in, n_1, ..., n_out]`` (at least two, all >= 1).
    dtype : {'float32', 'float64'}
    batch_size : int
        Rows per minibatch (>= 1).
    hidden, output, loss : str
        Activations and loss; ``(output, loss)`` must be in :data:`VALID_OUTPUT_LOSS`.
    target : {'labels', 'dense'}
        Integer class labels or a float target matrix.
    l2, l1, alpha : float
        Penalties (>= 0), see the module docstring.
    keep : sequence of float (n_layers,), optional
        Keep probability of each layer's input, in (0, 1] (default: no dropout).
    scales : sequence of float (n_layers,), optional
        Multiplier of a kept unit; default ``1/keep`` (inverted dropout) or 1 (``inverted=False``).
    optimizer : str
        One of :data:`OPTIMIZER_CODES`.
    momentum, beta1, beta2, eps : float
        Optimizer hyper-parameters: ``momentum`` in [0, 1], ``beta1``/``beta2`` in [0, 1), ``eps`` > 0
        for Adam.
    eps_mode : {'sklearn', 'torch'}
        Where Adam's epsilon goes (``'torch'`` always for ``adamw``).
    seed : int
        Seed of the dropout masks, in [0, 2**64).

    Returns
    -------
    EpochPlan

    Raises
    ------
    TypeError, ValueError
        Naming the option that is wrong.
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence | np.ndarray):
        raise TypeError(f"sizes must be a sequence of layer widths, got {type(sizes).__name__}")
    sz = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) < 1:
            raise ValueError(f"sizes must be positive integers, got {list(sizes)!r}")
        sz.append(int(s))
    if len(sz) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {sz}")
    dt = np.dtype(dtype).name  # type: ignore[arg-type]
    if dt not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dt!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if hidden not in HIDDEN_ACTIVATIONS:
        raise ValueError(f"hidden must be one of {HIDDEN_ACTIVATIONS}, got {hidden!r}")
    if output not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output must be one of {OUTPUT_ACTIVATIONS}, got {output!r}")
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {tuple(LOSS_CODES)}, got {loss!r}")
    if (output, loss) not in VALID_OUTPUT_LOSS:
        ok = sorted(o for o, lo in VALID_OUTPUT_LOSS if lo == loss)
        raise ValueError(f"loss={loss!r} needs output in {ok}, got output={output!r}")
    if output == "softmax" and sz[-1] < 2:
        raise ValueError("a softmax output needs at least 2 units; use output='sigmoid' for one unit")
    if target not in TARGET_CODES:
        raise ValueError(f"target must be one of {tuple(TARGET_CODES)}, got {target!r}")
    if optimizer not in OPTIMIZER_CODES:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_CODES)}, got {optimizer!r}")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {tuple(EPS_MODES)}, got {eps_mode!r}")
    if optimizer == "adamw":
        eps_mode = "torch"  # AdamW is PyTorch's: its epsilon placement always
    L = len(sz) - 1
    keeps = [1.0] * L if keep is None else [_finite(k, "keep", 0.0, 1.0) for k in keep]
    if len(keeps) != L or any(k <= 0.0 for k in keeps):
        raise ValueError(f"keep needs one probability in (0, 1] per layer input ({L}), got {list(keep or [])}")
    if scales is None:
        scl = [1.0 / k if inverted else 1.0 for k in keeps]
    else:
        scl = [_finite(s, "scales") for s in scales]
        if len(scl) != L:
            raise ValueError(f"scales needs one multiplier per layer input ({L}), got {len(scl)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    plan = EpochPlan(
        sizes=tuple(sz), dtype=dt, batch_size=int(batch_size), hidden=hidden, output=output, loss=loss,
        target=target, l2=_finite(l2, "l2"), l1=_finite(l1, "l1"), alpha=_finite(alpha, "alpha"),
        thresholds=tuple(keep_threshold(k) for k in keeps), scales=tuple(scl), optimizer=optimizer,
        momentum=_finite(momentum, "momentum", 0.0, 1.0), beta1=_finite(beta1, "beta1", 0.0, 1.0, True),
        beta2=_finite(beta2, "beta2", 0.0, 1.0, True), eps=_finite(eps, "eps"), eps_mode=eps_mode, seed=int(seed),
    )  # fmt: skip
    if optimizer in ("adam", "adamw") and plan.eps <= 0.0:
        raise ValueError(f"Adam needs eps > 0, got {eps!r}")
    return plan


# ---------------------------------------------------------------------------- optimizer state
@dataclass
class OptimizerState:
    """An optimizer's per-parameter arrays and its step count; updated in place by ``train_epoch``.

    Attributes
    ----------
    kind : str
        The optimizer (a key of :data:`OPTIMIZER_CODES`).
    t : int
        Steps taken (Adam's ``t``).
    weights : list of list of ndarray
        ``weights[s][l]`` is slot ``s`` for ``W_l``, shape ``(n_out, n_in)``.
    biases : list of list of ndarray
        ``biases[s][l]`` is slot ``s`` for ``b_l``, shape ``(n_out,)``.
    """

    kind: str
    t: int = 0
    weights: list[list[np.ndarray]] = field(default_factory=list)
    biases: list[list[np.ndarray]] = field(default_factory=list)

    @classmethod
    def zeros(cls, kind: str, sizes: Sequence[int], dtype: object) -> OptimizerState:
        """Fresh state of ``kind`` for a network of these layer widths."""
        if kind not in OPTIMIZER_SLOTS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {tuple(OPTIMIZER_SLOTS)}")
        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
        n = OPTIMIZER_SLOTS[kind]
        return cls(
            kind,
            0,
            [[np.zeros((o, i), dtype=dtype) for i, o in pairs] for _ in range(n)],
            [[np.zeros(o, dtype=dtype) for _, o in pairs] for _ in range(n)],
        )

    def arrays(self) -> list[np.ndarray]:
        """Every state array, slot by slot, weights then biases."""
        return [a for s in range(len(self.weights)) for a in (*self.weights[s], *self.biases[s])]

    def copy(self) -> OptimizerState:
        return OptimizerState(self.kind, self.t, [[a.copy() for a in s] for s in self.weights],
                              [[a.copy() for a in s] for s in self.biases])  # fmt: skip

    def __repr__(self) -> str:
        return f"OptimizerState({self.kind!r}, t={self.t}, slots={len(self.weights)})"


class EpochStats(NamedTuple):
    """What an epoch returns (see the module docstring)."""

    loss_sum: float
    penalty_sum: float
    n_correct: int


class Params(NamedTuple):
    """A network's parameters: ``weights[l]`` ``(n_out, n_in)`` and ``biases[l]`` ``(n_out,)``."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]


# ---------------------------------------------------------------------------- the raw protocol
class RawBackend(Protocol):
    """What every raw backend module implements, on arrays validated by :class:`fastmlp.backends.Backend`.

    All arrays are C-contiguous, aligned, of the plan's (or ``W``'s) dtype;
    labels and orders are int64, sample weights float64; the kernels never
    allocate what they are given as ``out`` and never raise on valid input.
    """

    NAME: str

    def forward(self, A: np.ndarray, W: np.ndarray, b: np.ndarray, act: int, out: np.ndarray) -> None:
        """``out (n, n_out) = act(A (n, n_in) @ W.T + b)``."""

    def output_delta(self, A: np.ndarray, Y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
        """Output delta of ``A (n, k)`` against labels ``(n,)`` or a dense ``Y (n, k)``, unweighted
        (``c_i = 1/n``); returns ``(loss_sum, n_correct)``."""
        ...

    def hidden_delta(self, D_next: np.ndarray, W_next: np.ndarray, A: np.ndarray, act: int, mask: np.ndarray | None,
                     out: np.ndarray) -> None:  # fmt: skip
        """``out = (D_next @ W_next) * mask * act'(A)``, the derivative from the activation output ``A``."""

    def inplace_update(self, W: np.ndarray, b: np.ndarray, D: np.ndarray, A: np.ndarray, lr: float, l2: float,
                       l1: float) -> None:  # fmt: skip
        """Plain SGD: ``W <- max(0, 1 - lr l2) W - lr l1 sign(W) - lr D.T @ A``, ``b <- b - lr D.sum(0)``."""

    def dropout_mask(self, seed: int, step: int, layer: int, keep_threshold: int, scale: float, out: np.ndarray) -> None:
        """``out (n_rows, n_units)``: ``scale`` where the counter hash keeps a unit, else 0."""

    def forward_network(self, X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int,
                        output_act: int, out: np.ndarray) -> None:  # fmt: skip
        """Output activations ``out (n, n_out)`` of the whole network for ``X (n, n_in)``."""

    def train_epoch(self, X: np.ndarray, Y: np.ndarray, order: np.ndarray, weights: list[np.ndarray],
                    biases: list[np.ndarray], state: OptimizerState, lrs: np.ndarray, plan: EpochPlan, step0: int,
                    sample_weight: np.ndarray | None) -> tuple[float, float, int]:  # fmt: skip
        """One epoch (module docstring); updates ``weights``, ``biases`` and ``state`` in place and returns
        ``(loss_sum, penalty_sum, n_correct)``."""
        ...


def optimizer_fields(kind: str, params: Mapping[str, float]) -> dict[str, object]:
    """The plan fields of an optimizer kind from its hyper-parameters (``momentum``, ``beta1``, ...)."""
    out: dict[str, object] = {"optimizer": kind}
    for k in ("momentum", "beta1", "beta2", "eps", "eps_mode"):
        if k in params:
            out[k] = params[k]
    return out
