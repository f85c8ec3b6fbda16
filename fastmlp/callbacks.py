"""Callbacks of the fit loop: early stopping and the base class for others."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastmlp import _validation as V

if TYPE_CHECKING:
    from fastmlp.network import Network
    from fastmlp.training import History


class Callback:
    """Hooks called by :func:`fastmlp.training.fit`; override what you need.

    ``on_epoch_end`` returns ``True`` to stop training.
    """

    def on_train_begin(self, net: Network, history: History) -> None:
        """Called once before the first epoch."""

    def on_epoch_end(self, net: Network, history: History) -> bool:
        """Called after each epoch, once ``history`` holds its metrics; return True to stop."""
        return False

    def on_train_end(self, net: Network, history: History) -> None:
        """Called once at the end, also after an interrupt or a divergence."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EarlyStopping(Callback):
    """Stop when a validation metric has not improved for ``patience`` epochs.

    Parameters
    ----------
    patience : int
        Epochs without improvement before stopping (>= 1).
    min_delta : float
        An improvement must exceed this (in the metric's units).
    monitor : {'valid_loss', 'valid_acc'}
        Metric to watch; loss is minimized, accuracy maximized.
    restore_best : bool
        Restore the best epoch's weights at the end of training, whether or
        not it stopped early.

    Attributes
    ----------
    best_epoch : int or None
        1-based epoch of the best metric so far.
    best_value : float
    stopped_epoch : int or None
        1-based epoch after which training stopped early, ``None`` if it ran to the end.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, monitor: str = "valid_loss", restore_best: bool = True):
        self.patience = V.check_int(patience, "patience", minimum=1)
        self.min_delta = V.check_float(min_delta, "min_delta", low=0.0)
        if monitor not in ("valid_loss", "valid_acc"):
            raise ValueError(f"monitor must be 'valid_loss' or 'valid_acc', got {monitor!r}")
        self.monitor = monitor
        self.restore_best = bool(restore_best)
        self._reset()

    def _reset(self) -> None:
        self.best_epoch: int | None = None
        self.best_value: float = np.inf if self.monitor == "valid_loss" else -np.inf
        self.stopped_epoch: int | None = None
        self.best_weights: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self._wait = 0

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, monitor={self.monitor!r}, "
            f"restore_best={self.restore_best})"
        )

    def _improved(self, value: float) -> bool:
        if self.monitor == "valid_loss":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def on_train_begin(self, net: Network, history: History) -> None:
        if history.valid_loss is None:
            raise ValueError("early stopping needs validation data: pass X_valid and y_valid to fit")
        self._reset()

    def on_epoch_end(self, net: Network, history: History) -> bool:
        value = getattr(history, self.monitor)[-1]
        epoch = history.epoch[-1]
        # a non-finite value never counts as an improvement (a NaN best would block every later one)
        if np.isfinite(value) and (self.best_epoch is None or self._improved(value)):
            self.best_value, self.best_epoch, self._wait = float(value), epoch, 0
            self.best_weights = net.get_params()
            history.best_epoch = epoch
            return False
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            history.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, net: Network, history: History) -> None:
        if self.restore_best and self.best_weights is not None:
            net.set_params(*self.best_weights)
            history.restored_best = True
