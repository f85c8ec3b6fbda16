"""The fit loop: epochs, shuffling, evaluation, callbacks, divergence and interrupt handling."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp._io import atomic_write
from fastmlp.backends._contract import ACT_CODES, KEEP_BITS, LOSS_CODES, keep_threshold
from fastmlp.callbacks import Callback, EarlyStopping

if TYPE_CHECKING:
    from fastmlp.network import Network

_METRICS = ("epoch", "train_loss", "train_data_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds")


@dataclass
class History:
    """Per-epoch record of a :func:`fit`.

    Attributes
    ----------
    epoch : list of int
        1-based epoch numbers.
    train_loss : list of float
        Training loss including the norm penalty, averaged over the epoch's
        minibatches as they were trained (before each update).
    train_data_loss : list of float
        The same without the penalty.
    train_acc : list of float
        Training accuracy in [0, 1], counted the same way.
    valid_loss, valid_acc : list of float or None
        Loss and accuracy on the validation data after each epoch (``None``
        when no validation data was given).
    lr : list of float
        Mean learning rate used in the epoch.
    step_lr : list of ndarray
        With a schedule (``lr`` given as an object with ``epoch_lrs``): the
        learning rate of every minibatch step, one float64 array
        ``(n_steps,)`` per epoch; empty for a constant float ``lr``.
        :meth:`iteration_lr` concatenates them.
    seconds : list of float
        Wall time of each epoch (training and evaluation).
    best_epoch, stopped_epoch : int or None
        Set by early stopping.
    interrupted, diverged : bool
        Training ended by Ctrl-C, or by a non-finite loss or weight.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_data_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    valid_loss: list[float] | None = None
    valid_acc: list[float] | None = None
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_lr: list[np.ndarray] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    interrupted: bool = False
    diverged: bool = False
    restored_best: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The per-epoch lists and the summary fields as a plain dict (``step_lr`` as lists of floats, one per
        epoch, so that the dict serializes to JSON as it is)."""
        d: dict[str, Any] = {k: (None if getattr(self, k) is None else list(getattr(self, k))) for k in _METRICS}
        d["step_lr"] = [a.tolist() for a in self.step_lr]
        d.update(best_epoch=self.best_epoch, stopped_epoch=self.stopped_epoch, interrupted=self.interrupted,
                 diverged=self.diverged, restored_best=self.restored_best)  # fmt: skip
        return d

    def iteration_lr(self) -> np.ndarray:
        """Learning rate of every minibatch step of the fit, ``(n_steps_total,)``; empty without a schedule."""
        return np.concatenate(self.step_lr) if self.step_lr else np.empty(0)

    def __len__(self) -> int:
        return len(self.epoch)

    def __repr__(self) -> str:
        if not self.epoch:
            return "History(0 epochs)"
        parts = [f"{len(self.epoch)} epochs", f"train_acc={self.train_acc[-1]:.4f}"]
        if self.valid_acc:
            parts.append(f"valid_acc={self.valid_acc[-1]:.4f}")
        if self.best_epoch is not None:
            parts.append(f"best_epoch={self.best_epoch}")
        if self.stopped_epoch is not None:
            parts.append(f"stopped_epoch={self.stopped_epoch}")
        if self.interrupted:
            parts.append("interrupted")
        if self.diverged:
            parts.append("diverged")
        return f"History({', '.join(parts)})"


def _finite_params(net: Network) -> bool:
    return all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in zip(net.weights, net.biases, strict=True))


def _epoch_lrs(lr: Any, epoch: int, n_steps: int) -> np.ndarray:
    """Learning rate of each minibatch step of ``epoch`` (0-based)."""
    if hasattr(lr, "epoch_lrs"):
        lrs = np.asarray(lr.epoch_lrs(epoch, n_steps), dtype=np.float64)
        if lrs.shape != (n_steps,) or not np.isfinite(lrs).all() or (lrs < 0).any():
            raise ValueError(f"the learning-rate schedule {lr!r} gave invalid rates for epoch {epoch}")
        return lrs
    return np.full(n_steps, float(lr))


def fit(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int | None = 100,
    lr: Any = 0.1,
    X_valid: np.ndarray | None = None,
    y_valid: np.ndarray | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    verbose: bool = True,
    l2: float = 0.0,
    l1: float = 0.0,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    dropout_scaling: str = "inverted",
    early_stopping: int | EarlyStopping | None = None,
    callbacks: Sequence[Callback] | None = None,
    on_divergence: str = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
) -> History:
    """Train ``net`` by minibatch stochastic gradient descent.

    Parameters
    ----------
    net : Network
    X : array-like (n_samples, n_features)
        Any real, integer or uint8 dtype; cast once to the network's dtype.
    y : array of int (n_samples,)
        Class indices in ``[0, n_classes)``.
    epochs : int
        Number of passes over the data (>= 1).
    batch_size : int or None
        Minibatch size; ``1`` is stochastic GD, ``None`` full-batch GD.  The last
        partial batch is used.
    lr : float or schedule
        Learning rate, or a schedule from :mod:`fastmlp.schedules` (anything
        with ``epoch_lrs(epoch, n_steps)``; optional ``on_train_begin(history)``
        and ``step_epoch(history)`` are called before the first and after
        each epoch).  With a schedule, ``History.step_lr`` records the rate of
        every step.
    X_valid, y_valid : array-like, optional
        Validation data, evaluated after each epoch.
    shuffle : bool
        Visit the rows in a new random order each epoch.
    seed : int, optional
        Seed of the shuffling and dropout masks (default: derived from the
        network's seed and step counter).
    verbose : bool
        Print one line per epoch.
    l2, l1 : float
        Penalties ``½·l2·‖W‖²`` (weight decay) and ``l1·‖W‖₁``; biases are not penalized.
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
        On a non-finite loss or weight: restore the last finite weights, then
        raise ``FloatingPointError`` or warn and stop.
    checkpoint : path, optional
        Write the whole training state (weights, step counter, shuffling RNG,
        history, callback and schedule state) to this file, atomically, every
        ``checkpoint_every`` epochs, at the end, and on Ctrl-C.  The file is a
        pickle: load only checkpoints you wrote yourself.
    checkpoint_every : int
        Epochs between checkpoints.
    resume : bool
        Continue from ``checkpoint`` if that file exists (same data size,
        batch size and network; otherwise a ``ValueError``): the run ends with
        the same weights as an uninterrupted one.  A missing file starts afresh.

    Returns
    -------
    History
        Also stored as ``net.history_``.  A Ctrl-C during training returns the
        partial history with ``interrupted=True`` and consistent weights (the
        last completed epoch's, or the best ones under early stopping).
    """
    epochs = V.check_int(epochs, "epochs", minimum=1)
    V.check_parameters(net.weights, net.biases, net.dtype)
    Xc = V.as_features(X, net.dtype, "X", n_features=net.n_features)
    yc = V.as_labels(y, Xc.shape[0], net.n_classes, "y")
    n = Xc.shape[0]
    bs = n if batch_size is None else V.check_int(batch_size, "batch_size", minimum=1)
    bs = min(bs, n)
    if (X_valid is None) != (y_valid is None):
        raise ValueError("pass both X_valid and y_valid, or neither")
    Xv = yv = None
    if X_valid is not None:
        Xv = V.as_features(X_valid, net.dtype, "X_valid", n_features=net.n_features)
        yv = V.as_labels(y_valid, Xv.shape[0], net.n_classes, "y_valid")
    if not hasattr(lr, "epoch_lrs"):
        V.check_float(lr, "lr", low=0.0, low_open=True)
    l2 = V.check_float(l2, "l2", low=0.0)
    l1 = V.check_float(l1, "l1", low=0.0)
    dropout = V.check_float(dropout, "dropout", low=0.0, high=1.0, high_open=True)
    input_dropout = V.check_float(input_dropout, "input_dropout", low=0.0, high=1.0, high_open=True)
    if dropout_scaling not in ("inverted", "predict"):
        raise ValueError(f"dropout_scaling must be 'inverted' or 'predict', got {dropout_scaling!r}")
    if on_divergence not in ("raise", "stop"):
        raise ValueError(f"on_divergence must be 'raise' or 'stop', got {on_divergence!r}")
    seed = V.check_seed(seed)
    checkpoint_every = V.check_int(checkpoint_every, "checkpoint_every", minimum=1)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint='path' (the file to resume from)")
    cbs: list[Callback] = list(callbacks or [])
    if early_stopping is not None and early_stopping is not False:
        cbs.append(early_stopping if isinstance(early_stopping, EarlyStopping)
                   else EarlyStopping(patience=V.check_int(early_stopping, "early_stopping", minimum=1)))  # fmt: skip
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be fastmlp.callbacks.Callback instances, got {type(cb).__name__}")

    L = len(net.weights)
    keeps = [1.0 - input_dropout] + [1.0 - dropout] * (L - 1)
    inverted = dropout_scaling == "inverted"
    thresholds = np.array([min(keep_threshold(k), 1 << KEEP_BITS) for k in keeps], dtype=np.int64)
    scales = np.array([1.0 / k if inverted else 1.0 for k in keeps], dtype=np.float64)
    net.predict_keep = None if inverted or (dropout == 0 and input_dropout == 0) else keeps
    # the rates of the last fit: the defaults of Network.mc_predict
    net.dropout_, net.input_dropout_ = dropout, input_dropout

    rng = np.random.default_rng(seed if seed is not None else [net.seed or 0, net.step_, 0x5EED])
    mask_seed = int(rng.integers(0, 2**63))
    n_steps = -(-n // bs)
    hist = History(valid_loss=[] if Xv is not None else None, valid_acc=[] if Xv is not None else None)
    net.history_ = hist
    raw = net.backend.raw
    h_code, o_code, l_code = ACT_CODES[net.activation], ACT_CODES[net.output], LOSS_CODES[net.loss]
    if verbose:
        print(f"Training {net!r} on {n} samples, {n_steps} steps/epoch", flush=True)
    for cb in cbs:
        cb.on_train_begin(net, hist)
    if hasattr(lr, "on_train_begin"):
        lr.on_train_begin(hist)
    signature = {"layers": list(net.layers), "dtype": net.dtype.name, "n": n, "batch_size": bs, "epochs": epochs}
    first_epoch = 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        first_epoch, mask_seed, hist = _load_checkpoint(checkpoint, signature, net, rng, cbs, lr)
        net.history_ = hist
        if hist.stopped_epoch is not None:  # the checkpointed run had already stopped early
            first_epoch = epochs
        if verbose:
            print(f"Resumed from {checkpoint} after epoch {first_epoch}", flush=True)
    snapshot = net.get_params()
    state_at_epoch_start = (net.step_, rng.bit_generator.state)
    # a compiled backend may hold its BLAS on one thread for the whole run (see backends.cython.fit_context)
    fit_context = getattr(raw, "fit_context", None)
    run_context = fit_context(net.layers, bs) if fit_context is not None else contextlib.nullcontext()
    try:
        run_context.__enter__()
        for epoch in range(first_epoch, epochs):
            state_at_epoch_start = (net.step_, rng.bit_generator.state)
            t0 = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n, dtype=np.int64)
            lrs = _epoch_lrs(lr, epoch, n_steps)
            # overflow on the way to a divergence is detected below and reported once, clearly
            with np.errstate(over="ignore", invalid="ignore"):
                loss_sum, n_correct = raw.train_epoch(
                    Xc, yc, order, net.weights, net.biases, lrs, h_code, o_code, l_code,
                    bs, l2, l1, thresholds, scales, mask_seed, net.step_,
                )  # fmt: skip
            net.step_ += n_steps
            data_loss = loss_sum / n
            if not (np.isfinite(data_loss) and _finite_params(net)):
                net.set_params(*snapshot)
                hist.diverged = True
                msg = (f"training diverged in epoch {epoch + 1} (non-finite loss or weights); the weights of the "
                       f"last finite epoch were kept. Lower the learning rate (lr={float(np.mean(lrs)):g}).")  # fmt: skip
                if on_divergence == "raise":
                    raise FloatingPointError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                break
            hist.epoch.append(epoch + 1)
            hist.train_data_loss.append(float(data_loss))
            hist.train_loss.append(float(data_loss + net.penalty(l2, l1)))
            hist.train_acc.append(n_correct / n)
            hist.lr.append(float(np.mean(lrs)))
            if hasattr(lr, "epoch_lrs"):
                hist.step_lr.append(lrs.copy())
            if Xv is not None:
                vl, va = net._evaluate_checked(Xv, yv)
                hist.valid_loss.append(vl)  # type: ignore[union-attr]
                hist.valid_acc.append(va)  # type: ignore[union-attr]
            hist.seconds.append(time.perf_counter() - t0)
            if verbose:
                _print_epoch(hist, epochs)
            # the epoch is complete from here on: an interrupt rolls back to this point
            snapshot = net.get_params()
            state_at_epoch_start = (net.step_, rng.bit_generator.state)
            stop = False
            for cb in cbs:
                stop = cb.on_epoch_end(net, hist) or stop
            if hasattr(lr, "step_epoch"):
                lr.step_epoch(hist)
            if checkpoint is not None and (stop or (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                _save_checkpoint(checkpoint, signature, epoch + 1, net, rng, mask_seed, hist, cbs, lr)
            if stop:
                break
    except KeyboardInterrupt:
        # back to the end of the last complete epoch: weights, step counter and shuffling RNG
        net.set_params(*snapshot)
        net.step_, rng_state = state_at_epoch_start
        rng.bit_generator.state = rng_state
        hist.interrupted = True
        if checkpoint is not None and hist.epoch:
            _save_checkpoint(checkpoint, signature, hist.epoch[-1], net, rng, mask_seed, hist, cbs, lr)
        print(f"\nInterrupted after {len(hist.epoch)} complete epochs; the network keeps consistent weights.",
              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        run_context.__exit__(None, None, None)
        for cb in cbs:
            cb.on_train_end(net, hist)
    return hist


_CHECKPOINT_FORMAT = ("fastmlp-checkpoint", 1)


def _save_checkpoint(path: str | os.PathLike[str], signature: dict[str, Any], epochs_done: int, net: Network,
                     rng: np.random.Generator, mask_seed: int, hist: History, cbs: list[Callback], lr: Any) -> None:  # fmt: skip
    """Write the training state atomically (temp file in the same directory, fsync, rename)."""
    state = {
        "format": _CHECKPOINT_FORMAT, "signature": signature, "epochs_done": epochs_done,
        "params": net.get_params(), "step": net.step_, "rng": rng.bit_generator.state, "mask_seed": mask_seed,
        "history": hist, "callbacks": [cb.__dict__ for cb in cbs],
        "schedule": lr.__dict__ if hasattr(lr, "epoch_lrs") else None,
    }  # fmt: skip
    atomic_write(path, lambda fh: pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL))


def _load_checkpoint(path: str | os.PathLike[str], signature: dict[str, Any], net: Network, rng: np.random.Generator,
                     cbs: list[Callback], lr: Any) -> tuple[int, int, History]:  # fmt: skip
    """Restore the state written by :func:`_save_checkpoint`; returns ``(epochs_done, mask_seed, history)``."""
    try:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
        fmt = state["format"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable fastmlp checkpoint: {exc}") from exc
    if fmt[0] != _CHECKPOINT_FORMAT[0] or fmt[1] > _CHECKPOINT_FORMAT[1]:
        raise ValueError(f"{path} is not a fastmlp checkpoint of a known format version ({fmt})")
    if state["signature"] != signature:
        raise ValueError(f"{path} was written by a different run ({state['signature']}); this run is {signature}")
    if len(state["callbacks"]) != len(cbs):
        raise ValueError(f"{path} holds {len(state['callbacks'])} callback states but this run has {len(cbs)} callbacks")
    net.set_params(*state["params"])
    net.step_ = state["step"]
    rng.bit_generator.state = state["rng"]
    for cb, cb_state in zip(cbs, state["callbacks"], strict=True):
        cb.__dict__.update(cb_state)
    if state["schedule"] is not None and hasattr(lr, "epoch_lrs"):
        lr.__dict__.update(state["schedule"])
    return int(state["epochs_done"]), int(state["mask_seed"]), state["history"]


def _print_epoch(hist: History, epochs: int) -> None:
    e = hist.epoch[-1]
    line = (f"Epoch: {e:03d}/{epochs:03d} | Train loss: {hist.train_loss[-1]:.4f} "
            f"| Train Acc: {100 * hist.train_acc[-1]:.2f}%")  # fmt: skip
    if hist.valid_acc:
        line += f" | Valid loss: {hist.valid_loss[-1]:.4f} | Valid Acc: {100 * hist.valid_acc[-1]:.2f}%"  # type: ignore[index]
    line += f" | {hist.seconds[-1]:.2f}s"
    print(line, flush=True)
