"""The per-epoch record of a fit: :class:`History`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["History"]

#: per-epoch lists, in column order
METRICS = ("epoch", "train_loss", "train_data_loss", "train_acc", "valid_loss", "valid_acc", "valid_score", "lr",
           "seconds")  # fmt: skip
#: Keras's names of the metrics (``History.history``)
KERAS_NAMES = {"train_loss": "loss", "train_acc": "accuracy", "valid_loss": "val_loss", "valid_acc": "val_accuracy",
               "valid_score": "val_score", "lr": "learning_rate"}  # fmt: skip
_FLAGS = ("best_epoch", "stopped_epoch", "interrupted", "diverged", "restored_best", "task")


@dataclass
class History:
    """Per-epoch record of :func:`fastmlp.training.fit`.

    Attributes
    ----------
    epoch : list of int
        Epoch numbers; a fit that continues a trained network numbers on from
        its earlier epochs (``reset=True`` starts at 1 again).
    train_loss : list of float
        Training objective (data loss plus the penalties), averaged over the
        epoch's minibatches as they were trained (before each update).
    train_data_loss : list of float
        The same without the penalties.
    train_acc : list of float or None
        Training accuracy in [0, 1], counted the same way; ``None`` for
        regression targets, where it is not defined.
    valid_loss : list of float or None
        Mean data loss on the validation data after each epoch (``None``
        without validation data).
    valid_acc : list of float or None
        Validation accuracy (``None`` without validation data or for regression).
    valid_score : list of float or None
        Validation score, higher is better: accuracy for class labels, subset
        accuracy for multi-label targets, R² for regression (or the fit's
        ``score=`` function).
    lr : list of float
        Mean learning rate of each epoch.
    step_lr : list of ndarray
        With a schedule: the rate of every minibatch step, one float64 array
        ``(n_steps,)`` per epoch; empty for a constant rate.
    seconds : list of float
        Wall time of each epoch (training and evaluation).
    best_epoch, stopped_epoch : int or None
        Set by early stopping; ``stopped_epoch`` by any callback that stops.
    interrupted, diverged : bool
        Training ended by Ctrl-C, or by a non-finite loss or weight.
    restored_best : bool
        The best epoch's weights were put back at the end.
    task : str
        ``'classification'``, ``'multilabel'``, ``'soft labels'`` or ``'regression'``.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_data_loss: list[float] = field(default_factory=list)
    train_acc: list[float] | None = field(default_factory=list)
    valid_loss: list[float] | None = None
    valid_acc: list[float] | None = None
    valid_score: list[float] | None = None
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_lr: list[np.ndarray] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    interrupted: bool = False
    diverged: bool = False
    restored_best: bool = False
    task: str = "classification"

    @classmethod
    def for_fit(cls, task: str, validation: bool) -> History:
        """An empty history for a fit of this task, with or without validation data."""
        regression = task == "regression"
        return cls(
            train_acc=None if regression else [],
            valid_loss=[] if validation else None,
            valid_acc=[] if validation and not regression else None,
            valid_score=[] if validation else None,
            task=task,
        )

    def as_dict(self) -> dict[str, Any]:
        """Per-epoch columns of equal length plus the summary fields, as a plain, JSON-ready dict.

        Metrics that this fit does not record are left out; ``step_lr`` is a
        list (one list of floats per epoch) only when a schedule recorded it.
        ``pandas.DataFrame(history.as_dict())`` gives one row per epoch.
        """
        d: dict[str, Any] = {k: list(getattr(self, k)) for k in METRICS if getattr(self, k) is not None}
        if self.step_lr:
            d["step_lr"] = [a.tolist() for a in self.step_lr]
        d.update({k: getattr(self, k) for k in _FLAGS})
        return d

    @property
    def history(self) -> dict[str, list[float]]:
        """Keras-style ``{'loss': [...], 'accuracy': [...], 'val_loss': [...], ...}``: equal-length lists."""
        return {KERAS_NAMES.get(k, k): list(getattr(self, k)) for k in METRICS[1:]
                if getattr(self, k) is not None}  # fmt: skip

    def iteration_lr(self) -> np.ndarray:
        """Learning rate of every minibatch step of the fit, ``(n_steps_total,)``; empty without a schedule."""
        return np.concatenate(self.step_lr) if self.step_lr else np.empty(0)

    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON-ready values (for checkpoints)."""
        d = {k: (None if getattr(self, k) is None else list(getattr(self, k))) for k in METRICS}
        d["step_lr"] = [a.tolist() for a in self.step_lr]
        d.update({k: getattr(self, k) for k in _FLAGS})
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> History:
        """The inverse of :meth:`to_json`."""
        kw: dict[str, Any] = {k: (None if d.get(k) is None else list(d[k])) for k in METRICS}
        kw["epoch"] = [int(e) for e in kw["epoch"] or []]
        for k in ("train_loss", "train_data_loss", "lr", "seconds"):
            kw[k] = [float(v) for v in kw[k] or []]
        kw["step_lr"] = [np.asarray(a, dtype=np.float64) for a in d.get("step_lr", [])]
        kw.update({k: d[k] for k in _FLAGS if k in d})
        return cls(**kw)

    def _append(self, record: dict[str, Any]) -> None:
        """Add one epoch's values (keys of :data:`METRICS` and ``step_lr``)."""
        for k in METRICS:
            lst = getattr(self, k)
            if lst is not None:
                lst.append(record[k])
        if record.get("step_lr") is not None:
            self.step_lr.append(record["step_lr"])

    def _truncate(self, n: int) -> None:
        """Forget every epoch after the first ``n`` (an epoch rolled back before its commit finished)."""
        for k in METRICS:
            lst = getattr(self, k)
            if lst is not None:
                del lst[n:]
        if len(self.step_lr) > n:
            del self.step_lr[n:]
        last = self.epoch[-1] if self.epoch else 0
        for k in ("best_epoch", "stopped_epoch"):
            if getattr(self, k) is not None and getattr(self, k) > last:
                setattr(self, k, None)

    def __len__(self) -> int:
        return len(self.epoch)

    def __repr__(self) -> str:
        if not self.epoch:
            return "History(0 epochs)"
        parts = [f"{len(self.epoch)} epochs", f"train_loss={self.train_loss[-1]:.4g}"]
        if self.train_acc:
            parts.append(f"train_acc={self.train_acc[-1]:.4f}")
        if self.valid_acc:
            parts.append(f"valid_acc={self.valid_acc[-1]:.4f}")
        elif self.valid_score:
            parts.append(f"valid_score={self.valid_score[-1]:.4f}")
        for k in ("best_epoch", "stopped_epoch"):
            if getattr(self, k) is not None:
                parts.append(f"{k}={getattr(self, k)}")
        parts += [k for k in ("interrupted", "diverged") if getattr(self, k)]
        return f"History({', '.join(parts)})"
