"""Pure-NumPy reference backend: the spec of every kernel and the benchmark baseline.

Raw kernels here take validated, C-contiguous arrays of one float dtype and
integer activation/loss codes (see :mod:`fastmlp.backends._contract`); the
public, validating entry points are the methods of
:class:`fastmlp.backends.Backend`.  The compiled backends implement exactly
these functions with the same names ("bottleneck" style: a fast function and
its slow NumPy twin).
"""

from __future__ import annotations

import numpy as np

from fastmlp.backends._contract import ACT_CODES, KEEP_BITS, LOG_EPS, LOSS_CODES, mask_bits

NAME = "numpy"

_SIG, _SOFT, _IDENT, _TANH, _RELU = (ACT_CODES[k] for k in ("sigmoid", "softmax", "identity", "tanh", "relu"))
_MSE, _CE = LOSS_CODES["mse"], LOSS_CODES["ce"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)) as the classic notebook writes it; exp overflow -> inf -> 0 is the right limit
    with np.errstate(over="ignore"):
        np.negative(z, out=z)
        np.exp(z, out=z)
    z += 1.0
    np.reciprocal(z, out=z)
    return z


def _softmax(z: np.ndarray) -> np.ndarray:
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _relu(z: np.ndarray) -> np.ndarray:
    np.maximum(z, 0, out=z)
    return z


def _tanh(z: np.ndarray) -> np.ndarray:
    np.tanh(z, out=z)
    return z


def _identity(z: np.ndarray) -> np.ndarray:
    return z


#: activation code -> in-place activation of a pre-activation matrix
ACTIVATIONS = {
    _IDENT: _identity,
    _SIG: _sigmoid,
    _TANH: _tanh,
    _RELU: _relu,
    _SOFT: _softmax,
}


def _d_sigmoid(a: np.ndarray, delta: np.ndarray) -> None:
    delta *= a * (1.0 - a)


def _d_tanh(a: np.ndarray, delta: np.ndarray) -> None:
    delta *= 1.0 - a * a


def _d_relu(a: np.ndarray, delta: np.ndarray) -> None:
    delta[a <= 0] = 0


def _d_identity(a: np.ndarray, delta: np.ndarray) -> None:
    return None


#: activation code -> multiply ``delta`` in place by the derivative, written from the output ``a``
DERIVATIVES = {
    _IDENT: _d_identity,
    _SIG: _d_sigmoid,
    _TANH: _d_tanh,
    _RELU: _d_relu,
}


def forward(A: np.ndarray, W: np.ndarray, b: np.ndarray, act: int, out: np.ndarray) -> None:
    """``out = act(A @ W.T + b)``: ``A (n, n_in)``, ``W (n_out, n_in)``, ``b (n_out,)``, ``out (n, n_out)``."""
    np.dot(A, W.T, out=out)
    out += b
    ACTIVATIONS[act](out)


def _onehot_minus(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    diff = A.copy()
    diff[np.arange(A.shape[0]), y] -= 1.0
    return diff


def _loss_mse(A: np.ndarray, y: np.ndarray, output: int) -> float:
    diff = _onehot_minus(A, y)
    return float(np.sum(np.mean(np.square(diff, dtype=np.float64), axis=1)))


def _loss_ce(A: np.ndarray, y: np.ndarray, output: int) -> float:
    a = A.astype(np.float64)
    rows = np.arange(A.shape[0])
    if output == _SOFT:
        return float(-np.sum(np.log(np.maximum(a[rows, y], LOG_EPS))))
    # binary cross-entropy per unit (sigmoid outputs): target 1 on the label's unit, 0 elsewhere
    neg = np.log(np.maximum(1.0 - a, LOG_EPS))
    total = -np.sum(neg)
    total -= np.sum(np.log(np.maximum(a[rows, y], LOG_EPS)) - neg[rows, y])
    return float(total)


#: loss code -> summed per-sample data loss
LOSSES = {_MSE: _loss_mse, _CE: _loss_ce}


def output_delta(A: np.ndarray, y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
    """Delta of the loss w.r.t. the output pre-activation, from integer labels.

    ``A (n, k)`` output activations, ``y (n,)`` int64 labels, ``out (n, k)``.
    Returns ``(loss_sum, n_correct)``; see the contract for the formulas.
    """
    n = A.shape[0]
    loss_sum = LOSSES[loss](A, y, output)
    n_correct = int(np.count_nonzero(np.argmax(A, axis=1) == y))
    diff = _onehot_minus(A, y)
    if loss == _CE:
        np.divide(diff, n, out=out)
    else:
        g = 2.0 * diff / n  # the notebook's scaling: 2(a - y) / batch_size, summed over classes
        if output == _SOFT:
            out[...] = A * (g - np.sum(g * A, axis=1, keepdims=True))
        else:
            out[...] = g
            DERIVATIVES[output](A, out)
    return loss_sum, n_correct


def hidden_delta(
    D_next: np.ndarray, W_next: np.ndarray, A: np.ndarray, act: int, mask: np.ndarray | None, out: np.ndarray
) -> None:
    """``out = (D_next @ W_next) * mask * act'(A)``: ``D_next (n, n_next)``, ``W_next (n_next, n_units)``, ``A (n, n_units)``."""
    np.dot(D_next, W_next, out=out)
    if mask is not None:
        out *= mask
    DERIVATIVES[act](A, out)


def inplace_update(W: np.ndarray, b: np.ndarray, D: np.ndarray, A: np.ndarray, lr: float, l2: float, l1: float) -> None:
    """SGD step in place: ``W <- max(0, 1 - lr*l2) W - lr*l1*sign(W) - lr D.T @ A``, ``b <- b - lr sum(D, 0)``."""
    dt = W.dtype.type
    decay = max(0.0, 1.0 - lr * l2)
    grad = np.dot(D.T, A)
    if l1 != 0.0:
        l1_term = dt(lr * l1) * np.sign(W)
        if decay != 1.0:
            W *= dt(decay)
        W -= l1_term
    elif decay != 1.0:
        W *= dt(decay)
    W -= dt(lr) * grad
    b -= dt(lr) * np.sum(D, axis=0)


def dropout_mask(seed: int, step: int, layer: int, keep_threshold: int, scale: float, out: np.ndarray) -> None:
    """Fill ``out (n_rows, n_units)`` with ``scale`` where the counter-based hash keeps a unit, else 0."""
    n_rows, n_units = out.shape
    keep = keep_threshold / float(1 << KEEP_BITS)
    bits = mask_bits(seed, step, layer, n_rows, n_units, keep)
    out[...] = 0
    out[bits] = out.dtype.type(scale)


def forward_network(
    X: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray], hidden_act: int, output_act: int, out: np.ndarray
) -> None:
    """Output activations ``out (n, n_classes)`` of the whole network for ``X (n, n_in)``."""
    A = X
    L = len(weights)
    for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
        nxt = out if i == L - 1 else np.empty((X.shape[0], W.shape[0]), dtype=X.dtype)
        forward(A, W, b, output_act if i == L - 1 else hidden_act, nxt)
        A = nxt


def train_epoch(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    lrs: np.ndarray,
    hidden_act: int,
    output_act: int,
    loss: int,
    batch_size: int,
    l2: float,
    l1: float,
    thresholds: np.ndarray,
    scales: np.ndarray,
    seed: int,
    step0: int,
) -> tuple[float, int]:
    """One epoch of minibatch SGD composed from the kernels above (see the contract)."""
    L = len(weights)
    n = order.shape[0]
    dt = X.dtype
    full = 1 << KEEP_BITS
    loss_sum, n_correct = 0.0, 0
    for step, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        nb = idx.shape[0]
        lr = float(lrs[step])
        inputs: list[np.ndarray] = []  # the (dropped-out) input of each layer
        raw: list[np.ndarray] = []  # the activation before dropout (for derivatives)
        masks: list[np.ndarray | None] = []
        A = X[idx]
        for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
            if thresholds[i] < full:
                m = np.empty((nb, A.shape[1]), dtype=dt)
                dropout_mask(seed, step0 + step, i, int(thresholds[i]), float(scales[i]), m)
                A_in = A * m
            else:
                m = None
                A_in = A
            raw.append(A)
            masks.append(m)
            inputs.append(A_in)
            Z = np.empty((nb, W.shape[0]), dtype=dt)
            forward(A_in, W, b, output_act if i == L - 1 else hidden_act, Z)
            A = Z
        D = np.empty_like(A)
        ls, nc = output_delta(A, y[idx], output_act, loss, D)
        loss_sum += ls
        n_correct += nc
        for i in range(L - 1, -1, -1):
            D_prev = None
            if i > 0:
                D_prev = np.empty_like(raw[i])
                hidden_delta(D, weights[i], raw[i], hidden_act, masks[i], D_prev)
            inplace_update(weights[i], biases[i], D, inputs[i], lr, l2, l1)
            D = D_prev
    return loss_sum, n_correct
