"""The reference backend: finite-difference gradients, loop oracles, the mask generator."""

import naive
import numpy as np
import pytest

from fastmlp import get_backend
from fastmlp.backends import contract as C

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
    ref.train_epoch(X, y, order, W1, b1, 0.3, batch_size=10)
    for start in range(0, 23, 10):
        idx = order[start : start + 10]
        a1 = ref.forward(X[idx], Ws[0], bs[0], "sigmoid")
        a2 = ref.forward(a1, Ws[1], bs[1], "sigmoid")
        D2, _, _ = ref.output_delta(a2, y[idx], "sigmoid", "mse")
        D1 = ref.hidden_delta(D2, Ws[1], a1, "sigmoid")
        ref.inplace_update(Ws[1], bs[1], D2, a1, 0.3)
        ref.inplace_update(Ws[0], bs[0], D1, X[idx], 0.3)
    for a, b in zip(W1 + b1, Ws + bs, strict=True):
        np.testing.assert_array_equal(a, b)
