"""Pure-NumPy reference backend: the spec of every kernel and the benchmark baseline.

Raw kernels here take validated, C-contiguous arrays of one float dtype and
the integer codes and :class:`~fastmlp.backends.contract.EpochPlan` of
:mod:`fastmlp.backends.contract`; the public, validating entry points are the
methods of :class:`fastmlp.backends.Backend`.  The compiled backends
implement exactly these functions with the same names ("bottleneck" style: a
fast function and its slow NumPy twin).
"""

from __future__ import annotations

import numpy as np

from fastmlp.backends.contract import (
    ACT_CODES,
    EXP_CAP,
    KEEP_BITS,
    LOSS_CODES,
    NO_DROP,
    OPTIMIZER_CODES,
    TARGET_CODES,
    EpochPlan,
    OptimizerState,
    log_eps,
    mask_bits_thr,
)

NAME = "numpy"

_SIG, _SOFT, _IDENT, _TANH, _RELU, _EXP = (ACT_CODES[k] for k in ("sigmoid", "softmax", "identity", "tanh", "relu", "exp"))
_MSE, _CE, _SQE, _POIS = (LOSS_CODES[k] for k in ("mse", "ce", "squared_error", "poisson"))
_LABELS, _DENSE = TARGET_CODES["labels"], TARGET_CODES["dense"]
_SGD, _MOM, _NAG, _ADAM, _ADAMW, _GRAD = (OPTIMIZER_CODES[k] for k in ("sgd", "momentum", "nesterov", "adam", "adamw",
                                                                        "gradient"))  # fmt: skip


def _cap(z: np.ndarray) -> float:
    return EXP_CAP[z.dtype.name]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)) as the classic notebook writes it; -z is capped so exp stays finite (the result is
    # then ~1e-38 / ~1e-308 instead of 0, as in the compiled kernels)
    np.negative(z, out=z)
    np.minimum(z, _cap(z), out=z)
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


def _exp(z: np.ndarray) -> np.ndarray:
    np.minimum(z, _cap(z), out=z)
    np.exp(z, out=z)
    return z


#: activation code -> in-place activation of a pre-activation matrix
ACTIVATIONS = {
    _IDENT: _identity,
    _SIG: _sigmoid,
    _TANH: _tanh,
    _RELU: _relu,
    _SOFT: _softmax,
    _EXP: _exp,
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


# ------------------------------------------------------------------------------ targets and losses
def target_matrix(Y: np.ndarray, k: int, dtype: np.dtype) -> np.ndarray:
    """The target rows ``T (n, k)`` of labels ``(n,)`` (one-hot, or the label itself for one unit) or dense ``Y``."""
    if Y.ndim == 2:
        return Y
    T = np.zeros((Y.shape[0], k), dtype=dtype)
    if k == 1:
        T[:, 0] = Y
    else:
        T[np.arange(Y.shape[0]), Y] = 1
    return T


def n_correct(A: np.ndarray, Y: np.ndarray, output: int) -> int:
    """Rows whose prediction matches the target (see the contract)."""
    k = A.shape[1]
    if Y.ndim == 2 and output == _SIG:  # every unit on the right side of 0.5 (subset accuracy)
        return int(np.count_nonzero(((A > 0.5) == (Y > 0.5)).all(axis=1)))
    if k == 1:
        truth = Y == 1 if Y.ndim == 1 else Y[:, 0] > 0.5
        return int(np.count_nonzero((A[:, 0] > 0.5) == truth))
    truth = Y if Y.ndim == 1 else np.argmax(Y, axis=1)
    return int(np.count_nonzero(np.argmax(A, axis=1) == truth))


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x log y`` with ``0 log y = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


def sample_losses(A: np.ndarray, T: np.ndarray, output: int, loss: int) -> np.ndarray:
    """Per-sample data loss ``l_i`` (float64, ``(n,)``) of outputs ``A (n, k)`` against targets ``T (n, k)``."""
    a = A.astype(np.float64)
    t = T.astype(np.float64)
    if loss in (_MSE, _SQE):
        sq = np.mean(np.square(a - t), axis=1)
        return sq if loss == _MSE else 0.5 * sq
    if loss == _POIS:
        return np.sum(_xlogy(t, t / a) - t + a, axis=1)
    eps = log_eps(A.dtype)
    # the clip is done in the network's dtype, as scikit-learn clips y_prob of that dtype
    p = np.clip(A, A.dtype.type(eps), A.dtype.type(1 - eps)).astype(np.float64)
    if output == _SOFT:
        return -np.sum(_xlogy(t, p), axis=1)
    return -np.sum(_xlogy(t, p) + _xlogy(1.0 - t, 1.0 - p), axis=1)


def _delta(A: np.ndarray, T: np.ndarray, output: int, loss: int, w: np.ndarray | None, s: float,
           out: np.ndarray) -> None:
    """``out = dL/dZ`` of the output pre-activation for row weights ``w (n,)`` summing to ``s``.

    Unweighted (``w`` None, ``s = n``) the scaled difference is divided by ``n`` as the notebook
    writes it, ``2 (a - y) / n``; weighted it is multiplied by ``w_i / s`` (taken in float64, then
    rounded to the dtype).
    """
    dt = A.dtype.type
    g = A - T
    if loss == _MSE:
        g = dt(2.0) * g
    if w is None:
        g = g / dt(s)
    else:
        g = g * (w / s).astype(A.dtype)[:, None]
    if loss == _MSE and output == _SOFT:
        out[...] = A * (g - np.sum(g * A, axis=1, keepdims=True))
    else:  # the canonical pairs end here: (a - t) times the row's factor
        out[...] = g
        if loss == _MSE:
            DERIVATIVES[output](A, out)


def output_delta(A: np.ndarray, Y: np.ndarray, output: int, loss: int, out: np.ndarray) -> tuple[float, int]:
    """Delta of the loss w.r.t. the output pre-activation, unweighted (``c_i = 1/n``).

    ``A (n, k)`` output activations, ``Y`` int64 labels ``(n,)`` or dense ``(n, k)``, ``out (n, k)``.
    Returns ``(loss_sum, n_correct)``; see the contract for the formulas.
    """
    n, k = A.shape
    T = target_matrix(Y, k, A.dtype)
    loss_sum = float(np.sum(sample_losses(A, T, output, loss)))
    _delta(A, T, output, loss, None, float(n), out)
    return loss_sum, n_correct(A, Y, output)


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
    _sgd_step(W, b, np.dot(D.T, A), np.sum(D, axis=0), lr, l2, l1)


def _decay_l1(W: np.ndarray, lr: float, l2: float, l1: float) -> None:
    """``W <- max(0, 1 - lr l2) W - lr l1 sign(W)`` (the sign of the weights before the step)."""
    dt = W.dtype.type
    decay = max(0.0, 1.0 - lr * l2)
    if l1 != 0.0:
        l1_term = dt(lr * l1) * np.sign(W)
        if decay != 1.0:
            W *= dt(decay)
        W -= l1_term
    elif decay != 1.0:
        W *= dt(decay)


def _sgd_step(W: np.ndarray, b: np.ndarray, gW: np.ndarray, gb: np.ndarray, lr: float, l2: float, l1: float) -> None:
    dt = W.dtype.type
    _decay_l1(W, lr, l2, l1)
    W -= dt(lr) * gW
    b -= dt(lr) * gb


def optimizer_update(g: np.ndarray, slots: list[np.ndarray], plan: EpochPlan, lr: float, t: int) -> np.ndarray:
    """The update ``u`` of one parameter with gradient ``g`` (contract table); updates the ``slots`` in place."""
    dt = g.dtype.type
    kind = plan.optimizer_code
    if kind == _SGD:
        return -dt(lr) * g
    if kind in (_MOM, _NAG):
        v = slots[0]
        mu = dt(plan.momentum)
        v[...] = mu * v - dt(lr) * g
        return mu * v - dt(lr) * g if kind == _NAG else v.copy()
    # Adam / AdamW
    m, v = slots
    b1, b2 = plan.beta1, plan.beta2
    m[...] = dt(b1) * m + dt(1.0 - b1) * g
    v[...] = dt(b2) * v + dt(1.0 - b2) * (g * g)
    c1 = 1.0 - b1**t
    c2 = 1.0 - b2**t
    if plan.eps_mode == "torch":
        return -dt(lr / c1) * m / (np.sqrt(v) / dt(np.sqrt(c2)) + dt(plan.eps))
    return -dt(lr * np.sqrt(c2) / c1) * m / (np.sqrt(v) + dt(plan.eps))


def apply_step(weights: list[np.ndarray], biases: list[np.ndarray], state: OptimizerState, gW: list[np.ndarray],
               gb: list[np.ndarray], plan: EpochPlan, lr: float, t: int) -> None:  # fmt: skip
    """One step's update of every layer from its gradient ``(gW[l], gb[l])`` (contract table; for
    ``gradient`` the gradient is written to state slot 0), ``t`` the optimizer's step count."""
    opt = plan.optimizer_code
    for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
        if opt == _GRAD:
            state.weights[0][i][...] = gW[i]
            state.biases[0][i][...] = gb[i]
        elif opt == _SGD:
            _sgd_step(W, b, gW[i], gb[i], lr, plan.l2, plan.l1)
        else:
            uW = optimizer_update(gW[i], [sl[i] for sl in state.weights], plan, lr, t)
            ub = optimizer_update(gb[i], [sl[i] for sl in state.biases], plan, lr, t)
            _decay_l1(W, lr, plan.l2, plan.l1)
            W += uW
            b += ub


def dropout_mask(seed: int, step: int, layer: int, keep_threshold: int, scale: float, out: np.ndarray,
                 row0: int = 0) -> None:  # fmt: skip
    """Fill ``out (n_rows, n_units)`` with ``scale`` where the counter-based hash keeps a unit, else 0."""
    n_rows, n_units = out.shape
    bits = mask_bits_thr(seed, step, layer, n_rows, n_units, min(int(keep_threshold), 1 << KEEP_BITS), row0)
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
    Y: np.ndarray,
    order: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    state: OptimizerState,
    lrs: np.ndarray,
    plan: EpochPlan,
    step0: int,
    sample_weight: np.ndarray | None,
    row0: int = 0,
) -> tuple[float, float, int]:
    """One epoch composed from the kernels above (see the contract); returns ``(loss_sum, penalty_sum, n_correct)``.

    ``row0`` numbers the rows of each minibatch from ``row0`` in the dropout masks (a chunk of a larger
    minibatch, see :mod:`fastmlp.backends._chunked`); 0 otherwise."""
    L = len(weights)
    n = order.shape[0]
    dt = X.dtype
    bs = plan.batch_size
    h_act, o_act, loss = plan.hidden_code, plan.output_code, plan.loss_code
    k = plan.sizes[-1]
    opt = plan.optimizer_code
    loss_sum, pen_sum, correct = 0.0, 0.0, 0
    for step, start in enumerate(range(0, n, bs)):
        idx = order[start : start + bs]
        nb = idx.shape[0]
        lr = float(lrs[step])
        t = state.t + step + 1
        w = None if sample_weight is None else sample_weight[idx]
        s = float(nb) if w is None else float(np.sum(w))
        inputs: list[np.ndarray] = []  # the (dropped-out) input of each layer
        raw: list[np.ndarray] = []  # the activation before dropout (for derivatives)
        masks: list[np.ndarray | None] = []
        A = X[idx]
        for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
            if plan.thresholds[i] < NO_DROP:
                m = np.empty((nb, A.shape[1]), dtype=dt)
                dropout_mask(plan.seed, step0 + step, i, plan.thresholds[i], plan.scales[i], m, row0)
                A_in = A * m
            else:
                m = None
                A_in = A
            raw.append(A)
            masks.append(m)
            inputs.append(A_in)
            Z = np.empty((nb, W.shape[0]), dtype=dt)
            forward(A_in, W, b, o_act if i == L - 1 else h_act, Z)
            A = Z
        Yb = Y[idx]
        T = target_matrix(Yb, k, dt)
        li = sample_losses(A, T, o_act, loss)
        loss_sum += float(np.sum(li)) if w is None else nb * float(np.dot(w, li)) / s
        correct += n_correct(A, Yb, o_act)
        if plan.alpha:
            sq = sum(float(np.dot(w, w)) for w in (W.ravel().astype(np.float64) for W in weights))
            pen_sum += nb * (0.5 * plan.alpha * sq / s)
        D = np.empty_like(A)
        _delta(A, T, o_act, loss, w, s, D)
        # every delta with the weights before the step
        deltas = [D]
        for i in range(L - 1, 0, -1):
            D_prev = np.empty_like(raw[i])
            hidden_delta(deltas[0], weights[i], raw[i], h_act, masks[i], D_prev)
            deltas.insert(0, D_prev)
        gWs, gbs = [], []
        for i in range(L):
            gW = np.dot(deltas[i].T, inputs[i])
            if plan.alpha:
                gW += dt.type(plan.alpha / s) * weights[i]
            gWs.append(gW)
            gbs.append(np.sum(deltas[i], axis=0))
        apply_step(weights, biases, state, gWs, gbs, plan, lr, t)
    if opt != _GRAD:
        state.t += plan.n_steps(n)
    return loss_sum, pen_sum, correct
