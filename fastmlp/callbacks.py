"""Callbacks of the fit loop, and the one "no improvement within patience" rule.

:class:`Plateau` is the only place the rule is written: :class:`EarlyStopping`
(fastmlp's, Keras's and scikit-learn's conventions),
:class:`~fastmlp.schedules.ReduceLROnPlateau` (PyTorch's) and
scikit-learn's adaptive learning rate all count bad epochs with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V

if TYPE_CHECKING:
    from fastmlp.history import History
    from fastmlp.network import Network

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "ModelCheckpoint", "Plateau"]

#: metrics of a History that a rule can watch, and whether larger is better
MONITORS: dict[str, bool] = {
    "valid_loss": False,
    "valid_acc": True,
    "valid_score": True,
    "train_loss": False,
    "train_data_loss": False,
    "train_acc": True,
}


class Plateau:
    """Counts epochs without improvement of a metric.

    An epoch *improves* when its value beats the reference by more than
    ``threshold`` (``mode='min'``: ``value < best - threshold``, or
    ``value < best * (1 - threshold)`` with ``relative``); with ``inclusive``
    an improvement of exactly ``threshold`` counts too (scikit-learn's
    ``tol``).  ``best`` follows improvements only, or with ``track_any`` every
    value better than it (scikit-learn).  ``bad`` counts the epochs in a row
    without improvement; the rule is :attr:`exhausted` once ``bad > patience``.
    A non-finite value never improves.

    Parameters
    ----------
    mode : {'min', 'max'}
    threshold : float
        Required improvement (>= 0).
    patience : int
        Bad epochs tolerated (>= 0).
    relative : bool
        Compare relative to ``best`` (PyTorch's ``threshold_mode='rel'``).
    inclusive : bool
        An improvement of exactly ``threshold`` counts.
    track_any : bool
        ``best`` follows every better value, not only improvements.
    """

    def __init__(self, mode: str = "min", threshold: float = 0.0, patience: int = 0, *, relative: bool = False,
                 inclusive: bool = False, track_any: bool = False) -> None:  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.threshold = V.check_float(threshold, "threshold", low=0.0)
        self.patience = V.check_int(patience, "patience", minimum=0)
        self.relative = bool(relative)
        self.inclusive = bool(inclusive)
        self.track_any = bool(track_any)
        self.reset()

    def reset(self) -> None:
        """Forget the best value and the count."""
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.bad = 0

    def _ref(self) -> float:
        t = self.threshold
        if self.mode == "min":
            return self.best * (1.0 - t) if self.relative else self.best - t
        return self.best * (1.0 + t) if self.relative else self.best + t

    def update(self, value: float) -> tuple[bool, bool]:
        """Take one epoch's value; return ``(improved, new_best)``."""
        v = float(value)
        if not math.isfinite(v):
            self.bad += 1
            return False, False
        ref = self._ref()
        if self.mode == "min":
            improved = v <= ref if self.inclusive else v < ref
            better = v < self.best
        else:
            improved = v >= ref if self.inclusive else v > ref
            better = v > self.best
        new_best = improved or (self.track_any and better)
        if new_best:
            self.best = v
        self.bad = 0 if improved else self.bad + 1
        return improved, new_best

    @property
    def exhausted(self) -> bool:
        """More than ``patience`` bad epochs in a row."""
        return self.bad > self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])

    def __repr__(self) -> str:
        return (f"Plateau(mode={self.mode!r}, threshold={self.threshold:g}, patience={self.patience}, "
                f"best={self.best:.6g}, bad={self.bad})")  # fmt: skip


class Callback:
    """Hooks called by :func:`fastmlp.training.fit`; override what you need.

    ``on_epoch_end`` returns ``True`` to stop training.  A callback that keeps
    state across epochs overrides :meth:`state_dict` and :meth:`load_state_dict`
    so that checkpoints carry it (by default a callback has none: its
    configuration is the one given to the resumed fit).
    """

    def on_train_begin(self, net: Network, history: History) -> None:
        """Called once before the first epoch."""

    def on_epoch_end(self, net: Network, history: History) -> bool:
        """Called after each epoch, once ``history`` holds its metrics; return True to stop."""
        return False

    def on_train_end(self, net: Network, history: History) -> None:
        """Called once at the end, also after an interrupt or a divergence."""

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(json_state, arrays)``: what a checkpoint keeps of this callback (JSON-ready values, arrays)."""
        return {}, {}

    def load_state_dict(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EarlyStopping(Callback):
    """Stop when a metric has not improved for a while; keep the best epoch's weights.

    Parameters
    ----------
    patience : int
        ``convention='keras'`` (the default): stop after ``patience`` epochs in
        a row without an improvement (>= 1).  ``convention='sklearn'``: stop once
        more than ``patience`` epochs in a row did not improve (scikit-learn's
        ``n_iter_no_change``).
    min_delta : float
        The improvement needed (in the metric's units; scikit-learn's ``tol``).
    monitor : {'valid_loss', 'valid_acc', 'valid_score', 'train_loss', 'train_data_loss', 'train_acc'}
        Losses are minimized, accuracies and scores maximized; Keras's names
        (``'val_loss'``, ``'val_accuracy'``, ``'loss'``, ``'accuracy'``) work too.
    restore_best : bool
        Put the best epoch's weights back at the end of training, whether or
        not it stopped early.
    convention : {'keras', 'sklearn'}
        ``'keras'``: an epoch improves when it beats the best by more than
        ``min_delta``, and the best follows improvements.  ``'sklearn'``: an
        epoch improves when it beats the best by at least ``min_delta``, and
        the best (and the weights kept) follow every better value.
    on_plateau : callable, optional
        Called when the patience runs out; when it returns True training goes
        on with a fresh count (scikit-learn's ``learning_rate='adaptive'``
        divides the rate there), else it stops.
    keep_state : bool
        Carry the count, the best value and the best weights over to the next
        fit this callback is given to (scikit-learn's ``partial_fit`` and
        ``warm_start`` continue them); by default each fit starts afresh.

    Attributes
    ----------
    best_epoch : int or None
        Epoch number of the best value so far.
    best_value : float
    stopped_epoch : int or None
        Epoch after which training stopped early, ``None`` if it ran to the end.
    """

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 0.0,
        monitor: str = "valid_loss",
        restore_best: bool = True,
        convention: str = "keras",
        on_plateau: Callable[[], bool] | None = None,
        keep_state: bool = False,
    ) -> None:
        self.patience = V.check_int(patience, "patience", minimum=1 if convention == "keras" else 0)
        self.min_delta = V.check_float(min_delta, "min_delta", low=0.0)
        monitor = _monitor(monitor)  # fastmlp's names or Keras's ('val_loss', ...)
        if convention not in ("keras", "sklearn"):
            raise ValueError(f"convention must be 'keras' or 'sklearn', got {convention!r}")
        if on_plateau is not None and not callable(on_plateau):
            raise TypeError("on_plateau must be callable (returning True to keep training) or None")
        self.monitor = monitor
        self.restore_best = bool(restore_best)
        self.convention = convention
        self.on_plateau = on_plateau
        self.keep_state = bool(keep_state)
        self._started = False
        sk = convention == "sklearn"
        self.rule = Plateau("max" if MONITORS[monitor] else "min", self.min_delta,
                            self.patience if sk else self.patience - 1, inclusive=sk, track_any=sk)  # fmt: skip
        self._reset()

    def _reset(self) -> None:
        self.rule.reset()
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.best_weights: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        #: the state before the last on_epoch_end, that epoch's number and its network (see _drop_rolled_back)
        self._undo: tuple[Any, ...] | None = None

    @property
    def best_value(self) -> float:
        return self.rule.best

    def __repr__(self) -> str:
        conv = "" if self.convention == "keras" else f", convention={self.convention!r}"
        return (f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, monitor={self.monitor!r}, "
                f"restore_best={self.restore_best}{conv})")  # fmt: skip

    def on_train_begin(self, net: Network, history: History) -> None:
        if self.monitor.startswith("valid") and history.valid_loss is None:
            raise ValueError(f"early stopping on {self.monitor!r} needs validation data: pass X_valid and y_valid "
                             "(or validation_split=) to fit, or monitor='train_loss'")  # fmt: skip
        if getattr(history, self.monitor) is None:
            raise ValueError(f"early stopping on {self.monitor!r}: this fit does not record it "
                             "(accuracy is not defined for regression targets); monitor a loss or valid_score")  # fmt: skip
        if not (self.keep_state and self._started):
            self._reset()
        self._started = True
        self.stopped_epoch = None

    def _drop_rolled_back(self) -> None:
        """Forget the last epoch seen when the fit rolled it back (a KeyboardInterrupt later in its commit,
        e.g. from a callback after this one): its weights must not be restored or checkpointed."""
        if self._undo is None:
            return
        rule, best_epoch, best_weights, stopped, epoch, net, history = self._undo
        if net.epochs_ < epoch:  # the network is back at an earlier epoch
            self.rule.load_state_dict(rule)
            self.best_epoch, self.best_weights, self.stopped_epoch = best_epoch, best_weights, stopped
            if history.best_epoch in (epoch, None):
                history.best_epoch = best_epoch
            self._undo = None

    def on_epoch_end(self, net: Network, history: History) -> bool:
        value = getattr(history, self.monitor)[-1]
        self._undo = (self.rule.state_dict(), self.best_epoch, self.best_weights, self.stopped_epoch,
                      history.epoch[-1], net, history)  # fmt: skip
        _, new_best = self.rule.update(value)
        if new_best:
            self.best_epoch = history.epoch[-1]
            history.best_epoch = self.best_epoch
            if self.restore_best:
                self.best_weights = net.get_params()
        if not self.rule.exhausted:
            return False
        if self.on_plateau is not None and self.on_plateau():
            self.rule.bad = 0
            return False
        self.stopped_epoch = history.epoch[-1]
        return True

    def on_train_end(self, net: Network, history: History) -> None:
        self._drop_rolled_back()
        self._undo = None
        if self.restore_best and self.best_weights is not None:
            net.set_params(*self.best_weights)
            history.restored_best = True

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._drop_rolled_back()
        state = {"rule": self.rule.state_dict(), "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}
        arrays: dict[str, np.ndarray] = {}
        if self.best_weights is not None:
            for i, (W, b) in enumerate(zip(*self.best_weights, strict=True)):
                arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        state["n_best"] = len(arrays) // 2
        return state, arrays

    def load_state_dict(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        n = int(state.get("n_best", 0))
        self.best_weights = ([arrays[f"W{i}"] for i in range(n)], [arrays[f"b{i}"] for i in range(n)]) if n else None
        self._undo = None


#: Keras's metric names, accepted wherever fastmlp's are (``monitor="val_loss"``)
KERAS_MONITORS = {"val_loss": "valid_loss", "val_accuracy": "valid_acc", "val_acc": "valid_acc", "val_score": "valid_score",
                  "loss": "train_loss", "accuracy": "train_acc", "acc": "train_acc"}  # fmt: skip


def _monitor(monitor: object) -> str:
    if isinstance(monitor, str) and monitor in KERAS_MONITORS:
        return KERAS_MONITORS[monitor]
    if not isinstance(monitor, str) or monitor not in MONITORS:
        names = ", ".join(map(repr, [*MONITORS, *KERAS_MONITORS]))
        raise ValueError(f"monitor must be one of {names}, got {monitor!r}")
    return monitor


class CSVLogger(Callback):
    """Write the history to a CSV file after every epoch, atomically (Keras's ``CSVLogger``).

    One row per epoch: ``epoch`` then the metrics under Keras's names
    (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate``,
    ... as in :attr:`History.history`).  The whole file is rewritten through a
    temporary file and a rename each epoch, so a reader (or a crash) never sees a
    half-written row; it gets the umask's permissions.

    Parameters
    ----------
    filename : str or path-like
        The CSV file; its directory must exist.
    separator : str
        Field separator (one character).
    append : bool
        Keep the rows already in the file (of an earlier fit) and add this fit's
        after them; by default the file is started afresh.

    Examples
    --------
    >>> net.fit(X, y, epochs=10, callbacks=[CSVLogger("training.csv")])  # doctest: +SKIP
    >>> pandas.read_csv("training.csv")  # doctest: +SKIP
    """

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False) -> None:
        from fastmlp._io import check_output_path

        if not isinstance(separator, str) or len(separator) != 1 or separator in "\r\n\"":
            raise ValueError(f"separator must be one character other than a quote or a newline, got {separator!r}")
        self.path = check_output_path(filename, "CSV log")
        self.separator = separator
        self.append = bool(append)
        self._before: list[str] = []
        self._header: str | None = None

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r}, separator={self.separator!r}, append={self.append})"

    def on_train_begin(self, net: Network, history: History) -> None:
        self._before, self._header = [], None
        if self.append and self.path.is_file():
            lines = self.path.read_text().splitlines()
            if lines:
                self._header, self._before = lines[0], lines[1:]

    def on_epoch_end(self, net: Network, history: History) -> bool:
        from fastmlp._io import atomic_write

        cols = {"epoch": history.epoch, **history.history}
        header = self.separator.join(cols)
        if self._header is not None and self._header != header:
            raise ValueError(f"CSVLogger(append=True): {self.path} has the columns {self._header!r}, this fit "
                             f"records {header!r}; log to another file")  # fmt: skip
        rows = [self.separator.join(_csv_value(v[i]) for v in cols.values()) for i in range(len(history.epoch))]
        text = "\n".join([header, *self._before, *rows]) + "\n"
        atomic_write(self.path, lambda fh: fh.write(text.encode()))
        return False


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class ModelCheckpoint(Callback):
    """Save the network after each epoch, or only when a metric improved (Keras's ``ModelCheckpoint``).

    Each save is :meth:`Network.save`: an ``.npz`` written atomically (temporary
    file, flush, rename), with the umask's permissions; ``load`` reads it back.

    Parameters
    ----------
    filepath : str or path-like
        Where to save; may hold ``{epoch}`` and metric fields in :meth:`str.format`
        syntax, e.g. ``"model-{epoch:03d}-{valid_loss:.3f}.npz"`` (fastmlp's or
        Keras's metric names).  ``.npz`` is appended when missing.
    monitor : str
        The metric ``save_best_only`` watches: ``'valid_loss'`` (default),
        ``'valid_acc'``, ``'valid_score'``, ``'train_loss'``, ``'train_acc'``, or
        Keras's ``'val_loss'``, ``'val_accuracy'``, ``'loss'``, ``'accuracy'``.
        Losses are minimized, accuracies and scores maximized.
    save_best_only : bool
        Save only after an epoch that improved ``monitor`` on the best so far
        (so the file holds the best epoch's weights); by default every epoch.
    min_delta : float
        The improvement needed with ``save_best_only``.
    verbose : int
        1: print a line for each save.

    Attributes
    ----------
    best : float
        The best value of ``monitor`` seen.
    best_epoch : int or None
    last_saved : pathlib.Path or None
        The file written last.
    """

    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "valid_loss", save_best_only: bool = False,
                 min_delta: float = 0.0, verbose: int = 0) -> None:  # fmt: skip
        self.filepath = os.fspath(filepath)
        if not isinstance(self.filepath, str) or not self.filepath:
            raise ValueError("filepath must be a non-empty path")
        self.monitor = _monitor(monitor)
        self.save_best_only = bool(save_best_only)
        self.min_delta = V.check_float(min_delta, "min_delta", low=0.0)
        self.verbose = V.check_int(int(verbose) if isinstance(verbose, bool) else verbose, "verbose", minimum=0)
        self.rule = Plateau("max" if MONITORS[self.monitor] else "min", self.min_delta)
        self.best_epoch: int | None = None
        self.last_saved: Path | None = None
        self._check(self._format(1, {k: 0.0 for k in [*MONITORS, *KERAS_MONITORS]}))

    @property
    def best(self) -> float:
        return self.rule.best

    def __repr__(self) -> str:
        return (f"ModelCheckpoint({self.filepath!r}, monitor={self.monitor!r}, save_best_only={self.save_best_only}, "
                f"min_delta={self.min_delta})")  # fmt: skip

    def _format(self, epoch: int, values: dict[str, Any]) -> Path:
        try:
            name = self.filepath.format(epoch=epoch, **values)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint filepath {self.filepath!r}: cannot fill in {exc} (fields: epoch and "
                             f"the metrics {', '.join([*MONITORS, *KERAS_MONITORS])})") from None  # fmt: skip
        p = Path(name)
        return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")

    @staticmethod
    def _check(path: Path) -> None:
        from fastmlp._io import check_output_path

        check_output_path(path, "model checkpoint")

    def on_train_begin(self, net: Network, history: History) -> None:
        if getattr(history, self.monitor) is None and (self.save_best_only or "{" + self.monitor in self.filepath):
            raise ValueError(f"ModelCheckpoint monitors {self.monitor!r}, which this fit does not record "
                             "(validation metrics need X_valid/y_valid or validation_split=; accuracy is not defined "
                             "for regression)")  # fmt: skip
        self.rule.reset()
        self.best_epoch = None

    def on_epoch_end(self, net: Network, history: History) -> bool:
        value = getattr(history, self.monitor)
        current = None if value is None else value[-1]
        if self.save_best_only:
            improved, _ = self.rule.update(current)  # type: ignore[arg-type]
            if not improved:
                return False
            self.best_epoch = history.epoch[-1]
        values: dict[str, Any] = {k: (None if getattr(history, k) is None else getattr(history, k)[-1]) for k in MONITORS}
        values.update({keras: values[ours] for keras, ours in KERAS_MONITORS.items()})
        path = self._format(history.epoch[-1], values)
        saved = net.save(path)
        self.last_saved = saved
        if self.verbose:
            why = f"{self.monitor} improved to {current:.5g}, " if self.save_best_only else ""
            print(f"Epoch {history.epoch[-1]}: {why}model saved to {saved}", flush=True)
        return False

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"rule": self.rule.state_dict(), "best_epoch": self.best_epoch}, {}

    def load_state_dict(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.best_epoch = state["best_epoch"]
