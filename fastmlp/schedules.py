"""Learning-rate schedules for :func:`fastmlp.training.fit`.

A schedule is any object with ``epoch_lrs(epoch, n_steps) -> (n_steps,)``
giving the learning rate of every minibatch step of a (0-based) epoch of the
current fit; the fit loop also calls ``step_epoch(history)`` after each epoch
(schedules that react to the metrics, such as :class:`ReduceLROnPlateau`, act
there) and ``on_train_begin(history)`` once before the first epoch.

The closed-form schedules here compute ``lr · factor(t)``.  With
``per_step=False`` (the default) ``t`` is the epoch number and every step of
an epoch uses the same rate; with ``per_step=True`` ``t`` is the global
minibatch step ``epoch · n_steps + i`` and the schedule advances with each
minibatch, so ``total_iters``, ``step_size`` and ``T_max`` count steps.
The conventions follow PyTorch's ``torch.optim.lr_scheduler`` (``t`` is
PyTorch's ``last_epoch``); the factors are evaluated in closed form, never
accumulated, so there is no drift over long runs.

Examples
--------
>>> sched = LinearLR(0.05, start_factor=0.5, total_iters=4)
>>> [round(float(sched.epoch_lrs(e, 1)[0]), 5) for e in range(6)]
[0.025, 0.03125, 0.0375, 0.04375, 0.05, 0.05]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.callbacks import Plateau

if TYPE_CHECKING:
    from fastmlp.history import History

__all__ = [
    "Constant",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LinearLR",
    "ReduceLROnPlateau",
    "Schedule",
    "StepLR",
]


class Schedule:
    """Base class of the closed-form schedules: ``lr(t) = lr · factor(t)``.

    Parameters
    ----------
    lr : float
        Base learning rate (> 0).
    per_step : bool
        Advance the schedule every minibatch (``t`` = global step) instead of
        every epoch (``t`` = epoch, one rate for all steps of an epoch).

    Notes
    -----
    Subclasses implement :meth:`factor` on an array of ``t``.
    """

    def __init__(self, lr: float, per_step: bool = False) -> None:
        self.lr: float = V.check_float(lr, "lr", low=0.0, low_open=True)
        if not isinstance(per_step, (bool, np.bool_)):
            raise TypeError(f"per_step must be a bool, got {type(per_step).__name__}")
        self.per_step: bool = bool(per_step)

    def factor(self, t: np.ndarray) -> np.ndarray:
        """Multiplier of the base rate at times ``t`` (array of non-negative ints)."""
        raise NotImplementedError

    def __call__(self, t: int | np.ndarray) -> np.ndarray | float:
        """Learning rate at time ``t`` (an epoch, or a global step when ``per_step``)."""
        arr = np.asarray(t, dtype=np.int64)
        if (arr < 0).any():
            raise ValueError("t must be non-negative")
        out = self.lr * self.factor(arr.astype(np.float64))
        return float(out) if np.ndim(out) == 0 else out

    def epoch_lrs(self, epoch: int, n_steps: int) -> np.ndarray:
        """Learning rate of each minibatch step of ``epoch``.

        Parameters
        ----------
        epoch : int
            0-based epoch of the current fit.
        n_steps : int
            Minibatch steps in the epoch.

        Returns
        -------
        ndarray of float64 (n_steps,)
        """
        epoch = V.check_int(epoch, "epoch", minimum=0)
        n_steps = V.check_int(n_steps, "n_steps", minimum=0)
        if self.per_step:
            t = np.arange(epoch * n_steps, (epoch + 1) * n_steps, dtype=np.float64)
            return self.lr * np.asarray(self.factor(t), dtype=np.float64)
        return np.full(n_steps, self.lr * float(self.factor(np.float64(epoch))))

    def on_train_begin(self, history: History) -> None:
        """Called by ``fit`` before the first epoch (stateless schedules do nothing)."""

    def step_epoch(self, history: History) -> None:
        """Called by ``fit`` after each epoch (closed-form schedules do nothing)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (closed-form schedules have no state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def _params(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._params()
        return f"{type(self).__name__}(lr={self.lr:g}{', ' + extra if extra else ''}, per_step={self.per_step})"


class Constant(Schedule):
    """The same learning rate for every step.

    Parameters
    ----------
    lr : float
        Learning rate (> 0).
    per_step : bool
        Accepted for symmetry; it changes nothing.
    """

    def factor(self, t: np.ndarray) -> np.ndarray:
        return np.ones_like(t, dtype=np.float64)


class LinearLR(Schedule):
    """Linear warm-up (or decay) of the factor, PyTorch's ``LinearLR``.

    ``lr(t) = lr · (start_factor + (end_factor − start_factor) · min(t, total_iters) / total_iters)``

    Parameters
    ----------
    lr : float
        Base learning rate.
    start_factor : float
        Factor at ``t = 0``, in ``(0, 1]``.
    end_factor : float
        Factor from ``t = total_iters`` on, in ``[0, 1]``.
    total_iters : int
        Epochs (or steps, with ``per_step``) over which the factor moves (>= 1).
    per_step : bool
        See :class:`Schedule`.

    Examples
    --------
    PyTorch's documented example (base lr 0.05):

    >>> s = LinearLR(0.05, start_factor=0.5, total_iters=4)
    >>> [round(s(t), 5) for t in range(5)]
    [0.025, 0.03125, 0.0375, 0.04375, 0.05]
    """

    def __init__(
        self,
        lr: float,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        per_step: bool = False,
    ) -> None:
        super().__init__(lr, per_step)
        self.start_factor = V.check_float(start_factor, "start_factor", low=0.0, high=1.0, low_open=True)
        self.end_factor = V.check_float(end_factor, "end_factor", low=0.0, high=1.0)
        self.total_iters = V.check_int(total_iters, "total_iters", minimum=1)

    def factor(self, t: np.ndarray) -> np.ndarray:
        frac = np.minimum(t, self.total_iters) / self.total_iters
        return self.start_factor + (self.end_factor - self.start_factor) * frac

    def _params(self) -> str:
        return f"start_factor={self.start_factor:g}, end_factor={self.end_factor:g}, total_iters={self.total_iters}"


class StepLR(Schedule):
    """Decay by ``gamma`` every ``step_size`` epochs (or steps): ``lr · gamma^⌊t / step_size⌋``.

    Parameters
    ----------
    lr : float
        Base learning rate.
    step_size : int
        Period of the decay (>= 1).
    gamma : float
        Multiplicative decay, in ``(0, 1]`` (default 0.1).
    per_step : bool
        See :class:`Schedule`.
    """

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1, per_step: bool = False) -> None:
        super().__init__(lr, per_step)
        self.step_size = V.check_int(step_size, "step_size", minimum=1)
        self.gamma = V.check_float(gamma, "gamma", low=0.0, high=1.0, low_open=True)

    def factor(self, t: np.ndarray) -> np.ndarray:
        return self.gamma ** np.floor(t / self.step_size)

    def _params(self) -> str:
        return f"step_size={self.step_size}, gamma={self.gamma:g}"


class ExponentialLR(Schedule):
    """Decay by ``gamma`` every epoch (or step): ``lr · gamma^t``.

    Parameters
    ----------
    lr : float
        Base learning rate.
    gamma : float
        Multiplicative decay per epoch (or step), in ``(0, 1]``.
    per_step : bool
        See :class:`Schedule`.
    """

    def __init__(self, lr: float, gamma: float, per_step: bool = False) -> None:
        super().__init__(lr, per_step)
        self.gamma = V.check_float(gamma, "gamma", low=0.0, high=1.0, low_open=True)

    def factor(self, t: np.ndarray) -> np.ndarray:
        return self.gamma**t

    def _params(self) -> str:
        return f"gamma={self.gamma:g}"


class CosineAnnealingLR(Schedule):
    """Cosine annealing, PyTorch's closed form (SGDR without restarts).

    ``lr(t) = eta_min + (lr − eta_min) · (1 + cos(π t / T_max)) / 2``

    Past ``T_max`` the closed form continues along the cosine (it rises again,
    period ``2·T_max``), as PyTorch's does; choose ``T_max`` = the number of
    epochs (or steps) trained to anneal once.

    Parameters
    ----------
    lr : float
        Base (maximum) learning rate.
    T_max : int
        Half period, in epochs (or steps with ``per_step``) (>= 1).
    eta_min : float
        Minimum learning rate, in ``[0, lr]``.
    per_step : bool
        See :class:`Schedule`.
    """

    def __init__(self, lr: float, T_max: int, eta_min: float = 0.0, per_step: bool = False) -> None:
        super().__init__(lr, per_step)
        self.T_max = V.check_int(T_max, "T_max", minimum=1)
        self.eta_min = V.check_float(eta_min, "eta_min", low=0.0, high=self.lr)

    def factor(self, t: np.ndarray) -> np.ndarray:
        lo = self.eta_min / self.lr
        return lo + (1.0 - lo) * (1.0 + np.cos(math.pi * t / self.T_max)) / 2.0

    def _params(self) -> str:
        return f"T_max={self.T_max}, eta_min={self.eta_min:g}"


_MONITORS = ("valid_loss", "valid_acc", "train_loss", "train_data_loss", "train_acc")


class ReduceLROnPlateau:
    """Multiply the rate by ``factor`` when a metric stops improving, PyTorch's ``ReduceLROnPlateau``.

    After each epoch the monitored metric of the :class:`~fastmlp.training.History`
    is compared with the best so far: it improves when
    ``value < best · (1 − threshold)`` (losses, relative mode) or
    ``value > best · (1 + threshold)`` (accuracies).  After more than
    ``patience`` epochs in a row without improvement the rate becomes
    ``max(lr · factor, min_lr)`` and ``cooldown`` epochs pass before bad
    epochs are counted again.  The rate is constant within an epoch.

    Parameters
    ----------
    lr : float
        Initial learning rate (> 0).
    factor : float
        Reduction factor, in ``(0, 1)`` (default 0.1).
    patience : int
        Bad epochs tolerated before reducing (>= 0, default 10).
    threshold : float
        Relative improvement needed to count as better (>= 0, default 1e-4).
    threshold_mode : {'rel', 'abs'}
        ``'abs'`` compares with ``best ∓ threshold`` instead.
    cooldown : int
        Epochs to wait after a reduction before counting bad epochs (>= 0).
    min_lr : float
        Lower bound of the rate (>= 0).
    monitor : {'valid_loss', 'valid_acc', 'train_loss', 'train_data_loss', 'train_acc'}
        History metric to watch; losses are minimized, accuracies maximized.
    eps : float
        A reduction smaller than this is skipped (as PyTorch's ``eps``).

    Attributes
    ----------
    current_lr : float
        The rate used for the next epoch.
    reductions : list of int
        1-based epochs after which the rate was reduced.
    """

    per_step = False

    def __init__(
        self,
        lr: float,
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        monitor: str = "valid_loss",
        eps: float = 1e-8,
    ) -> None:
        self.lr = V.check_float(lr, "lr", low=0.0, low_open=True)
        self.factor = V.check_float(factor, "factor", low=0.0, high=1.0, low_open=True, high_open=True)
        self.patience = V.check_int(patience, "patience", minimum=0)
        self.threshold = V.check_float(threshold, "threshold", low=0.0)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.threshold_mode = threshold_mode
        self.cooldown = V.check_int(cooldown, "cooldown", minimum=0)
        self.min_lr = V.check_float(min_lr, "min_lr", low=0.0)
        if monitor not in _MONITORS:
            raise ValueError(f"monitor must be one of {', '.join(map(repr, _MONITORS))}, got {monitor!r}")
        self.monitor = monitor
        self.eps = V.check_float(eps, "eps", low=0.0)
        self.mode = "max" if monitor.endswith("acc") else "min"
        self.reset()

    def reset(self) -> None:
        """Back to the initial rate and an empty record."""
        self.current_lr: float = self.lr
        self._rule = Plateau(self.mode, self.threshold, self.patience, relative=self.threshold_mode == "rel")
        self.cooldown_counter = 0
        self.reductions: list[int] = []

    @property
    def best(self) -> float:
        """The best value of the monitored metric so far."""
        return self._rule.best

    @property
    def num_bad_epochs(self) -> int:
        """Epochs in a row without improvement (PyTorch's ``num_bad_epochs``)."""
        return self._rule.bad

    def epoch_lrs(self, epoch: int, n_steps: int) -> np.ndarray:
        """The current rate for each of the ``n_steps`` steps of ``epoch``: ``(n_steps,)`` float64."""
        return np.full(V.check_int(n_steps, "n_steps", minimum=0), self.current_lr)

    def on_train_begin(self, history: History) -> None:
        """Reset the state and check the monitored metric will exist."""
        if self.monitor.startswith("valid") and history.valid_loss is None:
            raise ValueError(f"ReduceLROnPlateau(monitor={self.monitor!r}) needs validation data: "
                             "pass X_valid and y_valid to fit")  # fmt: skip
        self.reset()

    def step_epoch(self, history: History) -> None:
        """Update the rate from the last value of the monitored metric in ``history``."""
        values: Any = getattr(history, self.monitor)
        if values is None:
            raise ValueError(f"ReduceLROnPlateau(monitor={self.monitor!r}): the history has no {self.monitor}")
        self._rule.update(float(values[-1]))
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self._rule.bad = 0
        if self._rule.exhausted:
            new = max(self.current_lr * self.factor, self.min_lr)
            if self.current_lr - new > self.eps:
                self.current_lr = new
                self.reductions.append(int(history.epoch[-1]))
            self.cooldown_counter = self.cooldown
            self._rule.bad = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the rate, the rule's count and best, the cooldown, the reductions."""
        return {"current_lr": self.current_lr, "rule": self._rule.state_dict(), "cooldown_counter": self.cooldown_counter,
                "reductions": list(self.reductions)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_lr = float(state["current_lr"])
        self._rule.load_state_dict(state["rule"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.reductions = [int(e) for e in state["reductions"]]

    def __repr__(self) -> str:
        return (
            f"ReduceLROnPlateau(lr={self.lr:g}, factor={self.factor:g}, patience={self.patience}, "
            f"threshold={self.threshold:g}, threshold_mode={self.threshold_mode!r}, cooldown={self.cooldown}, "
            f"min_lr={self.min_lr:g}, monitor={self.monitor!r})"
        )
