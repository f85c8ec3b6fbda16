"""Drop-in replacement for the classic pure-NumPy MNIST loop.

The functions and the class here have the names, signatures and printed
output of the ch. 11 notebook of Raschka, Liu & Mirjalili (2022), *Machine
Learning with PyTorch and Scikit-Learn*::

    from fastmlp.compat import NeuralNetMLP, train, compute_mse_and_acc, minibatch_generator, int_to_onehot

They consume the global ``np.random`` state exactly as the notebook does (one
``np.random.shuffle`` per epoch for training and one per evaluation), keep its
gradient scaling (``2(a - y)/batch_size``) and its dropping of a partial last
minibatch, and compute in float64 — so they give the notebook's numbers.  The
difference: :func:`train` runs each epoch through the fastest available
backend's compiled epoch (one :class:`~fastmlp.backends.contract.EpochPlan`,
the data validated once per call) instead of a Python loop over minibatches.

Set ``fastmlp.compat.backend = "numpy"`` (or ``FASTMLP_BACKEND``) to choose
the backend.  :func:`train` reads ``minibatch_size`` at call time where the
notebook's own ``train`` would find it: a global ``minibatch_size`` of the
module that calls it (the notebook's ``minibatch_size = 100`` cell) first,
then ``fastmlp.compat.minibatch_size``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends import PreparedEpochs, get_backend
from fastmlp.backends.contract import plan_epoch

__all__ = [
    "NeuralNetMLP",
    "accuracy",
    "compute_mse_and_acc",
    "int_to_onehot",
    "minibatch_generator",
    "minibatch_size",
    "mse_loss",
    "num_epochs",
    "sigmoid",
    "train",
]

#: the notebook's module-level settings
num_epochs = 50
minibatch_size = 100
#: backend used by :func:`train` and :func:`compute_mse_and_acc` ("auto" = fastest available)
backend = "auto"


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic sigmoid ``1 / (1 + exp(-z))``, elementwise."""
    return 1.0 / (1.0 + np.exp(-z))


def int_to_onehot(y: np.ndarray, num_labels: int) -> np.ndarray:
    """One-hot matrix ``(n_samples, num_labels)`` (float64) of integer labels ``y (n_samples,)``."""
    y = np.asarray(y)
    num_labels = V.check_int(num_labels, "num_labels", minimum=1)
    yy = V.as_labels(y, y.shape[0] if y.ndim else -1, num_labels, "y")
    ary = np.zeros((yy.shape[0], num_labels))
    ary[np.arange(yy.shape[0]), yy] = 1
    return ary


class NeuralNetMLP:
    """The notebook's one-hidden-layer sigmoid network (MSE loss, float64).

    Parameters
    ----------
    num_features, num_hidden, num_classes : int
    random_seed : int
        Seed of ``np.random.RandomState`` for the normal(0, 0.1) initialisation.

    Attributes
    ----------
    weight_h : ndarray (num_hidden, num_features)
    bias_h : ndarray (num_hidden,)
    weight_out : ndarray (num_classes, num_hidden)
    bias_out : ndarray (num_classes,)
    """

    def __init__(self, num_features: int, num_hidden: int, num_classes: int, random_seed: int = 123) -> None:
        num_features = V.check_int(num_features, "num_features", minimum=1)
        num_hidden = V.check_int(num_hidden, "num_hidden", minimum=1)
        self.num_classes = V.check_int(num_classes, "num_classes", minimum=1)
        random_seed = V.check_int(random_seed, "random_seed", minimum=0, maximum=2**32 - 1, allow_none=True)
        rng = np.random.RandomState(random_seed)
        self.weight_h = rng.normal(loc=0.0, scale=0.1, size=(num_hidden, num_features))
        self.bias_h = np.zeros(num_hidden)
        self.weight_out = rng.normal(loc=0.0, scale=0.1, size=(self.num_classes, num_hidden))
        self.bias_out = np.zeros(self.num_classes)

    def __repr__(self) -> str:
        n_h, n_f = np.shape(self.weight_h)
        return f"NeuralNetMLP(num_features={n_f}, num_hidden={n_h}, num_classes={self.num_classes})"

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hidden and output activations ``(n, num_hidden)``, ``(n, num_classes)`` of ``x (n, num_features)``."""
        z_h = np.dot(x, self.weight_h.T) + self.bias_h
        a_h = sigmoid(z_h)
        z_out = np.dot(a_h, self.weight_out.T) + self.bias_out
        a_out = sigmoid(z_out)
        return a_h, a_out

    def backward(
        self, x: np.ndarray, a_h: np.ndarray, a_out: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Gradients ``(d_w_out, d_b_out, d_w_h, d_b_h)`` of the MSE loss, the notebook's scaling."""
        y_onehot = int_to_onehot(y, self.num_classes)
        d_loss__d_a_out = 2.0 * (a_out - y_onehot) / y.shape[0]
        d_a_out__d_z_out = a_out * (1.0 - a_out)
        delta_out = d_loss__d_a_out * d_a_out__d_z_out
        d_loss__dw_out = np.dot(delta_out.T, a_h)
        d_loss__db_out = np.sum(delta_out, axis=0)
        d_loss__a_h = np.dot(delta_out, self.weight_out)
        d_a_h__d_z_h = a_h * (1.0 - a_h)
        delta_h = d_loss__a_h * d_a_h__d_z_h
        d_loss__d_w_h = np.dot(delta_h.T, x)
        d_loss__d_b_h = np.sum(delta_h, axis=0)
        return d_loss__dw_out, d_loss__db_out, d_loss__d_w_h, d_loss__d_b_h


def minibatch_generator(X: np.ndarray, y: np.ndarray, minibatch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(X_batch, y_batch)`` in a ``np.random.shuffle`` order; a partial last batch is dropped."""
    indices = np.arange(X.shape[0])
    np.random.shuffle(indices)
    for start_idx in range(0, indices.shape[0] - minibatch_size + 1, minibatch_size):
        batch_idx = indices[start_idx : start_idx + minibatch_size]
        yield X[batch_idx], y[batch_idx]


def mse_loss(targets: np.ndarray, probas: np.ndarray, num_labels: int = 10) -> float:
    """Mean squared error between one-hot ``targets`` and ``probas (n, num_labels)``."""
    onehot_targets = int_to_onehot(targets, num_labels=num_labels)
    return float(np.mean((onehot_targets - probas) ** 2))


def accuracy(targets: np.ndarray, predicted_labels: np.ndarray) -> float:
    """Fraction of ``predicted_labels`` equal to ``targets``."""
    return float(np.mean(predicted_labels == targets))


def _is_plain(model: object) -> bool:
    """True when ``model`` computes exactly the notebook's maths (no overridden forward/backward)."""
    return (
        isinstance(model, NeuralNetMLP)
        and type(model).forward is NeuralNetMLP.forward
        and type(model).backward is NeuralNetMLP.backward
    )


def _params(model: NeuralNetMLP) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The model's parameters as C-contiguous float64 arrays, written back to the model if copied."""
    for name in ("weight_h", "bias_h", "weight_out", "bias_out"):
        arr = getattr(model, name)
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.flags.c_contiguous and arr.flags.writeable):
            setattr(model, name, np.array(arr, dtype=np.float64, order="C"))
    weights, biases = [model.weight_h, model.weight_out], [model.bias_h, model.bias_out]
    V.check_parameters(weights, biases, np.dtype(np.float64))
    return weights, biases


def _backend_for(weights: list[np.ndarray], biases: list[np.ndarray]):
    """The chosen backend, or the NumPy one for a diverged model: the compiled kernels assume finite
    numbers, NumPy propagates NaN/Inf exactly as the notebook does."""
    if all(V.all_finite(a) for a in (*weights, *biases)):
        return get_backend(backend)
    return get_backend("numpy")


def _check_data(X: np.ndarray, y: np.ndarray, n_features: int, n_classes: int, mbs: int, what: str):
    Xc = V.as_features(X, np.dtype(np.float64), f"X_{what}" if what else "X", n_features=n_features)
    yc = V.as_labels(y, Xc.shape[0], n_classes, f"y_{what}" if what else "y")
    if Xc.shape[0] < mbs:
        raise ValueError(f"{what or 'X'} has {Xc.shape[0]} rows, fewer than one minibatch of {mbs}")
    return Xc, yc


def compute_mse_and_acc(
    nnet: NeuralNetMLP, X: np.ndarray, y: np.ndarray, num_labels: int = 10, minibatch_size: int = 100
) -> tuple[float, float]:
    """Mean of the per-minibatch MSE and the accuracy, over shuffled full minibatches (the notebook's)."""
    mbs = V.check_int(minibatch_size, "minibatch_size", minimum=1)
    num_labels = V.check_int(num_labels, "num_labels", minimum=1)
    if not _is_plain(nnet):
        mse, correct_pred, num_examples, n_batches = 0.0, 0, 0, 0
        for features, targets in minibatch_generator(X, y, mbs):
            n_batches += 1
            _, probas = nnet.forward(features)
            predicted_labels = np.argmax(probas, axis=1)
            onehot_targets = int_to_onehot(targets, num_labels=num_labels)
            mse += np.mean((onehot_targets - probas) ** 2)
            correct_pred += (predicted_labels == targets).sum()
            num_examples += targets.shape[0]
        if n_batches == 0:
            raise ValueError(f"X has {len(X)} rows, fewer than one minibatch of {mbs}")
        return mse / n_batches, correct_pred / num_examples
    weights, biases = _params(nnet)
    Xc, yc = _check_data(X, y, weights[0].shape[1], num_labels, mbs, "")
    if num_labels != weights[-1].shape[0]:
        raise ValueError(f"num_labels={num_labels} but the model has {weights[-1].shape[0]} outputs")
    return _mse_and_acc(weights, biases, Xc, yc, num_labels, mbs)


def _mse_and_acc(
    weights: list[np.ndarray], biases: list[np.ndarray], Xc: np.ndarray, yc: np.ndarray, num_labels: int, mbs: int
) -> tuple[float, float]:
    """:func:`compute_mse_and_acc` on validated data (C-contiguous float64 ``Xc``, int64 ``yc``)."""
    indices = np.arange(Xc.shape[0])
    np.random.shuffle(indices)  # consume the global state as the notebook's generator does
    n_batches = Xc.shape[0] // mbs
    idx = indices[: n_batches * mbs]
    be = _backend_for(weights, biases)
    # forward every row in place (no gather of X), then visit the outputs in the shuffled order
    probas_all = np.empty((Xc.shape[0], num_labels))
    be._forward_network_into(Xc, list(weights), list(biases), "sigmoid", "sigmoid", probas_all)
    probas = probas_all[idx]
    targets = yc[idx]
    sq = probas.copy()
    sq[np.arange(idx.shape[0]), targets] -= 1.0
    sq **= 2
    batch_mse = np.mean(sq.reshape(n_batches, mbs * num_labels), axis=1)
    mse = 0.0
    for v in batch_mse:  # the notebook's running sum, in its order
        mse += v
    correct = int(np.count_nonzero(np.argmax(probas, axis=1) == targets))
    return mse / n_batches, correct / idx.shape[0]


def _minibatch_size(caller_globals: dict[str, Any]) -> int:
    """The notebook's ``minibatch_size``: the caller's global first, then this module's."""
    if "minibatch_size" in caller_globals and caller_globals is not globals():
        value, where = caller_globals["minibatch_size"], "minibatch_size (a global of the calling module)"
    else:
        value, where = minibatch_size, "fastmlp.compat.minibatch_size"
    return V.check_int(value, where, minimum=1)  # type: ignore[return-value]


def train(
    model: NeuralNetMLP,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_valid: np.ndarray,
    y_valid: np.ndarray,
    num_epochs: int,
    learning_rate: float = 0.1,
) -> tuple[list[float], list[float], list[float]]:
    """The notebook's training loop: minibatch SGD, one printed line per epoch.

    The minibatch size is the notebook's global ``minibatch_size``: the calling
    module's (for a notebook, its own ``minibatch_size = ...`` cell) when it has
    one, else ``fastmlp.compat.minibatch_size`` (100).

    Parameters
    ----------
    model : NeuralNetMLP
    X_train : array-like (n_train, num_features)
    y_train : array-like of int (n_train,)
    X_valid : array-like (n_valid, num_features)
    y_valid : array-like of int (n_valid,)
    num_epochs : int
    learning_rate : float

    Returns
    -------
    epoch_loss, epoch_train_acc, epoch_valid_acc : lists of float
        Train MSE and train/valid accuracy (in %) after each epoch.
    """
    num_epochs = V.check_int(num_epochs, "num_epochs", minimum=0)
    lr = V.check_float(learning_rate, "learning_rate", low=0.0)
    mbs = _minibatch_size(sys._getframe(1).f_globals)
    plain = _is_plain(model)
    epoch_loss: list[float] = []
    epoch_train_acc: list[float] = []
    epoch_valid_acc: list[float] = []
    run_context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if plain:
        weights, biases = _params(model)
        Xc, yc = _check_data(X_train, y_train, weights[0].shape[1], model.num_classes, mbs, "train")
        # checked before the first epoch, so that data the evaluation rejects cannot fail after training
        # (compute_mse_and_acc below runs with its default minibatch of 100)
        _check_data(X_train, y_train, weights[0].shape[1], model.num_classes, 100, "train")
        Xv, yv = _check_data(X_valid, y_valid, weights[0].shape[1], model.num_classes, 100, "valid")
        epochs = _notebook_epochs(weights, Xc, yc, mbs)
        # keep the compiled backend's BLAS on one thread across epochs and evaluations (backends.cython.fit_context)
        fit_context = getattr(get_backend(backend).raw, "fit_context", None)
        if fit_context is not None:
            run_context = fit_context(list(epochs.plan.sizes), mbs)
    with run_context:
        for e in range(num_epochs):
            if plain and all(V.all_finite(a) for a in (*weights, *biases)):
                indices = np.arange(Xc.shape[0])
                np.random.shuffle(indices)
                # the notebook drops the partial last minibatch: visit only the full ones
                order = indices[: (Xc.shape[0] // mbs) * mbs]
                epochs(order, (weights, biases), None, lr)
            else:
                # a model of its own maths, or a diverged one (the compiled epoch takes finite numbers only;
                # this loop propagates NaN/Inf exactly as the notebook does)
                Xe, ye = (Xc, yc) if plain else (X_train, y_train)
                for X_train_mini, y_train_mini in minibatch_generator(Xe, ye, mbs):
                    a_h, a_out = model.forward(X_train_mini)
                    d_w_out, d_b_out, d_w_h, d_b_h = model.backward(X_train_mini, a_h, a_out, y_train_mini)
                    model.weight_h -= lr * d_w_h
                    model.bias_h -= lr * d_b_h
                    model.weight_out -= lr * d_w_out
                    model.bias_out -= lr * d_b_out
            # the notebook relies on the default num_labels=10; passing the model's own count is the same for MNIST
            # and keeps other class counts working
            n_labels = getattr(model, "num_classes", 10)
            if plain:  # the data were validated once above
                weights, biases = _params(model)
                train_mse, train_acc = _mse_and_acc(weights, biases, Xc, yc, n_labels, 100)
                _valid_mse, valid_acc = _mse_and_acc(weights, biases, Xv, yv, n_labels, 100)
            else:
                train_mse, train_acc = compute_mse_and_acc(model, X_train, y_train, num_labels=n_labels)
                _valid_mse, valid_acc = compute_mse_and_acc(model, X_valid, y_valid, num_labels=n_labels)
            train_acc, valid_acc = train_acc * 100, valid_acc * 100
            epoch_train_acc.append(train_acc)
            epoch_valid_acc.append(valid_acc)
            epoch_loss.append(train_mse)
            print(
                f"Epoch: {e + 1:03d}/{num_epochs:03d} "
                f"| Train MSE: {train_mse:.2f} "
                f"| Train Acc: {train_acc:.2f}% "
                f"| Valid Acc: {valid_acc:.2f}%"
            )
    return epoch_loss, epoch_train_acc, epoch_valid_acc


def _notebook_epochs(weights: list[np.ndarray], Xc: np.ndarray, yc: np.ndarray, mbs: int) -> PreparedEpochs:
    """The notebook's epoch on validated data, prepared once: sigmoid/sigmoid, MSE, plain SGD, no dropout.

    The targets are the notebook's one-hot rows: integer labels for two classes or more, and for a single
    output unit the dense column ``int_to_onehot(y, 1)`` (all ones), which the contract's labels would
    read as the 0/1 target of a binary unit instead.
    """
    sizes = [weights[0].shape[1], weights[0].shape[0], weights[1].shape[0]]
    one_unit = sizes[-1] == 1
    plan = plan_epoch(sizes, np.float64, batch_size=mbs, hidden="sigmoid", output="sigmoid", loss="mse",
                      target="dense" if one_unit else "labels")  # fmt: skip
    Y = np.ones((yc.shape[0], 1)) if one_unit else yc
    return get_backend(backend).prepare(Xc, Y, plan)
