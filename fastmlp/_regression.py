"""Minibatch SGD for real-valued targets (the training loop behind :class:`fastmlp.sklearn.FastMLPRegressor`).

The kernel contract's ``output_delta`` takes integer class labels only, so
regression composes the public kernels of :class:`fastmlp.backends.Backend`
(``forward``, ``dropout_mask``, ``hidden_delta``, ``inplace_update``) in
Python with the output delta computed here in NumPy.  The output layer is the
identity and the loss the squared error, with the library's MSE scaling::

    Δ_out = 2 (A − Y) / n_batch                       (n_batch, n_outputs)

which is the gradient of ``(1/n) Σ_i Σ_j (a_ij − y_ij)²``: the squared error
summed over the outputs and averaged over the samples.  Everything else
(shuffling, dropout masks, learning-rate schedules, penalties, the update
order) follows :func:`fastmlp.training.fit` step for step, so that with
``Y = onehot(y)`` and an identity output this loop gives the same weights as
``Network.fit`` on the NumPy backend, bit for bit.

This module does not import scikit-learn.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends.contract import KEEP_BITS, keep_threshold
from fastmlp.callbacks import Callback
from fastmlp.training import _epoch_lrs
from fastmlp.training import _finite_params as _finite

if TYPE_CHECKING:
    from fastmlp.network import Network

__all__ = ["RegressionHistory", "fit_regression", "squared_error"]


@dataclass
class RegressionHistory:
    """Per-epoch record of :func:`fit_regression`.

    Attributes
    ----------
    epoch : list of int
        1-based epoch numbers.
    train_loss : list of float
        Training objective (data loss plus the norm penalty), averaged over the
        epoch's minibatches as they were trained (before each update).
    train_data_loss : list of float
        The same without the penalty: mean over samples of the squared error
        summed over the outputs.
    valid_loss, valid_score : list of float or None
        Data loss and score (``score(Y_valid, prediction)``, e.g. R²) on the
        validation data after each epoch; ``None`` without validation data.
    lr : list of float
        Mean learning rate of each epoch.
    step_lr : list of ndarray
        With a schedule: the rate of every minibatch step, one ``(n_steps,)``
        array per epoch (as :class:`fastmlp.training.History`).
    seconds : list of float
        Wall time of each epoch.
    best_epoch, stopped_epoch : int or None
        Set by a stopping callback.
    interrupted, diverged : bool
        Ended by Ctrl-C, or by a non-finite loss or weight.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_data_loss: list[float] = field(default_factory=list)
    valid_loss: list[float] | None = None
    valid_score: list[float] | None = None
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_lr: list[np.ndarray] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    interrupted: bool = False
    diverged: bool = False

    def __len__(self) -> int:
        return len(self.epoch)

    def __repr__(self) -> str:
        parts = [f"{len(self.epoch)} epochs"]
        if self.train_loss:
            parts.append(f"train_loss={self.train_loss[-1]:.4g}")
        if self.valid_score:
            parts.append(f"valid_score={self.valid_score[-1]:.4f}")
        if self.stopped_epoch is not None:
            parts.append(f"stopped_epoch={self.stopped_epoch}")
        if self.diverged:
            parts.append("diverged")
        return f"RegressionHistory({', '.join(parts)})"


def squared_error(P: np.ndarray, Y: np.ndarray) -> float:
    """Sum over samples and outputs of ``(p − y)²``, accumulated in float64.

    Parameters
    ----------
    P, Y : ndarray (n_samples, n_outputs)
    """
    diff = np.subtract(P, Y, dtype=np.float64)
    return float(np.einsum("ij,ij->", diff, diff))


def fit_regression(
    net: Network,
    X: np.ndarray,
    Y: np.ndarray,
    *,
    epochs: int,
    batch_size: int | None = 100,
    lr: Any = 0.01,
    X_valid: np.ndarray | None = None,
    Y_valid: np.ndarray | None = None,
    score: Callable[[np.ndarray, np.ndarray], float] | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    verbose: bool = False,
    l2: float = 0.0,
    l1: float = 0.0,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    dropout_scaling: str = "inverted",
    callbacks: Sequence[Callback] | None = None,
    on_divergence: str = "raise",
) -> RegressionHistory:
    """Train ``net`` (identity output) on real targets by minibatch SGD on the squared error.

    Parameters
    ----------
    net : Network
        Its output activation must be ``'identity'``; weights are updated in place.
    X : array-like (n_samples, n_features)
    Y : array-like (n_samples, n_outputs)
        Real targets; ``n_outputs`` is the network's output size.
    epochs : int
        Passes over the data (>= 1).
    batch_size : int or None
        Minibatch size (``None``: full batch); the last partial batch is used.
    lr : float or schedule
        Learning rate, or an object with ``epoch_lrs(epoch, n_steps)``
        (and optionally ``step_epoch(history)``), as :func:`fastmlp.training.fit`.
    X_valid, Y_valid : array-like, optional
        Validation data ``(n_valid, n_features)`` and ``(n_valid, n_outputs)``,
        evaluated after each epoch.
    score : callable, optional
        ``score(Y_valid, P_valid) -> float`` (higher is better) recorded as
        ``valid_score``; default: minus the validation loss.
    shuffle, seed, verbose, l2, l1, dropout, input_dropout, dropout_scaling, callbacks, on_divergence
        As in :func:`fastmlp.training.fit`.  Callbacks receive this function's
        :class:`RegressionHistory`.

    Returns
    -------
    RegressionHistory
    """
    if net.output != "identity":
        raise ValueError(f"regression needs an identity output layer, got output={net.output!r}")
    epochs = V.check_int(epochs, "epochs", minimum=1)
    V.check_parameters(net.weights, net.biases, net.dtype)
    Xc = V.as_features(X, net.dtype, "X", n_features=net.n_features)
    Yc = _as_targets(Y, net, Xc.shape[0], "y")
    n = Xc.shape[0]
    bs = n if batch_size is None else V.check_int(batch_size, "batch_size", minimum=1)
    bs = min(bs, n)
    if (X_valid is None) != (Y_valid is None):
        raise ValueError("pass both X_valid and Y_valid, or neither")
    Xv = Yv = None
    if X_valid is not None:
        Xv = V.as_features(X_valid, net.dtype, "X_valid", n_features=net.n_features)
        Yv = _as_targets(Y_valid, net, Xv.shape[0], "y_valid")
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
    cbs = list(callbacks or [])

    be = net.backend
    L = len(net.weights)
    dt = net.dtype
    keeps = [1.0 - input_dropout] + [1.0 - dropout] * (L - 1)
    inverted = dropout_scaling == "inverted"
    masked = [keep_threshold(k) < (1 << KEEP_BITS) for k in keeps]
    scales = [1.0 / k if inverted else 1.0 for k in keeps]
    net.predict_keep = None if inverted or (dropout == 0 and input_dropout == 0) else keeps
    net.dropout_, net.input_dropout_ = dropout, input_dropout  # as fastmlp.training.fit: mc_predict's defaults
    acts = [net.activation] * (L - 1) + ["identity"]

    # the same generator, draws and order of draws as fastmlp.training.fit
    rng = np.random.default_rng(seed if seed is not None else [net.seed or 0, net.step_, 0x5EED])
    mask_seed = int(rng.integers(0, 2**63))
    n_steps = -(-n // bs)
    hist = RegressionHistory(valid_loss=[] if Xv is not None else None, valid_score=[] if Xv is not None else None)
    if verbose:
        print(f"Training {net!r} (regression) on {n} samples, {n_steps} steps/epoch", flush=True)
    for cb in cbs:
        cb.on_train_begin(net, hist)  # type: ignore[arg-type]
    if hasattr(lr, "on_train_begin"):
        lr.on_train_begin(hist)
    snapshot = net.get_params()
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n, dtype=np.int64)
            lrs = _epoch_lrs(lr, epoch, n_steps)
            loss_sum = 0.0
            with np.errstate(over="ignore", invalid="ignore"):
                for step in range(n_steps):
                    idx = order[step * bs : (step + 1) * bs]
                    loss_sum += _sgd_step(be, net, Xc[idx], Yc[idx], acts, masked, keeps, scales,
                                          mask_seed, net.step_ + step, float(lrs[step]), l2, l1, dt)  # fmt: skip
                    if not np.isfinite(loss_sum):
                        break  # diverging: the validating kernels would refuse the non-finite values next
            net.step_ += n_steps
            data_loss = loss_sum / n
            if not (np.isfinite(data_loss) and _finite(net)):
                net.set_params(*snapshot)
                hist.diverged = True
                msg = (f"training diverged in epoch {epoch + 1} (non-finite loss or weights); the weights of the "
                       f"last finite epoch were kept. Lower the learning rate (lr={float(np.mean(lrs)):g}) "
                       "or scale the targets.")  # fmt: skip
                if on_divergence == "raise":
                    raise FloatingPointError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                break
            hist.epoch.append(epoch + 1)
            hist.train_data_loss.append(float(data_loss))
            hist.train_loss.append(float(data_loss + net.penalty(l2, l1)))
            hist.lr.append(float(np.mean(lrs)))
            if hasattr(lr, "epoch_lrs"):
                hist.step_lr.append(lrs)
            if Xv is not None:
                P = net.predict_proba(Xv)
                vl = squared_error(P, Yv) / Xv.shape[0]
                hist.valid_loss.append(vl)  # type: ignore[union-attr]
                hist.valid_score.append(float(score(Yv, P)) if score is not None else -vl)  # type: ignore[union-attr]
            hist.seconds.append(time.perf_counter() - t0)
            if verbose:
                line = f"Epoch: {epoch + 1:03d}/{epochs:03d} | Train loss: {hist.train_loss[-1]:.6g}"
                if hist.valid_score:
                    line += f" | Valid loss: {hist.valid_loss[-1]:.6g} | Valid score: {hist.valid_score[-1]:.4f}"  # type: ignore[index]
                print(line + f" | {hist.seconds[-1]:.2f}s", flush=True)
            snapshot = net.get_params()
            stop = False
            for cb in cbs:
                stop = cb.on_epoch_end(net, hist) or stop  # type: ignore[arg-type]
            if hasattr(lr, "step_epoch"):
                lr.step_epoch(hist)
            if stop:
                break
    except KeyboardInterrupt:
        net.set_params(*snapshot)
        hist.interrupted = True
        print(f"\nInterrupted after {len(hist.epoch)} complete epochs; the network keeps consistent weights.",
              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for cb in cbs:
            cb.on_train_end(net, hist)  # type: ignore[arg-type]
    return hist


def _sgd_step(
    be: Any,
    net: Network,
    A: np.ndarray,
    Y: np.ndarray,
    acts: list[str],
    masked: list[bool],
    keeps: list[float],
    scales: list[float],
    mask_seed: int,
    step: int,
    lr: float,
    l2: float,
    l1: float,
    dt: np.dtype,
) -> float:
    """One minibatch: forward with dropout, MSE delta, backward and update (top layer first).

    ``A (n_batch, n_features)`` is the gathered input, ``Y (n_batch, n_outputs)`` its targets.
    Returns the squared error summed over the batch, measured before the update, or
    ``inf`` (leaving the weights partly updated) as soon as a delta or weight is
    not finite: the caller restores the last finite epoch.
    """
    nb = A.shape[0]
    inputs: list[np.ndarray] = []  # the (dropped-out) input of each layer: the update's A
    raw: list[np.ndarray] = []  # each layer's input before dropout: the derivative's A
    masks: list[np.ndarray | None] = []
    for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        m = None
        A_in = A
        if masked[i]:
            m = be.dropout_mask(mask_seed, step, i, nb, A.shape[1], keeps[i], scale=scales[i], dtype=dt)
            A_in = A * m
        raw.append(A)
        masks.append(m)
        inputs.append(A_in)
        A = be.forward(A_in, W, b, acts[i])
    loss = squared_error(A, Y)
    if not np.isfinite(loss):
        return loss
    # the library's MSE scaling (DESIGN §3): 2 (a − y) / n_batch, summed over the outputs
    D = 2.0 * (A - Y) / nb
    for i in range(len(net.weights) - 1, -1, -1):
        D_prev = None
        if i > 0:  # the next-lower delta uses the not-yet-updated W
            D_prev = be.hidden_delta(D, net.weights[i], raw[i], acts[i - 1], mask=masks[i])
            if not _all_finite(D_prev):
                return np.inf
        be.inplace_update(net.weights[i], net.biases[i], D, inputs[i], lr, l2, l1)
        if not (_all_finite(net.weights[i]) and _all_finite(net.biases[i])):
            return np.inf
        D = D_prev
    return loss


def _all_finite(a: np.ndarray) -> bool:
    # one reduction in the common case; the sum of finite values can overflow, so confirm before saying no
    return bool(np.isfinite(a.sum(dtype=np.float64))) or bool(np.isfinite(a).all())


def _as_targets(Y: object, net: Network, n_samples: int, name: str) -> np.ndarray:
    arr = np.asarray(Y)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != n_samples:
        raise ValueError(f"{name} must be (n_samples,) or (n_samples, n_outputs) with {n_samples} rows, got {arr.shape}")
    if arr.shape[1] != net.n_classes:
        raise ValueError(f"{name} has {arr.shape[1]} outputs but the network has {net.n_classes}")
    return V.as_features(arr, net.dtype, name)
