"""The reference backend: finite-difference gradients, loop oracles, the mask generator."""

import naive
import numpy as np
import pytest

from fastmlp import get_backend
from fastmlp.backends import contract as C
from fastmlp.backends import reference as R
from fastmlp.backends.contract import plan_epoch

ref = get_backend("numpy")


def _net(rng, sizes, dtype=np.float64):
    Ws = [rng.normal(0, 0.5, size=(o, i)).astype(dtype) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    bs = [rng.normal(0, 0.1, size=o).astype(dtype) for o in sizes[1:]]
    return Ws, bs


def _objective(X, y, Ws, bs, hidden, output, loss):
    """The function whose gradient the deltas are: MSE summed over classes / n (the notebook's scaling), CE / n."""
    A = ref.forward_network(X, Ws, bs, hidden, output)
    n = X.shape[0]
    Y = np.zeros_like(A)
    Y[np.arange(n), y] = 1
    if loss == "mse":
        return np.sum((A - Y) ** 2) / n
    if output == "softmax":
        return -np.sum(np.log(A[np.arange(n), y])) / n
    return -np.sum(Y * np.log(A) + (1 - Y) * np.log(1 - A)) / n


def _backprop(X, y, Ws, bs, hidden, output, loss):
    acts = [X]
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        acts.append(ref.forward(acts[-1], W, b, output if i == len(Ws) - 1 else hidden))
    D, _, _ = ref.output_delta(acts[-1], y, output, loss)
    grads = [None] * len(Ws)
    for i in range(len(Ws) - 1, -1, -1):
        grads[i] = (D.T @ acts[i], D.sum(0))
        if i:
            D = ref.hidden_delta(D, Ws[i], acts[i], hidden)
    return grads


@pytest.mark.parametrize(
    "hidden,output,loss",
    [("sigmoid", "sigmoid", "mse"), ("tanh", "softmax", "ce"), ("sigmoid", "softmax", "ce"),
     ("relu", "sigmoid", "ce"), ("tanh", "softmax", "mse"), ("identity", "identity", "mse")],
)  # fmt: skip
@pytest.mark.parametrize("n_hidden_layers", [1, 3])
def test_gradients_match_central_differences(hidden, output, loss, n_hidden_layers):
    rng = np.random.default_rng(n_hidden_layers)
    sizes = [5] + [4] * n_hidden_layers + [3]
    X = rng.normal(size=(7, 5))
    y = rng.integers(0, 3, size=7)
    Ws, bs = _net(rng, sizes)
    grads = _backprop(X, y, Ws, bs, hidden, output, loss)
    h = 1e-6
    for li in range(len(Ws)):
        for P, g in ((Ws[li], grads[li][0]), (bs[li], grads[li][1])):
            num = np.zeros_like(P)
            for idx in np.ndindex(P.shape):
                old = P[idx]
                P[idx] = old + h
                fp = _objective(X, y, Ws, bs, hidden, output, loss)
                P[idx] = old - h
                fm = _objective(X, y, Ws, bs, hidden, output, loss)
                P[idx] = old
                num[idx] = (fp - fm) / (2 * h)
            np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


def test_l2_and_l1_gradients_match_central_differences():
    """The update's decay is the gradient of ½·l2·‖W‖², its L1 term the subgradient of l1·‖W‖₁."""
    from fastmlp import Network

    rng = np.random.default_rng(3)
    net = Network([4, 3], seed=1)
    W = net.weights[0]
    l2, l1, lr = 0.3, 0.05, 0.01
    D = np.zeros((1, 3))
    A = np.zeros((1, 4))
    before = W.copy()
    ref.inplace_update(W, net.biases[0], D, A, lr, l2, l1)
    step = (before - W) / lr  # effective gradient of the penalty
    h = 1e-6
    num = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        W[...] = before
        W[idx] += h
        fp = net.penalty(l2, l1)
        W[idx] -= 2 * h
        fm = net.penalty(l2, l1)
        num[idx] = (fp - fm) / (2 * h)
    np.testing.assert_allclose(step, num, rtol=1e-6, atol=1e-9)
    assert rng is not None


@pytest.mark.parametrize("l2,l1", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.2), (0.5, 0.05), (1e6, 0.0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_matches_loop_oracle(l2, l1, dtype):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 5)).astype(dtype)
    W[0, 0] = 0  # sign(0) = 0: no L1 push on exact zeros
    b = rng.normal(size=3).astype(dtype)
    D = rng.normal(size=(4, 3)).astype(dtype)
    A = rng.normal(size=(4, 5)).astype(dtype)
    W_exp, b_exp = naive.update(W, b, D, A, 0.1, l2, l1)
    ref.inplace_update(W, b, D, A, 0.1, l2, l1)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(W, W_exp, rtol=tol, atol=tol)
    np.testing.assert_allclose(b, b_exp, rtol=tol, atol=tol)
    if l2 == 1e6:  # decay factor clamped at 0: no sign flip from huge decay
        np.testing.assert_allclose(W, -0.1 * (D.T @ A).astype(np.float64), rtol=tol, atol=tol)


def test_mask_generator_matches_scalar_hash_and_keep_rate():
    seed, step, layer, n_rows, n_units, keep = 2**63 + 5, 17, 1, 40, 33, 0.8
    bits = C.mask_bits(seed, step, layer, n_rows, n_units, keep)
    key = C.mask_key(seed, step, layer)
    thr = C.keep_threshold(keep)
    for r, u in [(0, 0), (3, 7), (39, 32), (20, 0)]:
        h = C._mix64_int(key + C.GOLDEN * (r * n_units + u + 1))
        assert bits[r, u] == ((h >> 40) < thr)
    # keep rate within 5 binomial standard deviations
    big = C.mask_bits(1, 2, 0, 500, 784, 0.8)
    n = big.size
    assert abs(big.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / n)
    # different steps and layers give different masks
    assert not np.array_equal(C.mask_bits(1, 3, 0, 50, 50, 0.5), C.mask_bits(1, 4, 0, 50, 50, 0.5))
    assert not np.array_equal(C.mask_bits(1, 3, 0, 50, 50, 0.5), C.mask_bits(1, 3, 1, 50, 50, 0.5))


def test_splitmix64_known_value():
    # splitmix64's first output for state 0 is 0xE220A8397B1DCDAF (Vigna's reference implementation)
    assert C._mix64_int(C.GOLDEN) == 0xE220A8397B1DCDAF
    assert int(C.mix64(np.array([C.GOLDEN], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_dropout_mask_values():
    m = ref.dropout_mask(3, 0, 0, 10, 20, 0.5, dtype="float32")
    assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 2.0}
    m2 = ref.dropout_mask(3, 0, 0, 10, 20, 0.5, scale=1.0)
    np.testing.assert_array_equal(m2 * 2, m.astype(np.float64))


def test_train_epoch_equals_manual_steps():
    """The reference epoch is exactly forward → delta → (lower delta, update) per minibatch."""
    rng = np.random.default_rng(9)
    Ws, bs = _net(rng, [6, 5, 4])
    X = rng.normal(size=(23, 6))
    y = rng.integers(0, 4, size=23)
    order = rng.permutation(23)
    W1, b1 = [W.copy() for W in Ws], [b.copy() for b in bs]
    plan = plan_epoch([6, 5, 4], "float64", batch_size=10, hidden="sigmoid", output="sigmoid", loss="mse")
    stats = ref.train_epoch(X, y, order, (W1, b1), None, 0.3, plan)
    loss_sum = 0.0
    for start in range(0, 23, 10):
        idx = order[start : start + 10]
        a1 = ref.forward(X[idx], Ws[0], bs[0], "sigmoid")
        a2 = ref.forward(a1, Ws[1], bs[1], "sigmoid")
        D2, ls, _ = ref.output_delta(a2, y[idx], "sigmoid", "mse")
        loss_sum += ls
        D1 = ref.hidden_delta(D2, Ws[1], a1, "sigmoid")
        ref.inplace_update(Ws[1], bs[1], D2, a1, 0.3)
        ref.inplace_update(Ws[0], bs[0], D1, X[idx], 0.3)
    for a, b in zip(W1 + b1, Ws + bs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert stats.loss_sum == pytest.approx(loss_sum, rel=1e-14) and stats.penalty_sum == 0.0


# ---------------------------------------------------------------------------- the contract's new losses and targets
def _dense_objective(X, T, Ws, bs, hidden, output, loss, c):
    """The function whose gradient the deltas of dense targets ``T`` are, rows weighted by ``c_i = w_i / s``."""
    A = ref.forward_network(X, Ws, bs, hidden, output)
    if loss == "mse":
        return float(np.sum(c[:, None] * (A - T) ** 2))
    if loss == "squared_error":
        return float(np.sum(c[:, None] * (A - T) ** 2) / 2)
    if loss == "poisson":
        return float(np.sum(c[:, None] * (A - T * np.log(A))))
    if output == "softmax":
        return float(-np.sum(c[:, None] * T * np.log(A)))
    return float(-np.sum(c[:, None] * (T * np.log(A) + (1 - T) * np.log(1 - A))))


@pytest.mark.parametrize(
    "hidden,output,loss",
    [("tanh", "identity", "squared_error"), ("relu", "exp", "poisson"), ("sigmoid", "sigmoid", "ce"),
     ("tanh", "softmax", "ce"), ("tanh", "identity", "mse"), ("sigmoid", "sigmoid", "mse")],
)  # fmt: skip
@pytest.mark.parametrize("weighted", [False, True])
def test_dense_weighted_epoch_step_is_the_gradient(hidden, output, loss, weighted):
    """One full-batch step of the reference epoch on dense targets (with sample weights) is a gradient step
    on the contract's objective: regression values, counts, multi-label indicators, soft labels."""
    rng = np.random.default_rng(7)
    sizes = [4, 5, 3]
    X = rng.normal(size=(9, 4))
    if loss == "poisson":
        T = rng.poisson(1.5, size=(9, 3)).astype(float)
    elif output == "softmax":
        T = rng.dirichlet(np.ones(3), size=9)
    elif output == "sigmoid":
        T = (rng.random((9, 3)) < 0.5).astype(float)
    else:
        T = rng.normal(size=(9, 3))
    w = rng.uniform(0.2, 2.0, size=9) if weighted else None
    c = np.full(9, 1 / 9) if w is None else w / w.sum()
    Ws, bs = _net(rng, sizes)
    W1, b1 = [W.copy() for W in Ws], [b.copy() for b in bs]
    plan = plan_epoch(sizes, "float64", batch_size=9, hidden=hidden, output=output, loss=loss, target="dense")
    lr = 1e-3
    stats = ref.train_epoch(X, T, np.arange(9), (W1, b1), None, lr, plan, sample_weight=w)
    A = ref.forward_network(X, Ws, bs, hidden, output)
    li = R.sample_losses(A, T, C.ACT_CODES[output], C.LOSS_CODES[loss])
    assert stats.loss_sum == pytest.approx(9 * float(np.dot(c, li)), rel=1e-12)  # n_b · Σ w_i l_i / s
    h = 1e-6
    for li_ in range(2):
        for P, P_new in ((Ws[li_], W1[li_]), (bs[li_], b1[li_])):
            num = np.zeros_like(P)
            for idx in np.ndindex(P.shape):
                old = P[idx]
                P[idx] = old + h
                fp = _dense_objective(X, T, Ws, bs, hidden, output, loss, c)
                P[idx] = old - h
                fm = _dense_objective(X, T, Ws, bs, hidden, output, loss, c)
                P[idx] = old
                num[idx] = (fp - fm) / (2 * h)
            np.testing.assert_allclose((P - P_new) / lr, num, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_clip_is_the_dtype_epsilon_on_both_sides(dtype):
    """p = clip(a, eps, 1 - eps) with eps the machine epsilon of the dtype (scikit-learn's log_loss), not 1e-12."""
    eps = np.finfo(dtype).eps
    assert C.log_eps(dtype) == eps
    A = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)  # confidently wrong, then confidently right
    _, loss_soft, _ = ref.output_delta(A, np.array([0, 0]), "softmax", "ce")
    assert loss_soft == pytest.approx(-np.log(np.float64(dtype(eps))) - np.log(np.float64(dtype(1 - eps))), rel=1e-12)
    _, loss_sig, _ = ref.output_delta(A[:, :1], np.array([1, 1]), "sigmoid", "ce")  # one binary unit
    expected = -np.log(np.float64(dtype(eps))) - np.log(np.float64(dtype(1 - eps)))
    assert loss_sig == pytest.approx(expected, rel=1e-12)
    assert abs(loss_soft + np.log(1e-12)) > 1  # not the old 1e-12 clip (36.0 for float64, 15.9 for float32)


def test_one_output_unit_labels_are_binary_targets():
    """With one output unit a label is the unit's 0/1 target (not a one-hot of a single class)."""
    A = np.array([[0.8], [0.3], [0.6]])
    y = np.array([1, 0, 0])
    D, loss, correct = ref.output_delta(A, y, "sigmoid", "ce")
    np.testing.assert_allclose(D[:, 0], (A[:, 0] - y) / 3, rtol=1e-15)
    assert correct == 2 and loss == pytest.approx(-np.log(0.8) - np.log(0.7) - np.log(0.4), rel=1e-12)


def test_exp_output_is_capped():
    Z = ref.forward(np.array([[1.0]]), np.array([[1000.0], [1.0]]), np.zeros(2), "exp")
    assert np.isfinite(Z).all() and Z[0, 0] == pytest.approx(np.exp(C.EXP_CAP["float64"]), rel=1e-12)
    assert Z[0, 1] == pytest.approx(np.e, rel=1e-15)
