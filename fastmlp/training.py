"""The one fit loop: integer labels or dense targets, every optimizer, in small phases.

:func:`fit` validates once (:func:`_prepare_data`), freezes the options into an
:class:`~fastmlp.backends.contract.EpochPlan` (:func:`_make_plan`), then runs
epochs (:class:`_Run`): each epoch is one compiled call, a validation pass and
a *commit* -- the history, the callbacks, the schedule and the checkpoint see
the epoch only once it is complete, and a Ctrl-C either rolls the network back
to the start of the epoch it interrupted or, during the commit, waits until the
commit is done.  Weights, optimizer state, step counter, history and
checkpoint therefore always describe the same completed epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends import reference as _ref
from fastmlp.backends.contract import ACT_CODES, LOSS_CODES, EpochPlan, EpochStats, OptimizerState, plan_epoch
from fastmlp.callbacks import Callback, EarlyStopping
from fastmlp.history import History
from fastmlp.optimizers import Optimizer, get_optimizer
from fastmlp.progress import EpochProgress

if TYPE_CHECKING:
    from fastmlp.network import Network

__all__ = ["History", "fit"]

#: inputs whose largest magnitude exceeds this many times the unit scale get a warning (0..255 pixels do)
UNSCALED_LIMIT = 100.0
#: the loss is "at chance" when it stays above this fraction of the loss of predicting the target means ...
CHANCE_RATIO = 0.98
#: ... for each of this many first epochs of a fit
CHANCE_EPOCHS = 3
#: rows the chance-level loss is computed on
CHANCE_ROWS = 10_000


# ------------------------------------------------------------------------------ data
@dataclass
class _Data:
    """Validated training (and validation) data: arrays the kernels can take as they are."""

    X: np.ndarray
    Y: np.ndarray
    sw: np.ndarray | None
    Xv: np.ndarray | None
    Yv: np.ndarray | None
    swv: np.ndarray | None
    target: str
    task: str

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


def task_of(net: Network, Y: np.ndarray, target: str) -> str:
    """What the targets are: 'classification', 'multilabel', 'soft labels' or 'regression'."""
    if target == "labels":
        return "classification"
    if net.output in ("identity", "exp"):
        return "regression"
    if net.output == "sigmoid":
        return "multilabel" if np.isin(Y, (0, 1)).all() else "soft labels"
    return "classification" if np.isin(Y, (0, 1)).all() else "soft labels"


def as_targets(net: Network, y: object, n_samples: int, name: str = "y") -> tuple[str, np.ndarray]:
    """``(target kind, array)`` for ``y``: integer labels ``(n,)`` or a dense ``(n, n_outputs)`` matrix.

    A 2-D ``y`` is a dense target matrix (regression outputs, multi-label indicators
    or soft labels), except one column of integers for a network with several
    outputs (labels as a column).  A 1-D ``y`` is integer class labels, except for a
    one-output regression network (identity or exp output), where it is the target.
    """
    try:
        arr = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of class labels or targets: {exc}") from exc
    k = net.n_outputs
    if arr.ndim == 2 and not (arr.shape[1] == 1 and k > 1 and arr.dtype.kind in "iub"):
        if arr.shape[1] != k:
            hint = ""
            if arr.shape[1] > 1 and k > 1 and arr.dtype.kind in "iubf" and _looks_onehot(arr):
                hint = f"; if these are one-hot labels for a {arr.shape[1]}-class problem, build the network with " \
                       f"{arr.shape[1]} outputs or pass {name}.argmax(1)"
            raise ValueError(f"{name} has {arr.shape[1]} target columns but the network has {k} outputs{hint}")
        if arr.shape[0] != n_samples:
            raise ValueError(f"{name} has {arr.shape[0]} rows but X has {n_samples}; they must match")
        Y = V.as_features(arr.astype(np.float64) if arr.dtype.kind == "b" else arr, net.dtype, name)
        _check_dense(net, Y, name)
        return "dense", Y
    if arr.ndim == 1 and k == 1 and net.output in ("identity", "exp"):
        Y = V.as_features(arr.reshape(-1, 1), net.dtype, name)
        if Y.shape[0] != n_samples:
            raise ValueError(f"{name} has {Y.shape[0]} values but X has {n_samples} rows; they must match")
        _check_dense(net, Y, name)
        return "dense", Y
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise ValueError(f"{name} must be 1-D class labels or ({n_samples}, {k}) targets, got shape {arr.shape}")
    return "labels", V.as_labels(arr, n_samples, max(k, 2), name)


def _looks_onehot(arr: np.ndarray) -> bool:
    return bool(arr.size) and bool(np.isin(arr, (0, 1)).all()) and bool((arr.sum(axis=1) == 1).all())


def _check_dense(net: Network, Y: np.ndarray, name: str) -> None:
    if net.loss == "ce" or (net.output in ("sigmoid", "softmax") and net.loss == "mse"):
        if Y.min() < 0 or Y.max() > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1] for a {net.output} output "
                             f"(got values in [{Y.min():g}, {Y.max():g}]); for regression use output='identity'")  # fmt: skip
    if net.output == "softmax" and net.loss == "ce":
        sums = Y.sum(axis=1, dtype=np.float64)
        if np.abs(sums - 1).max() > 1e-4:
            raise ValueError(f"{name}: soft labels for a softmax output must sum to 1 per row "
                             f"(row sums in [{sums.min():g}, {sums.max():g}])")  # fmt: skip
    if net.loss == "poisson" and Y.min() < 0:
        raise ValueError(f"{name} must be >= 0 for the Poisson loss, got a minimum of {Y.min():g}")


def _prepare_data(net: Network, X: object, y: object, X_valid: object, y_valid: object, validation_split: float,
                  sample_weight: object, valid_sample_weight: object) -> _Data:  # fmt: skip
    written = [*net.weights, *net.biases]
    Xc = V.detached(V.as_features(X, net.dtype, "X", n_features=net.n_features), written)
    target, Y = as_targets(net, y, Xc.shape[0], "y")
    Y = V.detached(Y, written)
    sw = None if sample_weight is None else V.as_sample_weight(sample_weight, Xc.shape[0])
    validation_split = V.check_float(validation_split, "validation_split", low=0.0, high=1.0, high_open=True)
    if (X_valid is None) != (y_valid is None):
        raise ValueError("pass both X_valid and y_valid, or neither")
    Xv = Yv = swv = None
    if X_valid is not None:
        if validation_split:
            raise ValueError("pass X_valid/y_valid or validation_split, not both")
        Xv = V.as_features(X_valid, net.dtype, "X_valid", n_features=net.n_features)
        kind, Yv = as_targets(net, y_valid, Xv.shape[0], "y_valid")
        if kind != target:
            raise ValueError(f"y_valid holds {kind} but y holds {target}; give both in the same form")
        if valid_sample_weight is not None:
            swv = V.as_sample_weight(valid_sample_weight, Xv.shape[0], "valid_sample_weight")
    elif validation_split:
        # Keras's convention: the last rows, before any shuffling
        n_valid = math.floor(Xc.shape[0] * validation_split)
        if n_valid < 1 or n_valid >= Xc.shape[0]:
            raise ValueError(f"validation_split={validation_split} leaves no training or no validation rows "
                             f"out of {Xc.shape[0]}")  # fmt: skip
        cut = Xc.shape[0] - n_valid
        Xc, Xv, Y, Yv = Xc[:cut], Xc[cut:], Y[:cut], Y[cut:]
        if sw is not None:
            sw, swv = sw[:cut], sw[cut:]
    return _Data(Xc, Y, sw, Xv, Yv, swv, target, task_of(net, Y, target))


# ------------------------------------------------------------------------------ plan
def _make_plan(net: Network, target: str, batch_size: int, opt: Optimizer, l2: float, l1: float, alpha: float,
               dropout: float, input_dropout: float, inverted: bool, mask_seed: int) -> EpochPlan:  # fmt: skip
    L = len(net.weights)
    keeps = [1.0 - input_dropout] + [1.0 - dropout] * (L - 1)
    return plan_epoch(net.layers, net.dtype, batch_size=batch_size, hidden=net.activation, output=net.output,
                      loss=net.loss, target=target, l2=l2 + opt.weight_decay, l1=l1, alpha=alpha, keep=keeps,
                      inverted=inverted, seed=mask_seed, **opt.plan_fields())  # fmt: skip


def _epoch_lrs(lr: Any, epoch: int, n_steps: int) -> np.ndarray:
    """Learning rate of each minibatch step of ``epoch`` (0-based within this fit)."""
    if hasattr(lr, "epoch_lrs"):
        lrs = np.asarray(lr.epoch_lrs(epoch, n_steps), dtype=np.float64)
        if lrs.shape != (n_steps,) or not np.isfinite(lrs).all() or (lrs < 0).any():
            raise ValueError(f"the learning-rate schedule {lr!r} gave invalid rates for epoch {epoch}")
        return lrs
    return np.full(n_steps, float(lr))


# ------------------------------------------------------------------------------ interrupts
class _InterruptGuard:
    """SIGINT as KeyboardInterrupt, except inside :meth:`deferred` blocks, where it waits for the block's end.

    Installed only in the main thread and only over Python's default handler (a
    handler of the caller's own is left alone).
    """

    def __init__(self) -> None:
        self._old: Any = None
        self._depth = 0
        self._pending = False

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # fmt: skip
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending:
            self._pending = False
            raise KeyboardInterrupt


# ------------------------------------------------------------------------------ the run
@dataclass
class _Snapshot:
    """What an interrupted or diverged epoch rolls back to."""

    params: tuple[list[np.ndarray], list[np.ndarray]]
    state: OptimizerState
    step: int
    epochs: int
    rng: dict
    n_hist: int


class _Run:
    """One fit: the prepared epochs, the schedule, the callbacks, the history; :meth:`train` runs it."""

    def __init__(self, net: Network, data: _Data, plan: EpochPlan, lr: Any, orders: Callable[[int], np.ndarray],
                 rng: np.random.Generator, cbs: list[Callback], score: Callable | None, verbose: int,
                 on_divergence: str, checkpoint: Any, guard: _InterruptGuard, warn: bool = False) -> None:  # fmt: skip
        self.net, self.data, self.plan, self.lr, self.orders, self.rng = net, data, plan, lr, orders, rng
        self.cbs, self.score, self.verbose, self.on_divergence, self.ckpt = cbs, score, verbose, on_divergence, checkpoint
        self.epoch = net.backend.prepare(data.X, data.Y, plan, sample_weight=data.sw)
        self.n_steps = plan.n_steps(data.n)
        self.hist = History.for_fit(data.task, data.Xv is not None)
        self.guard = guard
        self.progress = EpochProgress(verbose, net.epochs_, self.n_steps)
        self.chance = _chance_loss(net, data) if warn else None
        self.at_chance = 0  # first epochs of this fit in a row whose loss stayed at the chance level

    def replan(self, **changes: Any) -> None:
        """Change fields of the plan (a resumed run's dropout seed) and prepare the epochs again."""
        self.plan = self.plan.replace(**changes)
        self.epoch = self.net.backend.prepare(self.data.X, self.data.Y, self.plan, sample_weight=self.data.sw)

    def snapshot(self) -> _Snapshot:
        net = self.net
        return _Snapshot(net.get_params(), net.optimizer_state_.copy(), net.step_, net.epochs_,  # type: ignore[union-attr]
                         self.rng.bit_generator.state, len(self.hist.epoch))  # fmt: skip

    def restore(self, s: _Snapshot) -> None:
        net = self.net
        net.set_params(*s.params)
        net.optimizer_state_ = s.state.copy()
        net.step_, net.epochs_ = s.step, s.epochs
        self.rng.bit_generator.state = s.rng
        self.hist._truncate(s.n_hist)

    def train(self, epochs: int, first: int, interrupted: bool = False) -> History:
        """Run epochs ``first .. epochs - 1`` (inside the fit's interrupt guard)."""
        net, hist = self.net, self.hist
        self.committed = self.snapshot()
        run_context = _fit_context(net, self.plan)
        try:
            if interrupted:  # Ctrl-C during the setup: nothing was trained
                raise KeyboardInterrupt
            with run_context:
                for e in range(first, epochs):
                    if self._epoch(e, epochs):
                        break
        except KeyboardInterrupt:
            self.progress.close()
            self.restore(self.committed)
            hist.interrupted = True
            if self.ckpt is not None and hist.epoch:
                self.ckpt.save(self, epochs_done=len(hist.epoch))
            print(f"\nInterrupted after {len(hist.epoch)} complete epochs; the network keeps the weights of the "
                  "last complete one.", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            self.progress.close()
            for cb in self.cbs:
                cb.on_train_end(net, hist)
        return hist

    def _epoch(self, e: int, epochs: int) -> bool:
        """Train, evaluate and commit epoch ``e`` (0-based in this fit); True to stop."""
        net, hist, data = self.net, self.hist, self.data
        t0 = time.perf_counter()
        order = self.orders(e)
        lrs = _epoch_lrs(self.lr, e, self.n_steps)
        state = net.optimizer_state_
        self.progress.total = net.epochs_ - e + epochs  # the last epoch number of this fit
        self.progress.start_epoch(net.epochs_ + 1)
        # overflow on the way to a divergence is detected below and reported once, clearly
        with np.errstate(over="ignore", invalid="ignore"):
            stats = self._train_steps(order, lrs, state)
        net.step_ += self.n_steps
        data_loss = stats.loss_sum / data.n
        if not (math.isfinite(data_loss) and math.isfinite(stats.penalty_sum) and _finite_params(net)):
            return self._diverged(lrs)
        record: dict[str, Any] = {
            "epoch": net.epochs_ + 1,
            "train_data_loss": float(data_loss),
            "train_loss": float(data_loss + stats.penalty_sum / data.n + net.penalty(self.plan.l2, self.plan.l1)),
            "train_acc": stats.n_correct / data.n,
            "lr": float(np.mean(lrs)) if lrs.size else 0.0,
            "step_lr": lrs.copy() if hasattr(self.lr, "epoch_lrs") else None,
        }
        if data.Xv is not None:
            vl, va, vs = net._evaluate_checked(data.Xv, data.Yv, data.swv, self.score)  # type: ignore[arg-type]
            record.update(valid_loss=vl, valid_acc=va, valid_score=vs)
        else:
            record.update(valid_loss=None, valid_acc=None, valid_score=None)
        record["seconds"] = time.perf_counter() - t0
        with self.guard.deferred():  # the commit: a Ctrl-C in here waits for its end
            hist._append(record)
            net.epochs_ += 1
            self.progress.end_epoch(hist)
            if self.chance is not None:
                self._check_chance(e)
            stop = False
            for cb in self.cbs:
                stop = bool(cb.on_epoch_end(net, hist)) or stop
            if hasattr(self.lr, "step_epoch"):
                self.lr.step_epoch(hist)
            if stop and hist.stopped_epoch is None:
                hist.stopped_epoch = hist.epoch[-1]
            if self.ckpt is not None and (stop or self.ckpt.due(e + 1, epochs)):
                self.ckpt.save(self, epochs_done=len(hist.epoch))
            self.committed = self.snapshot()
        return stop

    def _train_steps(self, order: np.ndarray, lrs: np.ndarray, state: OptimizerState) -> EpochStats:
        """The epoch's steps: one compiled call, or (under a progress bar) a few calls of consecutive steps.

        Chunks train exactly what one call trains (the same rows, rates, dropout steps
        and optimizer steps in the same order); see :mod:`fastmlp.progress`.
        """
        net, p, bs = self.net, self.progress, self.plan.batch_size
        params = (net.weights, net.biases)
        if not p.chunked or order.shape[0] != self.data.n:
            stats = self.epoch(order, params, state, lrs, net.step_)
            p.update(self.n_steps, order.shape[0], stats.loss_sum, None if self.hist.train_acc is None else stats.n_correct)
            return stats
        done, loss, penalty, correct = 0, 0.0, 0.0, 0
        size = p.first_chunk()
        while done < self.n_steps:
            t = time.perf_counter()
            s = self.epoch(order[done * bs : (done + size) * bs], params, state, lrs[done : done + size], net.step_ + done)
            p.timed(size, time.perf_counter() - t)
            done += size
            loss, penalty, correct = loss + s.loss_sum, penalty + s.penalty_sum, correct + s.n_correct
            p.update(size, min(done * bs, order.shape[0]), loss, None if self.hist.train_acc is None else correct)
            if done < self.n_steps and not (math.isfinite(loss) and _finite_params(net)):
                break  # diverged: the caller restores the last epoch (the next call would refuse these weights)
            size = p.next_chunk(done)
        return EpochStats(loss, penalty, correct)

    def _check_chance(self, e: int) -> None:
        """Warn once when the first epochs of this fit all kept the loss at the chance level."""
        if e >= CHANCE_EPOCHS or self.at_chance < 0:
            return
        chance = self.chance
        if self.hist.train_data_loss[-1] < CHANCE_RATIO * chance:  # type: ignore[operator]
            self.at_chance = -1  # learning: never warn in this fit
            return
        self.at_chance += 1
        if self.at_chance == CHANCE_EPOCHS:
            X = self.data.X
            hi = float(max(X.max(), -X.min()))
            warnings.warn(f"the training loss has not fallen below the chance level in the first {CHANCE_EPOCHS} epochs "
                          f"({self.hist.train_data_loss[-1]:.4g}; predicting the class frequencies gives {chance:.4g}): "
                          f"the network is not learning. Check the input scale (X reaches {hi:g}; scale it to about 1), "
                          f"the learning rate (try fastmlp.lr_find) and the output/loss pairing ({self.net.output}/"
                          f"{self.net.loss}); warn=False silences this", UserWarning, stacklevel=6)  # fmt: skip

    def _diverged(self, lrs: np.ndarray) -> bool:
        self.progress.close()
        self.restore(self.committed)
        self.hist.diverged = True
        msg = (f"training diverged in epoch {self.net.epochs_ + 1} (non-finite loss or weights); the weights of the "
               f"last finite epoch were kept. Lower the learning rate (lr={float(np.mean(lrs)):g})"
               + (" or scale the targets." if self.data.task == "regression" else "."))  # fmt: skip
        if self.on_divergence == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return True


def _fit_context(net: Network, plan: EpochPlan) -> contextlib.AbstractContextManager:
    """A compiled backend may hold its BLAS on one thread for the whole run (see backends.cython.fit_context)."""
    ctx = getattr(net.backend.raw, "fit_context", None)
    return ctx(list(plan.sizes), plan.batch_size) if ctx is not None else contextlib.nullcontext()


def _finite_params(net: Network) -> bool:
    return all(V.all_finite(W) and V.all_finite(b) for W, b in zip(net.weights, net.biases, strict=True)) and all(
        V.all_finite(a) for a in net.optimizer_state_.arrays()  # type: ignore[union-attr]
    )


def _chance_loss(net: Network, data: _Data) -> float | None:
    """Mean loss of predicting the mean target (the class frequencies) on the first rows; None for regression."""
    if data.task == "regression":
        return None
    Y = data.Y[:CHANCE_ROWS]
    T = _ref.target_matrix(Y, net.n_outputs, net.dtype).astype(np.float64)
    A = np.broadcast_to(T.mean(axis=0), T.shape)
    if net.output == "softmax":
        A = A / max(float(A[0].sum()), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        loss = float(np.mean(_ref.sample_losses(np.ascontiguousarray(A), T, ACT_CODES[net.output], LOSS_CODES[net.loss])))
    return loss if math.isfinite(loss) and loss > 0 else None


def _warn_unscaled(X: np.ndarray, stacklevel: int) -> None:
    """Warn when X's largest magnitude is far above the unit scale the initialisation and the rates assume.

    Looked at on at most 4096 evenly spaced rows (a heuristic: a scan of all of a large X would cost a
    noticeable part of a ``fit(epochs=1)`` call).
    """
    if X.size == 0:
        return
    X = X[:: max(1, X.shape[0] // 4096)]
    hi = float(max(X.max(), -X.min()))
    if hi > UNSCALED_LIMIT:
        hint = "X / 255 for 8-bit pixels" if 200 <= hi <= 255 and X.min() >= 0 else "sklearn.preprocessing.StandardScaler"
        warnings.warn(f"X looks unscaled: its values reach {hi:g}, more than {UNSCALED_LIMIT:g} times the unit scale "
                      f"the initialisation and the learning rates assume, so units saturate and training may stall; "
                      f"scale it first (e.g. {hint}); warn=False silences this", UserWarning, stacklevel=stacklevel)  # fmt: skip


# ------------------------------------------------------------------------------ fit
def fit(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int | None = 100,
    lr: Any = 0.1,
    optimizer: str | Optimizer | None = None,
    X_valid: np.ndarray | None = None,
    y_valid: np.ndarray | None = None,
    validation_split: float = 0.0,
    sample_weight: np.ndarray | None = None,
    valid_sample_weight: np.ndarray | None = None,
    shuffle: bool | Callable[[int], np.ndarray] = True,
    seed: int | None = None,
    verbose: bool | int = True,
    l2: float = 0.0,
    l1: float = 0.0,
    alpha: float = 0.0,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    dropout_scaling: str = "inverted",
    early_stopping: int | EarlyStopping | None = None,
    callbacks: Sequence[Callback] | None = None,
    on_divergence: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    score: Callable[..., float] | None = None,
    reset: bool = False,
    warn: bool = True,
) -> History:
    """Train ``net`` by minibatch gradient descent (every minibatch step runs in the compiled epoch).

    Parameters
    ----------
    net : Network
    X : array-like (n_samples, n_features)
        Any real, integer or uint8 dtype; cast once to the network's dtype.
    y : array-like
        Integer class labels ``(n_samples,)`` in ``[0, n_outputs)`` (0/1 for one
        output unit), or a float target matrix ``(n_samples, n_outputs)``:
        regression targets (identity or exp output; ``(n_samples,)`` for one
        output), multi-label indicators or soft labels (sigmoid/softmax output).
    epochs : int
        Passes over the data in this call (>= 1); a network trained before
        continues from its weights and numbers its epochs on (``reset=True``
        starts afresh).
    batch_size : int or None
        Minibatch size; ``1`` is stochastic GD, ``None`` full-batch GD; above the
        number of samples it is clipped (with a warning).  The last partial batch
        is used.
    lr : float or schedule
        Learning rate, or a schedule from :mod:`fastmlp.schedules` (anything
        with ``epoch_lrs(epoch, n_steps)``; optional ``on_train_begin(history)``
        and ``step_epoch(history)`` are called before the first and after each
        epoch).  With a schedule, ``History.step_lr`` records every step's rate.
    optimizer : str or fastmlp.optimizers.Optimizer, optional
        ``'sgd'`` (default), ``'momentum'``, ``'nesterov'``, ``'adam'``, ``'adamw'``
        or an object such as ``Adam(beta1=0.8)``.  Its state lives with the
        network (``net.optimizer_state_``) and carries over to the next fit with
        the same optimizer.
    X_valid, y_valid : array-like, optional
        Validation data, evaluated after each epoch.
    validation_split : float
        Instead of ``X_valid``: hold out this fraction of the rows, the last
        ones before shuffling (Keras's convention).
    sample_weight, valid_sample_weight : array-like (n_samples,), optional
        Non-negative row weights of the training (and validation) data: each
        minibatch's output deltas are multiplied by the weights and normalised
        by their sum (scikit-learn's definition).
    shuffle : bool or callable
        Visit the rows in a new random order each epoch; or a callable
        ``shuffle(epoch) -> order`` giving each epoch's row order.
    seed : int, optional
        Seed of the shuffling and dropout masks (default: derived from the
        network's seed and step counter).
    verbose : {0, 1, 2} or bool
        What the fit shows, as in Keras: ``1`` (or ``True``, the default) a
        progress bar per epoch (``tqdm.auto``: text on a terminal, a widget in
        Jupyter) with the steps, the running training loss and accuracy, then the
        validation numbers; ``2`` one line per epoch (better in log files); ``0``
        (or ``False``) nothing.  See :mod:`fastmlp.progress`.
    l2, l1 : float
        The lecture's penalties ``½·l2·‖W‖²`` (as weight decay ``W ← (1 − lr·l2)W``
        each step) and ``l1·‖W‖₁``; biases are not penalized.
    alpha : float
        scikit-learn's L2 penalty ``½·alpha·‖W‖² / n_batch`` (its gradient added
        before the optimizer, so the per-step decay is ``lr·alpha/n_batch``).
    dropout, input_dropout : float
        Drop probabilities of hidden units and input features, in ``[0, 1)``.
    dropout_scaling : {'inverted', 'predict'}
        Inverted dropout scales kept units by ``1/keep`` while training; the
        classic ``'predict'`` variant scales the weights by ``keep`` at prediction.
    early_stopping : int or EarlyStopping, optional
        Patience (epochs) on the validation loss, or a configured callback.
        The best weights are restored at the end.
    callbacks : sequence of Callback, optional
    on_divergence : {'raise', 'stop'}
        On a non-finite loss or weight: restore the last finite epoch, then
        raise ``FloatingPointError`` or warn and stop.
    checkpoint : path, optional
        Write the whole training state to this file (npz + JSON, checksummed,
        atomically) every ``checkpoint_every`` epochs, at the end and on Ctrl-C.
    checkpoint_every : int
    resume : bool
        Continue from ``checkpoint`` if that file exists (a checkpoint of the same
        run, otherwise a ``ValueError`` saying what differs): the run ends with the
        weights of an uninterrupted one.  A missing file starts afresh.
    score : callable, optional
        ``score(y_valid, outputs, sample_weight=None) -> float`` recorded as
        ``valid_score`` (default: accuracy, subset accuracy or R², by task).
    reset : bool
        Re-initialise the weights (the network's ``init`` and ``seed``), the
        optimizer state and the counters first.
    warn : bool
        Warn (``UserWarning``) about silent traps: ``X`` whose values exceed
        :data:`UNSCALED_LIMIT` times the unit scale (0..255 pixels, say), and a
        training loss that stays at the chance level (the loss of predicting the
        class frequencies) for the first :data:`CHANCE_EPOCHS` epochs.

    Returns
    -------
    History
        Also stored as ``net.history_``.  A Ctrl-C returns the partial history
        with ``interrupted=True`` and the weights of the last complete epoch (or
        the best ones under early stopping).
    """
    options = locals()
    guard = _InterruptGuard()
    with guard:
        interrupted = False
        run: _Run | None = None
        first = 0
        try:
            with guard.deferred():  # a Ctrl-C during the setup waits for its end; then nothing is trained
                opts = SimpleNamespace(**{k: v for k, v in options.items() if k in _OPTIONS})
                run, first = _setup(net, X, y, guard, opts)
        except KeyboardInterrupt:
            interrupted = True
        if run is None:  # interrupted inside the setup itself (e.g. by a callback's on_train_begin)
            return History(interrupted=True)
        return run.train(int(epochs), first, interrupted)


#: the options of fit, as _setup receives them
_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "X_valid", "y_valid", "validation_split", "sample_weight",
            "valid_sample_weight", "shuffle", "seed", "verbose", "l2", "l1", "alpha", "dropout", "input_dropout",
            "dropout_scaling", "early_stopping", "callbacks", "on_divergence", "checkpoint", "checkpoint_every", "resume",
            "score", "reset", "warn")  # fmt: skip


def _setup(net: Network, X: Any, y: Any, guard: _InterruptGuard, o: SimpleNamespace) -> tuple[_Run, int]:
    """Validate every option, prepare data, plan, state and callbacks; return the run and its first epoch."""
    from fastmlp.checkpoint import Checkpoint

    (epochs, batch_size, lr, optimizer, X_valid, y_valid, validation_split, sample_weight, valid_sample_weight, shuffle,
     seed, verbose, l2, l1, alpha, dropout, input_dropout, dropout_scaling, early_stopping, callbacks, on_divergence,
     checkpoint, checkpoint_every, resume, score, reset, warn) = (getattr(o, k) for k in _OPTIONS)  # fmt: skip

    epochs = V.check_int(epochs, "epochs", minimum=1)
    opt = get_optimizer(optimizer)
    if not hasattr(lr, "epoch_lrs"):
        V.check_float(lr, "lr", low=0.0, low_open=True)
    l2, l1, alpha = (V.check_float(v, name, low=0.0) for v, name in ((l2, "l2"), (l1, "l1"), (alpha, "alpha")))
    dropout = V.check_float(dropout, "dropout", low=0.0, high=1.0, high_open=True)
    input_dropout = V.check_float(input_dropout, "input_dropout", low=0.0, high=1.0, high_open=True)
    if dropout_scaling not in ("inverted", "predict"):
        raise ValueError(f"dropout_scaling must be 'inverted' or 'predict', got {dropout_scaling!r}")
    if on_divergence not in ("raise", "stop"):
        raise ValueError(f"on_divergence must be 'raise' or 'stop', got {on_divergence!r}")
    if not (isinstance(shuffle, (bool, np.bool_)) or callable(shuffle)):
        raise TypeError(f"shuffle must be a bool or a callable returning each epoch's row order, got {shuffle!r}")
    if score is not None and not callable(score):
        raise TypeError("score must be a callable score(y_true, outputs, sample_weight=None) -> float")
    seed = V.check_seed(seed)
    if isinstance(verbose, (bool, np.bool_)):
        verbose = int(verbose)
    verbose = V.check_int(verbose, "verbose", minimum=0, maximum=2)
    checkpoint_every = V.check_int(checkpoint_every, "checkpoint_every", minimum=1)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint='path' (the file to resume from)")
    ckpt = Checkpoint(checkpoint, checkpoint_every) if checkpoint is not None else None  # checks the path now
    cbs: list[Callback] = list(callbacks or [])
    if early_stopping is not None and early_stopping is not False:
        cbs.append(early_stopping if isinstance(early_stopping, EarlyStopping)
                   else EarlyStopping(patience=V.check_int(early_stopping, "early_stopping", minimum=1)))  # fmt: skip
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be fastmlp.callbacks.Callback instances, got {type(cb).__name__}")
    if reset:
        net.reset()
    net.check_parameters()
    data = _prepare_data(net, X, y, X_valid, y_valid, validation_split, sample_weight, valid_sample_weight)
    if warn:
        _warn_unscaled(data.X, stacklevel=5)
    n = data.n
    bs = n if batch_size is None else V.check_int(batch_size, "batch_size", minimum=1)
    if bs > n:
        if batch_size is not None:
            warnings.warn(f"batch_size={bs} is larger than the {n} training samples; it is clipped to {n} "
                          "(one full batch per epoch)", UserWarning, stacklevel=3)  # fmt: skip
        bs = n

    inverted = dropout_scaling == "inverted"
    L = len(net.weights)
    keeps = [1.0 - input_dropout] + [1.0 - dropout] * (L - 1)
    net.predict_keep = None if inverted or (dropout == 0 and input_dropout == 0) else keeps
    net.dropout_, net.input_dropout_ = dropout, input_dropout  # the defaults of Network.mc_predict

    rng = np.random.default_rng(seed if seed is not None else [net.seed or 0, net.step_, 0x5EED])
    mask_seed = int(rng.integers(0, 2**63))
    plan = _make_plan(net, data.target, bs, opt, l2, l1, alpha, dropout, input_dropout, inverted, mask_seed)
    state = net.optimizer_state_
    if state is None or state.kind != plan.optimizer or not _state_fits(state, net):
        net.optimizer_state_ = OptimizerState.zeros(plan.optimizer, net.layers, net.dtype)
    if callable(shuffle) and not isinstance(shuffle, (bool, np.bool_)):
        orders = _checked_orders(shuffle, n)
    elif shuffle:
        def orders(epoch: int) -> np.ndarray:
            return rng.permutation(n)
    else:
        fixed = np.arange(n, dtype=np.int64)

        def orders(epoch: int) -> np.ndarray:
            return fixed

    run = _Run(net, data, plan, lr, orders, rng, cbs, score, verbose, on_divergence, ckpt, guard, bool(warn))
    net.history_ = run.hist
    if verbose:
        if net.epochs_:
            print(f"Continuing training of {net!r} after its epoch {net.epochs_} (reset=True starts afresh)",
                  flush=True)  # fmt: skip
        else:
            print(f"Training {net!r} on {n} samples, {run.n_steps} steps/epoch", flush=True)
    for cb in cbs:
        cb.on_train_begin(net, run.hist)
    if hasattr(lr, "on_train_begin"):
        lr.on_train_begin(run.hist)
    first = 0
    if ckpt is not None:
        ckpt.bind(run, epochs=epochs, signature_extra={"lr": repr(lr), "optimizer": repr(opt), "l2": l2, "l1": l1,
                                                       "alpha": alpha, "dropout": dropout, "input_dropout": input_dropout,
                                                       "dropout_scaling": dropout_scaling, "seed": seed})  # fmt: skip
        if resume and ckpt.exists():
            first = ckpt.load(run)
            net.history_ = run.hist
            if verbose:
                print(f"Resumed from {ckpt.path} after epoch {first} of {epochs}", flush=True)
    return run, first


def _state_fits(state: OptimizerState, net: Network) -> bool:
    pairs = list(zip(net.layers[:-1], net.layers[1:], strict=True))
    return all(len(s) == len(pairs) and all(a.shape == (o, i) and a.dtype == net.dtype for a, (i, o) in zip(s, pairs))
               for s in state.weights)  # fmt: skip


def _checked_orders(shuffle: Callable[[int], np.ndarray], n: int) -> Callable[[int], np.ndarray]:
    def orders(epoch: int) -> np.ndarray:
        order = np.asarray(shuffle(epoch))
        if order.ndim != 1 or order.dtype.kind not in "iu" or order.shape[0] > n:
            raise ValueError(f"shuffle({epoch}) must return a 1-D integer array of at most {n} row indices")
        return order

    return orders
