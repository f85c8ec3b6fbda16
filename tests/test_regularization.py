"""Regularization and training control: penalties, dropout, MC dropout, early stopping, batch modes."""

import numpy as np
import pytest
from conftest import ALL_BACKENDS

import fastmlp
from fastmlp import Callback, EarlyStopping, MCPrediction, Network, get_backend
from fastmlp import mc_dropout as mc
from fastmlp.backends import contract as C
from fastmlp.backends.contract import plan_epoch


def _blobs(rng, n=120, n_features=6, n_classes=3):
    centers = rng.normal(0, 2, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def _mse_objective(X, y, Ws, bs):
    """The data objective whose gradient the MSE delta is: squared error summed over classes / n."""
    A = get_backend("numpy").forward_network(X, Ws, bs, "sigmoid", "sigmoid")
    Y = np.zeros_like(A)
    Y[np.arange(len(y)), y] = 1
    return np.sum((A - Y) ** 2) / len(y)


# ---------------------------------------------------------------------------- penalties
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("l2,l1,alpha", [(0.3, 0.0, 0.0), (0.0, 0.05, 0.0), (0.3, 0.05, 0.0), (0.0, 0.0, 0.9),
                                         (0.3, 0.05, 0.9)])  # fmt: skip
def test_penalty_gradients_in_compiled_epoch_by_finite_differences(backend, l2, l1, alpha):
    """One full-batch step of the backend's train_epoch is a gradient step on
    data + ½·l2‖W‖² + l1‖W‖₁ + ½·alpha‖W‖²/n (scikit-learn's alpha over the n rows of the batch);
    the biases follow the data gradient alone (never penalized)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(9, 5))
    y = rng.integers(0, 3, size=9)
    net = Network([5, 4, 3], backend="numpy", seed=2)
    for b in net.biases:
        b[...] = rng.normal(0, 0.5, size=b.shape)  # non-zero biases: a penalty on them would show
    Ws, bs = net.get_params()
    lr = 0.01
    W1, b1 = net.get_params()
    plan = plan_epoch([5, 4, 3], "float64", batch_size=9, hidden="sigmoid", output="sigmoid", loss="mse", l2=l2, l1=l1,
                      alpha=alpha)  # fmt: skip
    stats = get_backend(backend).train_epoch(X, y, np.arange(9), (W1, b1), None, lr, plan)
    # the alpha penalty of the epoch: n_b * ½·alpha‖W‖²/n_b, from the weights before the step
    assert stats.penalty_sum == pytest.approx(0.5 * alpha * sum(np.sum(W**2) for W in Ws), rel=1e-12, abs=0)

    def objective():
        return _mse_objective(X, y, Ws, bs) + net.penalty(l2, l1, alpha, n=9)

    net.weights, net.biases = Ws, bs  # net.penalty reads the perturbed parameters
    h = 1e-6
    for layer in range(2):
        for P, P_new in ((Ws[layer], W1[layer]), (bs[layer], b1[layer])):
            num = np.zeros_like(P)
            for idx in np.ndindex(P.shape):
                old = P[idx]
                P[idx] = old + h
                fp = objective()
                P[idx] = old - h
                fm = objective()
                P[idx] = old
                num[idx] = (fp - fm) / (2 * h)
            np.testing.assert_allclose((P - P_new) / lr, num, rtol=1e-6, atol=1e-8)


def test_penalty_value_skips_biases():
    net = Network([3, 2], seed=0)
    net.biases[0][...] = 100.0
    W = net.weights[0]
    assert net.penalty(0.4, 0.0) == pytest.approx(0.5 * 0.4 * np.sum(W**2), rel=1e-15)
    assert net.penalty(0.0, 0.3) == pytest.approx(0.3 * np.sum(np.abs(W)), rel=1e-15)
    assert net.penalty(0.4, 0.3) == pytest.approx(0.2 * np.sum(W**2) + 0.3 * np.sum(np.abs(W)), rel=1e-15)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reported_loss_includes_penalty_and_data_loss_is_apart(backend, rng):
    X, y = _blobs(rng)
    kw = dict(epochs=2, batch_size=30, lr=0.5, verbose=False, seed=3)
    net = Network([6, 5, 3], backend=backend, seed=0)
    hist = net.fit(X, y, l2=0.01, l1=0.001, **kw)
    assert hist.train_loss[-1] == pytest.approx(hist.train_data_loss[-1] + net.penalty(0.01, 0.001), rel=1e-12)
    assert hist.train_loss[-1] > hist.train_data_loss[-1] > 0
    plain = Network([6, 5, 3], backend=backend, seed=0).fit(X, y, **kw)
    assert plain.train_loss == plain.train_data_loss
    # the first epoch's data loss is measured as it trains, before the penalties had much effect
    assert hist.train_data_loss[0] == pytest.approx(plain.train_data_loss[0], rel=0.05)


# ---------------------------------------------------------------------------- batch modes, dropout across backends
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 7, None])
@pytest.mark.parametrize("scaling", ["inverted", "predict"])
def test_backends_agree_with_reference_in_every_batch_mode(backend, batch_size, scaling):
    """Same fit, same seed → the same weights (1e-9, float64) on every backend: the dropout masks, the
    penalties and stochastic / minibatch / full-batch stepping are the reference's."""
    rng = np.random.default_rng(5)
    X, y = _blobs(rng, n=40)
    kw = dict(epochs=2, batch_size=batch_size, lr=0.3, l2=0.01, l1=0.001, dropout=0.5, input_dropout=0.2,
              dropout_scaling=scaling, verbose=False, seed=17)  # fmt: skip
    nets = []
    for be in ("numpy", backend):
        net = Network([6, 8, 5, 3], activation="tanh", output="softmax", loss="ce", backend=be, seed=1)
        hist = net.fit(X, y, **kw)
        nets.append((net, hist))
    (ref, h_ref), (net, hist) = nets
    steps = {1: 40, 7: 6, None: 1}[batch_size]
    assert net.step_ == 2 * steps
    for a, b in zip(ref.weights + ref.biases, net.weights + net.biases, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hist.train_loss, h_ref.train_loss, rtol=1e-9)
    assert hist.train_acc == h_ref.train_acc
    assert (net.predict_keep is None) == (scaling == "inverted")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_training_masks_are_the_contract_masks_fresh_per_step(backend):
    """Recover the input mask of each stochastic step from the weight update of a linear unit and compare it
    with the contract's generator; the kept fraction is within binomial bounds."""
    n_in, keep, seed, n_steps = 400, 0.8, 2**40 + 3, 50
    X = np.ones((1, n_in))
    y = np.ones(1, dtype=np.int64)  # one output unit: the label is its 0/1 target (1 here, so that δ ≠ 0)
    be = get_backend(backend)
    W, b = [np.zeros((1, n_in))], [np.zeros(1)]
    kept = []
    for step in range(n_steps):
        before = W[0].copy()
        plan = plan_epoch([n_in, 1], "float64", batch_size=1, hidden="identity", output="identity", loss="mse",
                          keep=[keep], seed=seed)  # fmt: skip
        be.train_epoch(X, y, np.array([0]), (W, b), None, 1e-3, plan, 1000 + step)
        m = (W[0] - before)[0] != 0  # ΔW_j = -lr·δ·x_j·m_j/keep with δ ≠ 0: zero exactly where dropped
        np.testing.assert_array_equal(m, C.mask_bits(seed, 1000 + step, 0, 1, n_in, keep)[0])
        kept.append(m)
    kept = np.array(kept)
    n = kept.size
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
    assert len({row.tobytes() for row in kept}) == n_steps  # a fresh mask every step


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_mask_kernel_matches_contract_and_keep_rate(backend):
    be = get_backend(backend)
    for keep in (0.5, 0.8):
        m = be.dropout_mask(12345, 7, 1, 300, 200, keep, dtype="float64")
        bits = C.mask_bits(12345, 7, 1, 300, 200, keep)
        np.testing.assert_array_equal(m != 0, bits)
        assert set(np.unique(m)) == {0.0, 1.0 / keep}
        assert abs(bits.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / bits.size)
        assert len({row.tobytes() for row in bits}) == 300  # every example its own mask


def _linear_net():
    net = Network([12, 9, 7, 4], activation="identity", output="identity", backend="numpy", seed=3)
    for b in net.biases:
        b[...] = 0.1
    return net


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inverted_and_predict_time_scaling_give_the_expected_activations(backend):
    """On a linear network the average over many masks of the training-time forward pass equals the
    prediction-time forward pass: plain weights for inverted dropout, weights scaled by keep for the
    classic variant (``Network.predict_keep``).  Tolerance: 5 standard errors of the Monte-Carlo mean."""
    keeps = [0.8, 0.5, 0.5]
    net = _linear_net()
    be = get_backend(backend)
    X = np.random.default_rng(0).normal(size=(6, 12))
    n_masks = 3000
    for inverted in (True, False):
        outs = np.empty((n_masks, 6, 4))
        for s in range(n_masks):
            A = X
            for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
                m = be.dropout_mask(99, s, i, 6, A.shape[1], keeps[i], scale=1 / keeps[i] if inverted else 1.0)
                A = (A * m) @ W.T + b
            outs[s] = A
        net.predict_keep = None if inverted else keeps
        expected = net.predict_proba(X)  # identity output: the output activations
        mean, se = outs.mean(0), outs.std(0) / np.sqrt(n_masks)
        assert np.all(np.abs(mean - expected) < 5 * se + 1e-12), (inverted, np.max(np.abs(mean - expected) / se))
    # the two prediction-time networks differ (the check above can tell them apart)
    net.predict_keep = None
    plain = net.predict_proba(X)
    net.predict_keep = keeps
    assert np.max(np.abs(plain - net.predict_proba(X))) > 10 * np.max(se)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_dropout_at_predict_and_classic_scaling(backend, rng):
    X, y = _blobs(rng)
    net = Network([6, 8, 3], output="softmax", loss="ce", backend=backend, seed=0)
    net.fit(X, y, epochs=2, dropout=0.5, input_dropout=0.2, verbose=False, seed=1)
    assert net.predict_keep is None and (net.dropout_, net.input_dropout_) == (0.5, 0.2)
    P = net.predict_proba(X)
    np.testing.assert_array_equal(P, net.predict_proba(X))  # deterministic: no dropout at prediction
    np.testing.assert_allclose(P, get_backend("numpy").forward_network(X, net.weights, net.biases, "sigmoid", "softmax"),
                               rtol=1e-12)  # fmt: skip
    net.fit(X, y, epochs=1, dropout=0.5, input_dropout=0.2, dropout_scaling="predict", verbose=False, seed=1)
    assert net.predict_keep == [0.8, 0.5]
    scaled = [net.weights[0] * 0.8, net.weights[1] * 0.5]
    np.testing.assert_allclose(net.predict_proba(X),
                               get_backend("numpy").forward_network(X, scaled, net.biases, "sigmoid", "softmax"),
                               rtol=1e-12)  # fmt: skip


# ---------------------------------------------------------------------------- Monte-Carlo dropout
def _manual_mc_sample(net, X, seed, s, keeps, scales):
    """One MC sample of rows < MC_BLOCK, written from the contract: step s, layer i, rows of the block."""
    A = X
    L = len(net.weights)
    for i, (W, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        if keeps[i] < 1:
            A = A * (C.mask_bits(seed, s, i, A.shape[0], A.shape[1], keeps[i]) * scales[i])
        act = net.output if i == L - 1 else net.activation
        A = get_backend("numpy").forward(A, W, b, act)
    return A


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mc_predict_is_the_contract_masks_averaged(backend, rng):
    X, y = _blobs(rng, n=50)
    net = Network([6, 10, 8, 3], output="softmax", loss="ce", backend=backend, seed=0)
    net.fit(X, y, epochs=3, batch_size=10, dropout=0.3, input_dropout=0.1, verbose=False, seed=2)
    res = net.mc_predict(X, n_samples=5, seed=77)
    assert isinstance(res, MCPrediction) and res.seed == 77 and res.n_samples == 5
    assert (res.dropout, res.input_dropout) == (0.3, 0.1)
    keeps = [0.9, 0.7, 0.7]
    samples = np.array([_manual_mc_sample(net, X, 77, s, keeps, [1 / k for k in keeps]) for s in range(5)])
    np.testing.assert_allclose(res.mean, samples.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.std, samples.std(0), rtol=1e-9, atol=1e-14)
    m = samples.mean(0)
    np.testing.assert_allclose(res.entropy, -np.sum(m * np.log(m), axis=1), rtol=1e-12)
    per_sample_h = -np.sum(samples * np.log(samples), axis=2).mean(0)
    np.testing.assert_allclose(res.mutual_info, res.entropy - per_sample_h, rtol=1e-9, atol=1e-14)
    mean, std, entropy = res  # unpacks as a tuple
    assert mean.shape == std.shape == (50, 3) and entropy.shape == (50,)
    np.testing.assert_allclose(mean.sum(1), 1.0, rtol=1e-12)
    assert np.all(entropy >= 0) and np.all(entropy <= np.log(3) + 1e-12) and np.all(std >= 0)
    np.testing.assert_array_equal(res.predict(), mean.argmax(1))
    assert "n_samples=5" in repr(res)


def test_mc_predict_reproducible_identical_across_backends_and_chunk_invariant(rng, monkeypatch):
    X, y = _blobs(rng, n=600)  # more than two blocks of MC_BLOCK rows
    net = Network([6, 16, 3], backend="numpy", seed=0)
    net.fit(X, y, epochs=2, dropout=0.5, verbose=False, seed=1)
    ref = net.mc_predict(X, n_samples=12, seed=5)
    for be in ALL_BACKENDS:
        net.backend = be
        other = net.mc_predict(X, n_samples=12, seed=5)
        np.testing.assert_allclose(other.mean, ref.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(other.std, ref.std, rtol=1e-9, atol=1e-14)
    net.backend = "numpy"
    monkeypatch.setattr(mc, "MC_MAX_ELEMENTS", 1000)  # stack fewer samples per gemm: same masks
    small = net.mc_predict(X, n_samples=12, seed=5)
    np.testing.assert_allclose(small.mean, ref.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(small.entropy, ref.entropy, rtol=1e-12, atol=1e-15)
    assert not np.allclose(net.mc_predict(X, n_samples=12, seed=6).mean, ref.mean, rtol=1e-6, atol=0)
    # rows of different blocks get different masks: identical inputs in two blocks give different samples
    Xd = np.repeat(X[:1], 2 * mc.MC_BLOCK, axis=0)
    r = net.mc_predict(Xd, n_samples=3, seed=1)
    assert not np.allclose(r.mean[0], r.mean[mc.MC_BLOCK], rtol=1e-6, atol=0)
    # large X with bounded memory: more than one block and the result has one row per input row
    big = net.mc_predict(np.tile(X, (3, 1)), n_samples=2, seed=0)
    assert big.mean.shape == (1800, 3)


def test_mc_predict_default_rates_errors_and_persistence(tmp_path, rng):
    X, y = _blobs(rng, n=40)
    net = Network([6, 5, 3], backend="numpy", seed=0)
    with pytest.raises(ValueError, match="dropout"):
        net.mc_predict(X)  # never fitted, no rates given
    r = net.mc_predict(X, n_samples=3, dropout=0.5, seed=0)  # explicit rates on an unfitted network work
    assert r.dropout == 0.5 and r.input_dropout == 0.0
    net.fit(X, y, epochs=1, batch_size=10, verbose=False)
    assert (net.dropout_, net.input_dropout_) == (0.0, 0.0)
    with pytest.raises(ValueError, match="dropout rate > 0"):
        net.mc_predict(X)
    net.fit(X, y, epochs=1, batch_size=10, dropout=0.4, input_dropout=0.1, verbose=False)
    a = net.mc_predict(X, n_samples=4, seed=3)
    assert (a.dropout, a.input_dropout) == (0.4, 0.1)
    loaded = Network.load(net.save(tmp_path / "m"), backend="numpy")
    assert (loaded.dropout_, loaded.input_dropout_) == (0.4, 0.1)
    np.testing.assert_array_equal(loaded.mc_predict(X, n_samples=4, seed=3).mean, a.mean)
    assert net.mc_predict(X, n_samples=4, seed=3, dropout=0.2).dropout == 0.2
    fresh = Network.load(Network([6, 5, 3], seed=0).save(tmp_path / "fresh"))
    assert fresh.dropout_ is None and fresh.input_dropout_ is None
    for bad, exc in (({"n_samples": 0}, ValueError), ({"dropout": 1.0}, ValueError), ({"n_samples": 2.0}, TypeError)):
        with pytest.raises(exc):
            net.mc_predict(X, **bad)
    b = net.mc_predict(X, n_samples=2)  # seed=None draws one and records it
    np.testing.assert_array_equal(net.mc_predict(X, n_samples=2, seed=b.seed).mean, b.mean)


def test_mc_predict_classic_dropout_uses_training_masks(rng):
    """A network trained with dropout_scaling='predict' gets unscaled masks at its trained rates."""
    X, y = _blobs(rng, n=30)
    net = Network([6, 7, 3], backend="numpy", seed=0)
    net.fit(X, y, epochs=1, batch_size=10, dropout=0.5, input_dropout=0.2, dropout_scaling="predict", verbose=False)
    res = net.mc_predict(X, n_samples=1, seed=4)
    one = _manual_mc_sample(net, X, 4, 0, [0.8, 0.5], [1.0, 1.0])
    np.testing.assert_allclose(res.mean, mc.output_to_proba(one, "sigmoid"), rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mc_predict_binary_unit_and_count_outputs(backend, rng):
    """One sigmoid unit (binary cross-entropy) gives two class columns ``[1 - p, p]``; an exp output
    (Poisson counts) is normalized like the other non-softmax outputs; both the same on every backend."""
    X, y = _blobs(rng, n=40)
    yb = (y > 0).astype(int)
    net = Network([6, 5, 1], loss="ce", backend=backend, seed=0)
    assert net.output == "sigmoid" and net.n_classes == 2
    net.fit(X, yb, epochs=2, batch_size=10, dropout=0.3, verbose=False, seed=1)
    res = net.mc_predict(X, n_samples=4, seed=2)
    assert res.mean.shape == (40, 2)
    one = np.array([_manual_mc_sample(net, X, 2, s, [1.0, 0.7], [1.0, 1 / 0.7])[:, 0] for s in range(4)])
    np.testing.assert_allclose(res.mean[:, 1], one.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.mean.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(res.predict(), (res.mean[:, 1] > 0.5).astype(int))
    counts = Network([6, 5, 2], activation="relu", loss="poisson", backend=backend, seed=0)
    assert counts.output == "exp"
    c = counts.mc_predict(X, n_samples=3, seed=2, dropout=0.2)
    ref = Network([6, 5, 2], activation="relu", loss="poisson", backend="numpy", seed=0).mc_predict(X, n_samples=3,
                                                                                                     seed=2, dropout=0.2)
    np.testing.assert_allclose(c.mean, ref.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c.mean.sum(1), 1.0, rtol=1e-12)


def test_output_to_proba():
    A = np.array([[0.2, 0.6], [0.0, 0.0], [-1.0, 3.0]])
    np.testing.assert_allclose(mc.output_to_proba(A, "sigmoid"), [[0.25, 0.75], [0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_array_equal(mc.output_to_proba(A[:1], "softmax"), A[:1])
    np.testing.assert_allclose(mc.output_to_proba(np.array([[0.25], [1.0]]), "sigmoid"), [[0.75, 0.25], [0.0, 1.0]])


# ---------------------------------------------------------------------------- early stopping on a synthetic curve
class _Recorder(Callback):
    """Keeps a copy of the weights after every epoch (runs before early stopping in the callback list)."""

    def on_train_begin(self, net, history):
        self.params = []

    def on_epoch_end(self, net, history):
        self.params.append(net.get_params())
        return False


def _scripted_fit(backend, rng, monkeypatch, valid_loss=None, valid_acc=None, epochs=10, **kw):
    X, y = _blobs(rng, n=60)
    net = Network([6, 5, 3], backend=backend, seed=0)
    n = epochs
    losses = iter(valid_loss if valid_loss is not None else [1.0] * n)
    accs = iter(valid_acc if valid_acc is not None else [0.5] * n)
    def scripted(X, Y, sample_weight, score):  # (valid loss, valid accuracy, valid score)
        acc = next(accs)
        return next(losses), acc, acc

    monkeypatch.setattr(net, "_evaluate_checked", scripted)
    rec = _Recorder()
    hist = net.fit(X, y, epochs=epochs, batch_size=20, lr=0.5, X_valid=X, y_valid=y, callbacks=[rec], verbose=False,
                   seed=0, **kw)  # fmt: skip
    return net, hist, rec


def _assert_weights(net, params):
    for a, b in zip(net.weights + net.biases, params[0] + params[1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best(backend, rng, monkeypatch):
    curve = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9, 0.1, 0.1, 0.1]  # best at 3; 3 epochs without improvement
    net, hist, rec = _scripted_fit(backend, rng, monkeypatch, valid_loss=curve, early_stopping=3)
    assert (hist.best_epoch, hist.stopped_epoch, len(hist)) == (3, 6, 6)
    assert hist.restored_best and hist.valid_loss == curve[:6]
    _assert_weights(net, rec.params[2])
    assert not np.array_equal(rec.params[2][0][0], rec.params[5][0][0])


def test_early_stopping_min_delta_monitor_and_restore_flags(rng, monkeypatch):
    curve = [1.0, 0.9, 0.86, 0.84, 0.83, 0.82, 0.80, 0.5]
    # improvements must exceed 0.05: 0.9 (e2) and 0.84 (e4, < 0.9 - 0.05) count, later ones do not
    es = EarlyStopping(patience=3, min_delta=0.05)
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_loss=curve, epochs=8, early_stopping=es)
    assert (hist.best_epoch, hist.stopped_epoch) == (4, 7) and es.best_value == 0.84
    _assert_weights(net, rec.params[3])
    # without min_delta every epoch improves: no stop, best = last
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_loss=curve, epochs=8, early_stopping=3)
    assert (hist.best_epoch, hist.stopped_epoch, len(hist)) == (8, None, 8)
    # accuracy is maximized; a tie is not an improvement
    accs = [0.5, 0.7, 0.69, 0.7, 0.65, 0.99]
    es = EarlyStopping(patience=3, monitor="valid_acc")
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_acc=accs, epochs=6, early_stopping=es)
    assert (hist.best_epoch, hist.stopped_epoch) == (2, 5)
    _assert_weights(net, rec.params[1])


def test_best_weights_restored_even_without_stopping(rng, monkeypatch):
    curve = [1.0, 0.5, 0.6, 0.55, 0.7]
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_loss=curve, epochs=5, early_stopping=10)
    assert (hist.best_epoch, hist.stopped_epoch, len(hist)) == (2, None, 5) and hist.restored_best
    _assert_weights(net, rec.params[1])
    es = EarlyStopping(patience=10, restore_best=False)
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_loss=curve, epochs=5, early_stopping=es)
    assert hist.best_epoch == 2 and not hist.restored_best
    _assert_weights(net, rec.params[4])


def test_early_stopping_validation(rng):
    X, y = _blobs(rng, n=20)
    net = Network([6, 3], backend="numpy", seed=0)
    with pytest.raises(ValueError, match="validation data"):
        net.fit(X, y, epochs=2, batch_size=10, early_stopping=EarlyStopping(2, monitor="valid_acc"), verbose=False)
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping(monitor="val_f1")
    assert EarlyStopping(monitor="loss").monitor == "train_loss"  # Keras's names are accepted
    with pytest.raises(ValueError, match="convention"):
        EarlyStopping(convention="pytorch")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    assert repr(EarlyStopping(3)) == "EarlyStopping(patience=3, min_delta=0.0, monitor='valid_loss', restore_best=True)"


def test_early_stopping_on_training_metrics_and_regression_scores(rng):
    """monitor='train_loss' needs no validation data; a regression fit has no accuracy to monitor, but its
    valid_score (R²) is maximized."""
    X, y = _blobs(rng, n=60)
    net = Network([6, 5, 3], backend="numpy", seed=0)
    es = EarlyStopping(patience=2, monitor="train_loss")
    hist = net.fit(X, y, epochs=6, batch_size=20, lr=0.5, early_stopping=es, verbose=False, seed=0)
    assert hist.valid_loss is None and hist.best_epoch == int(np.argmin(hist.train_loss)) + 1
    t = X @ rng.normal(size=6)
    reg = Network([6, 4, 1], activation="tanh", loss="squared_error", backend="numpy", seed=0)
    with pytest.raises(ValueError, match="not defined for regression"):
        reg.fit(X, t, epochs=2, batch_size=20, X_valid=X, y_valid=t, verbose=False,
                early_stopping=EarlyStopping(2, monitor="valid_acc"))  # fmt: skip
    es = EarlyStopping(patience=3, monitor="valid_score")
    h = reg.fit(X, t, epochs=8, batch_size=20, lr=0.01, X_valid=X, y_valid=t, early_stopping=es, verbose=False, seed=0)
    assert h.best_epoch == int(np.argmax(h.valid_score)) + 1 and h.restored_best
    assert reg.evaluate(X, t)[1] == pytest.approx(max(h.valid_score), rel=1e-12)


def test_nan_validation_loss_is_never_best(rng, monkeypatch):
    curve = [float("nan"), 0.9, 0.8, 0.85, 0.86]
    net, hist, rec = _scripted_fit("numpy", rng, monkeypatch, valid_loss=curve, epochs=5, early_stopping=2)
    assert (hist.best_epoch, hist.stopped_epoch) == (3, 5)
    _assert_weights(net, rec.params[2])


# ---------------------------------------------------------------------------- real MNIST: regularization narrows the gap
@pytest.mark.slow
@pytest.mark.mnist
def test_regularization_reduces_overfitting_on_mnist(mnist):
    """784-256-10 on 5,000 training rows over-fits; L2 and dropout each shrink the train/valid accuracy gap."""
    X_train, y_train, _, _ = mnist
    X, y = X_train[:5000] / 255.0, y_train[:5000]
    Xv, yv = X_train[5000:10000] / 255.0, y_train[5000:10000]
    backend = fastmlp.available_backends()[0]
    kw = dict(epochs=12, batch_size=50, lr=0.2, X_valid=Xv, y_valid=yv, verbose=False, seed=0)
    gaps = {}
    for name, reg in (("none", {}), ("l2", {"l2": 5e-3}), ("dropout", {"dropout": 0.5, "input_dropout": 0.2})):
        net = Network([784, 256, 10], activation="relu", output="softmax", loss="ce", dtype="float32",
                      backend=backend, seed=1)  # fmt: skip
        net.fit(X, y, **reg, **kw)
        train_acc, valid_acc = net.evaluate(X, y)[1], net.evaluate(Xv, yv)[1]
        gaps[name] = (train_acc - valid_acc, train_acc, valid_acc)
    assert gaps["none"][1] > 0.99  # it does over-fit: (nearly) perfect on its training rows
    assert gaps["none"][0] > 0.05
    assert gaps["l2"][0] < gaps["none"][0] - 0.01, gaps
    assert gaps["dropout"][0] < gaps["none"][0] - 0.01, gaps
    assert gaps["dropout"][2] >= gaps["none"][2] - 0.01, gaps  # without costing validation accuracy
