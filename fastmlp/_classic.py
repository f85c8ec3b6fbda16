"""The classic pure-NumPy training loop, the baseline every speed-up is measured against.

:func:`classic_epoch` is the ch. 11 notebook's minibatch step — float64
``np.dot`` forward, one-hot targets, the notebook's backward, in-place
updates — generalized to any number of hidden layers and to the softmax /
cross-entropy output, so that every benchmark configuration has a "classic"
row. For 784-50-10 sigmoid/MSE it performs exactly the notebook's operations.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _act(z: np.ndarray, name: str) -> np.ndarray:
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


def _dact(a: np.ndarray, name: str) -> np.ndarray:
    if name == "sigmoid":
        return a * (1.0 - a)
    if name == "relu":
        return (a > 0).astype(a.dtype)
    if name == "tanh":
        return 1.0 - a * a
    return np.ones_like(a)


def int_to_onehot(y: np.ndarray, num_labels: int) -> np.ndarray:
    """The notebook's one-hot encoding (a Python loop over the labels)."""
    ary = np.zeros((y.shape[0], num_labels))
    for i, val in enumerate(y):
        ary[i, val] = 1
    return ary


def classic_epoch(
    X: np.ndarray,
    y: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    *,
    hidden: str = "sigmoid",
    output: str = "sigmoid",
    loss: str = "mse",
    batch_size: int = 100,
    lr: float = 0.1,
    rng: np.random.RandomState | None = None,
) -> None:
    """One epoch of the notebook's loop, updating ``weights``/``biases`` in place.

    Parameters
    ----------
    X : ndarray (n_samples, n_features)
    y : ndarray of int (n_samples,)
    weights, biases : lists of ndarray
        ``W (n_out, n_in)``, ``b (n_out,)`` per layer.
    rng : RandomState, optional
        Source of the shuffle (default: the global ``np.random``, as the notebook).
    """
    indices = np.arange(X.shape[0])
    (rng or np.random).shuffle(indices)
    L = len(weights)
    n_classes = weights[-1].shape[0]
    for start in range(0, indices.shape[0] - batch_size + 1, batch_size):
        idx = indices[start : start + batch_size]
        xb, yb = X[idx], y[idx]
        acts = [xb]
        for i in range(L):
            z = np.dot(acts[-1], weights[i].T) + biases[i]
            acts.append(_act(z, output if i == L - 1 else hidden))
        y_onehot = int_to_onehot(yb, n_classes)
        a_out = acts[-1]
        if loss == "mse":
            delta = 2.0 * (a_out - y_onehot) / yb.shape[0] * _dact(a_out, output)
        else:
            delta = (a_out - y_onehot) / yb.shape[0]
        grads = []
        for i in range(L - 1, -1, -1):
            grads.append((np.dot(delta.T, acts[i]), np.sum(delta, axis=0)))
            if i:
                delta = np.dot(delta, weights[i]) * _dact(acts[i], hidden)
        for i, (gW, gb) in zip(range(L - 1, -1, -1), grads, strict=True):
            weights[i] -= lr * gW
            biases[i] -= lr * gb
