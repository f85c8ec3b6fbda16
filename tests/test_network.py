"""Network: initialisation, inference, fit variants, persistence."""

import io
import json
import os
import zipfile
from contextlib import redirect_stdout

import notebook
import numpy as np
import pytest
from conftest import ALL_BACKENDS

import fastmlp
from fastmlp import EarlyStopping, History, Network


def _blobs(rng, n=300, n_features=8, n_classes=3):
    centers = rng.normal(0, 3, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    X = centers[y] + rng.normal(size=(n, n_features))
    return X, y


def test_init_matches_notebook():
    net = Network([784, 50, 10], seed=123)
    ref = notebook.NeuralNetMLP(784, 50, 10, random_seed=123)
    np.testing.assert_array_equal(net.weights[0], ref.weight_h)
    np.testing.assert_array_equal(net.weights[1], ref.weight_out)
    assert not net.biases[0].any() and not net.biases[1].any()
    assert [W.shape for W in net.weights] == [(50, 784), (10, 50)]


def test_repr_and_config():
    net = Network([4, 6, 5, 3], activation="relu", output="softmax", loss="ce", dtype="float32", backend="numpy")
    r = repr(net)
    assert "4-6-5-3" in r and "float32" in r and "numpy" in r and "relu" in r
    assert net.config()["layers"] == [4, 6, 5, 3]
    assert net.n_parameters == 4 * 6 + 6 + 6 * 5 + 5 + 5 * 3 + 3
    assert all(W.dtype == np.float32 for W in net.weights)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [({"layers": [4]}, ValueError, "at least"), ({"layers": [4, 0]}, ValueError, "layers\\[1\\]"),
     ({"layers": "784"}, TypeError, "layers"), ({"activation": "softmax"}, ValueError, "activation"),
     ({"output": "tanh"}, ValueError, "output"), ({"loss": "hinge"}, ValueError, "loss"),
     ({"output": "identity", "loss": "ce"}, ValueError, "needs output"), ({"dtype": "int32"}, ValueError, "dtype"),
     ({"backend": "fortran"}, ValueError, "unknown backend"), ({"seed": -1}, ValueError, "seed")],
)  # fmt: skip
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = {"layers": [4, 3, 2], **kwargs}
    layers = args.pop("layers")
    with pytest.raises(exc, match=match):
        Network(layers, **args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fit_learns_blobs(backend, dtype, rng):
    X, y = _blobs(rng)
    net = Network([8, 16, 3], output="softmax", loss="ce", dtype=dtype, backend=backend, seed=0)
    hist = net.fit(X, y, epochs=15, batch_size=32, lr=0.5, X_valid=X, y_valid=y, verbose=False, seed=1)
    assert isinstance(hist, History) and len(hist) == 15
    assert hist.valid_acc[-1] > 0.9
    assert hist.train_loss[-1] < hist.train_loss[0]
    d = hist.as_dict()
    assert set(d) >= {"epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_score", "lr", "seconds"}
    assert d["lr"] == [0.5] * 15
    assert "step_lr" not in d and hist.step_lr == []  # a constant rate records no per-step rates
    columns = [v for v in d.values() if isinstance(v, list)]
    assert {len(v) for v in columns} == {15}  # equal-length columns: one row per epoch
    assert d["epoch"] == list(range(1, 16)) and d["task"] == "classification"
    assert hist.valid_score == hist.valid_acc  # the default score of class labels is the accuracy
    k = hist.history  # Keras's names
    assert k["loss"] == hist.train_loss and k["val_accuracy"] == hist.valid_acc and k["learning_rate"] == d["lr"]
    json.dumps(d)


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_stochastic_minibatch_and_full_batch(batch_size, rng):
    X, y = _blobs(rng, n=60)
    net = Network([8, 5, 3], backend="numpy", seed=0)
    before = net.get_params()
    hist = net.fit(X, y, epochs=2, batch_size=batch_size, lr=0.5, verbose=False, seed=0)
    assert len(hist) == 2
    assert not np.allclose(before[0][0], net.weights[0])
    if batch_size is None:  # full batch: exactly one step per epoch
        assert net.step_ == 2
    elif batch_size == 7:  # the last partial batch is used: ceil(60/7) = 9 steps
        assert net.step_ == 18


def test_fit_uses_last_partial_batch(rng):
    X, y = _blobs(rng, n=21)
    a = Network([8, 3], backend="numpy", seed=0)
    a.fit(X, y, epochs=1, batch_size=10, shuffle=False, verbose=False)
    b = Network([8, 3], backend="numpy", seed=0)
    for start in (0, 10, 20):  # three steps, the last with one row
        Xs, ys = X[start : start + 10], y[start : start + 10]
        b.fit(Xs, ys, epochs=1, batch_size=len(Xs), shuffle=False, verbose=False)
    np.testing.assert_allclose(a.weights[0], b.weights[0], rtol=1e-12)


def test_uint8_input_is_cast_once(rng):
    X = rng.integers(0, 256, size=(50, 8)).astype(np.uint8)
    y = rng.integers(0, 3, size=50)
    net = Network([8, 3], dtype="float32", backend="numpy", seed=0)
    net.fit(X, y, epochs=1, batch_size=10, verbose=False)
    assert net.predict(X).shape == (50,)
    assert net.predict_proba(X).dtype == np.float32


def test_same_seed_same_weights(rng):
    X, y = _blobs(rng)
    runs = []
    for _ in range(2):
        net = Network([8, 6, 3], seed=4, backend="numpy")
        net.fit(X, y, epochs=2, seed=9, dropout=0.3, verbose=False)
        runs.append(net.weights[0].copy())
    np.testing.assert_array_equal(*runs)


def test_evaluate_and_predict(rng):
    X, y = _blobs(rng)
    net = Network([8, 12, 3], output="softmax", loss="ce", backend="numpy", seed=0)
    net.fit(X, y, epochs=10, lr=0.5, batch_size=20, verbose=False)
    loss, acc = net.evaluate(X, y)
    P = net.predict_proba(X)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-12)
    assert acc == pytest.approx(np.mean(net.predict(X) == y))
    assert loss == pytest.approx(-np.mean(np.log(P[np.arange(len(y)), y])))
    acts = net.forward(X)
    assert [a.shape for a in acts] == [(300, 12), (300, 3)]
    np.testing.assert_allclose(acts[-1], P)


def test_fit_prints_epoch_lines(rng):
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    out = io.StringIO()
    with redirect_stdout(out):
        net.fit(X, y, epochs=2, batch_size=10, X_valid=X, y_valid=y)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("Epoch: 001/002 | Train loss:") and "Valid Acc:" in lines[2]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [({"epochs": 0}, ValueError, "epochs"), ({"lr": -0.1}, ValueError, "lr"), ({"batch_size": 0}, ValueError, "batch_size"),
     ({"dropout": 1.0}, ValueError, "dropout"), ({"l2": -1.0}, ValueError, "l2"),
     ({"X_valid": np.zeros((3, 8))}, ValueError, "both"), ({"early_stopping": 3}, ValueError, "validation data"),
     ({"epochs": 1.5}, TypeError, "epochs")],
)  # fmt: skip
def test_fit_rejects_bad_arguments(kwargs, exc, match, rng):
    X, y = _blobs(rng, n=30)
    net = Network([8, 3], backend="numpy", seed=0)
    args = {"epochs": 1, "batch_size": 10, "verbose": False, **kwargs}
    with pytest.raises(exc, match=match):
        net.fit(X, y, **args)


@pytest.mark.parametrize(
    "X,y,exc,match",
    [(np.zeros((5, 7)), np.zeros(5, int), ValueError, "features"), (np.zeros((5, 8)), np.zeros(4, int), ValueError, "match"),
     (np.full((5, 8), np.nan), np.zeros(5, int), ValueError, "NaN"), (np.zeros((5, 8)), np.full(5, 3), ValueError, r"\[0, 3\)"),
     (np.zeros((5, 8), complex), np.zeros(5, int), TypeError, "real"), (np.zeros(8), np.zeros(1, int), ValueError, "2-D"),
     (np.zeros((5, 8)), np.full(5, 0.5), TypeError, "integer")],
)  # fmt: skip
def test_fit_rejects_bad_data(X, y, exc, match):
    net = Network([8, 3], backend="numpy", seed=0)
    with pytest.raises(exc, match=match):
        net.fit(X, y, epochs=1, verbose=False)


def test_divergence_keeps_last_finite_weights(rng):
    X, y = _blobs(rng)
    X *= 1e30
    net = Network([8, 4, 3], activation="identity", output="identity", loss="mse", backend="numpy", seed=0)
    before = net.get_params()
    with pytest.raises(FloatingPointError, match="diverged"):
        net.fit(X, y, epochs=3, lr=10.0, verbose=False)
    assert net.history_.diverged
    np.testing.assert_array_equal(net.weights[0], before[0][0])
    with pytest.warns(RuntimeWarning, match="diverged"):
        h = net.fit(X, y, epochs=3, lr=10.0, verbose=False, on_divergence="stop")
    assert h.diverged and all(np.isfinite(W).all() for W in net.weights)


def test_keyboard_interrupt_returns_partial_history(rng, monkeypatch):
    X, y = _blobs(rng)
    net = Network([8, 4, 3], backend="numpy", seed=0)
    raw = net.backend.raw
    calls = {"n": 0}
    real = raw.train_epoch

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            args[3][0][...] = 123.0  # a half-finished epoch...
            raise KeyboardInterrupt  # ...interrupted by Ctrl-C
        return real(*args)

    monkeypatch.setattr(raw, "train_epoch", flaky)
    hist = net.fit(X, y, epochs=5, verbose=False)
    assert hist.interrupted and len(hist) == 2
    assert not (net.weights[0] == 123.0).any()  # weights of the last complete epoch


def test_early_stopping_restores_best(rng):
    X, y = _blobs(rng, n=200)
    Xv, yv = _blobs(np.random.default_rng(99), n=100)  # a different problem: validation gets worse
    net = Network([8, 16, 3], backend="numpy", seed=0)
    es = EarlyStopping(patience=2)
    hist = net.fit(X, y, epochs=50, lr=1.0, X_valid=Xv, y_valid=yv, early_stopping=es, verbose=False)
    assert hist.best_epoch is not None and hist.restored_best
    best = hist.best_epoch
    assert hist.valid_loss[best - 1] == min(hist.valid_loss)
    if hist.stopped_epoch is not None:
        assert hist.stopped_epoch == best + 2
    loss, _ = net.evaluate(Xv, yv)
    assert loss == pytest.approx(hist.valid_loss[best - 1], rel=1e-12)


def test_save_load_roundtrip(tmp_path, rng):
    X, y = _blobs(rng)
    net = Network([8, 5, 3], activation="tanh", output="softmax", loss="ce", dtype="float32", backend="numpy", seed=2)
    net.fit(X, y, epochs=2, verbose=False)
    p = net.save(tmp_path / "model")
    assert p.name == "model.npz" and p.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    net2 = Network.load(p, backend="numpy")
    assert net2.config() == net.config()
    for a, b in zip(net.weights + net.biases, net2.weights + net2.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(net.predict_proba(X), net2.predict_proba(X))


def test_load_rejects_bad_files(tmp_path):
    net = Network([3, 2], seed=0)
    good = net.save(tmp_path / "m.npz")
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted"):
        Network.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=r"foreign.*unexpected member 'a\.npy'"):
        Network.load(tmp_path / "foreign.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match="not a fastmlp model"):
        Network.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError):
        Network.load(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "missing.npz")
    # a newer format version is refused
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "newer.npz", **arrays)
    with pytest.raises(ValueError, match="newer"):
        Network.load(tmp_path / "newer.npz")
    assert zipfile.is_zipfile(good)


def test_registry():
    names = fastmlp.available_backends()
    assert "numpy" in names
    assert fastmlp.get_backend("numpy").name == "numpy"
    assert fastmlp.get_backend("auto").name == names[0]
    with pytest.raises(ValueError, match="unknown backend"):
        fastmlp.get_backend("cuda")


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("FASTMLP_BACKEND", "numpy")
    assert Network([2, 2]).backend.name == "numpy"


# ---------------------------------------------------------------------------- continued fits, reset, optimizer state
def test_second_fit_continues_and_numbers_epochs_on(rng):
    X, y = _blobs(rng, n=90)
    kw = dict(batch_size=30, lr=0.3, verbose=False)
    net = Network([8, 5, 3], backend="numpy", seed=0)
    net.fit(X, y, epochs=2, seed=1, **kw)
    h2 = net.fit(X, y, epochs=3, seed=2, **kw)
    assert h2.epoch == [3, 4, 5] and net.epochs_ == 5 and net.step_ == 15
    # continuing is training from the weights the first fit left
    twin = Network([8, 5, 3], backend="numpy", seed=0)
    twin.fit(X, y, epochs=2, seed=1, **kw)
    W, b = twin.get_params()
    other = Network([8, 5, 3], backend="numpy", seed=0)
    other.set_params(W, b)
    other.step_, other.epochs_ = twin.step_, twin.epochs_
    other.fit(X, y, epochs=3, seed=2, **kw)
    for a, c in zip(net.weights + net.biases, other.weights + other.biases, strict=True):
        np.testing.assert_array_equal(a, c)
    # reset=True starts afresh: the weights and numbering of a new network
    h = net.fit(X, y, epochs=2, seed=1, reset=True, **kw)
    assert h.epoch == [1, 2] and net.epochs_ == 2
    fresh = Network([8, 5, 3], backend="numpy", seed=0)
    fresh.fit(X, y, epochs=2, seed=1, **kw)
    for a, c in zip(net.weights + net.biases, fresh.weights + fresh.biases, strict=True):
        np.testing.assert_array_equal(a, c)
    net.reset()
    assert net.epochs_ == net.step_ == 0 and net.optimizer_state_ is None and net.history_ is None
    np.testing.assert_array_equal(net.weights[0], Network([8, 5, 3], backend="numpy", seed=0).weights[0])


@pytest.mark.parametrize("optimizer", ["momentum", "adam", fastmlp.AdamW(weight_decay=0.1)], ids=str)
def test_save_load_keeps_optimizer_state_so_training_continues_exactly(tmp_path, rng, optimizer):
    X, y = _blobs(rng, n=90)
    kw = dict(batch_size=30, lr=0.01, optimizer=optimizer, verbose=False, seed=3)
    full = Network([8, 6, 3], activation="relu", loss="ce", backend="numpy", seed=1)
    full.fit(X, y, epochs=2, **kw)
    part = Network([8, 6, 3], activation="relu", loss="ce", backend="numpy", seed=1)
    part.fit(X, y, epochs=1, **kw)
    part.save(tmp_path / "model")
    back = Network.load(tmp_path / "model", backend="numpy")  # finds model.npz
    state = back.optimizer_state_
    assert state.kind == part.optimizer_state_.kind and state.t == part.optimizer_state_.t == 3
    for a, b in zip(state.arrays(), part.optimizer_state_.arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.epochs_ == 1 and back.step_ == part.step_
    h = back.fit(X, y, epochs=1, **{**kw, "seed": None})
    part.fit(X, y, epochs=1, **{**kw, "seed": None})
    assert h.epoch == [2]
    for a, b in zip(back.weights + back.biases, part.weights + part.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    # an optimizer's state carries over to the next fit with the same optimizer, as in one longer fit
    assert not all(np.array_equal(a, b) for a, b in zip(full.weights, Network([8, 6, 3], seed=1).weights, strict=True))
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "missing")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_optimizers_train_and_state_lives_with_the_network(backend, rng):
    X, y = _blobs(rng)
    for opt, lr in (("sgd", 0.5), ("nesterov", 0.1), (fastmlp.SGD(momentum=0.5), 0.2), (fastmlp.Adam(beta1=0.8), 0.01),
                    ("adamw", 0.01)):  # fmt: skip
        net = Network([8, 16, 3], activation="relu", loss="ce", backend=backend, seed=0)
        hist = net.fit(X, y, epochs=8, batch_size=32, lr=lr, optimizer=opt, X_valid=X, y_valid=y, verbose=False, seed=1)
        assert hist.valid_acc[-1] > 0.9, (opt, hist)
        state = net.optimizer_state_
        assert state.kind == fastmlp.optimizers.get_optimizer(opt).kind
        assert state.t == 8 * 10 and len(state.weights) == {"sgd": 0, "adam": 2, "adamw": 2}.get(state.kind, 1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        net.fit(X, y, epochs=1, optimizer="rmsprop", verbose=False)


def test_default_output_follows_the_loss():
    assert Network([4, 3], loss="mse").output == "sigmoid"
    assert Network([4, 3], loss="ce").output == "softmax"
    assert Network([4, 1], loss="ce").output == "sigmoid"  # one unit: binary cross-entropy
    assert Network([4, 2], loss="squared_error").output == "identity"
    assert Network([4, 2], loss="poisson").output == "exp"
    assert Network([4, 3]).n_outputs == 3 and Network([4, 1], loss="ce").n_classes == 2


def test_init_schemes(rng):
    net = Network([300, 200, 10], activation="relu", init="he", seed=0)
    assert abs(net.weights[0].std() - np.sqrt(2 / 300)) < 0.05 * np.sqrt(2 / 300) and not net.biases[0].any()
    g = Network([300, 200, 10], activation="tanh", init="glorot", seed=0)
    bound = np.sqrt(6 / 500)
    assert np.abs(g.weights[0]).max() <= bound and np.abs(g.weights[0]).max() > 0.99 * bound and g.biases[0].any()
    with pytest.raises(ValueError, match="init"):
        Network([3, 2], init="xavier")


# ---------------------------------------------------------------------------- dense targets (regression)
def _onehot(y, k):
    Y = np.zeros((len(y), k))
    Y[np.arange(len(y)), y] = 1
    return Y


def test_dense_onehot_targets_are_the_labels_problem(rng):
    """An identity output with MSE on one-hot dense targets trains exactly as on the integer labels
    (dropout, l2 and l1 included); the compiled backends within 1e-9."""
    X, y = _blobs(rng, n=200, n_classes=4)
    kw = dict(epochs=3, batch_size=32, lr=0.05, seed=11, l2=1e-3, l1=1e-4, dropout=0.3, input_dropout=0.1, verbose=False)
    a = Network([8, 12, 6, 4], activation="tanh", output="identity", loss="mse", backend="numpy", seed=5)
    b = Network([8, 12, 6, 4], activation="tanh", output="identity", loss="mse", backend="numpy", seed=5)
    ha = a.fit(X, y, **kw)
    hb = b.fit(X, _onehot(y, 4), **kw)
    for Wa, Wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        np.testing.assert_array_equal(Wa, Wb)
    np.testing.assert_array_equal(hb.train_data_loss, ha.train_data_loss)
    # an identity output makes dense targets a regression task: no accuracy, R² as the score
    assert (ha.task, hb.task) == ("classification", "regression") and hb.train_acc is None
    for backend in ALL_BACKENDS:
        c = Network([8, 12, 6, 4], activation="tanh", output="identity", loss="mse", backend=backend, seed=5)
        c.fit(X, _onehot(y, 4), **kw)
        for Wa, Wc in zip(a.weights + a.biases, c.weights + c.biases, strict=True):
            np.testing.assert_allclose(Wc, Wa, rtol=1e-9, atol=1e-12)


def test_one_output_regression_with_1d_targets_recovers_least_squares(rng):
    X = rng.normal(size=(300, 4))
    X[:, 1] += 0.5 * X[:, 0]  # correlated features (still well conditioned: plain GD converges)
    X = (X - X.mean(0)) / X.std(0)
    t = X @ rng.normal(size=4) + 3.0 + 0.3 * rng.normal(size=300)
    net = Network([4, 1], loss="squared_error", backend="numpy", seed=0)
    assert net.output == "identity" and net.is_regressor
    hist = net.fit(X, t, epochs=1000, batch_size=None, lr=0.1, verbose=False, X_valid=X, y_valid=t)
    A = np.hstack([X, np.ones((300, 1))])
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    np.testing.assert_allclose(net.weights[0][0], coef[:4], atol=1e-8)
    np.testing.assert_allclose(net.biases[0], coef[4:], atol=1e-8)
    pred = net.predict(X)
    assert pred.shape == (300,)
    np.testing.assert_allclose(pred, A @ coef, atol=1e-7)
    # scikit-learn's squared_error: half the mean squared error, as the loss of the last epoch's (full) batch
    np.testing.assert_allclose(hist.train_data_loss[-1], 0.5 * np.mean((A @ coef - t) ** 2), rtol=1e-8)
    loss, r2 = net.evaluate(X, t)
    assert loss == pytest.approx(0.5 * np.mean((pred - t) ** 2), rel=1e-12)
    assert r2 == pytest.approx(1 - np.sum((pred - t) ** 2) / np.sum((t - t.mean()) ** 2), rel=1e-12)
    assert hist.task == "regression" and hist.train_acc is None and hist.valid_acc is None
    assert hist.valid_score[-1] == pytest.approx(r2, rel=1e-12)
    assert "accuracy" not in hist.history and "val_score" in hist.history
    with pytest.raises(ValueError, match="target columns"):
        net.fit(X, np.zeros((300, 2)), epochs=1, verbose=False)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_multi_output_regression_step_is_the_gradient(backend):
    """One full-batch step at lr 1 on 2-D targets is ``W <- W - grad`` of ``sum (a - t)^2 / (2 n)``
    (scikit-learn's squared_error delta ``(a - t) / n``), biases included."""
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    net = Network([3, 5, 4, 2], activation="tanh", loss="squared_error", backend=backend, seed=2)

    def objective() -> float:
        return float(np.sum((net.predict_proba(X) - Y) ** 2) / (2 * X.shape[0]))

    W0, b0 = net.get_params()
    hist = net.fit(X, Y, epochs=1, batch_size=None, lr=1.0, shuffle=False, verbose=False)
    assert hist.train_data_loss[0] == pytest.approx(objective_at(net, W0, b0, objective) / 2, rel=1e-12)
    grads = [old - new for old, new in zip(W0 + b0, net.weights + net.biases, strict=True)]
    net.set_params(W0, b0)
    eps = 1e-6
    for param, grad in zip(net.weights + net.biases, grads, strict=True):
        flat, g = param.reshape(-1), grad.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            up = objective()
            flat[j] = old - eps
            down = objective()
            flat[j] = old
            assert abs((up - down) / (2 * eps) - g[j]) < 1e-7


def objective_at(net, W, b, objective):
    """``objective()`` with the network's parameters set to ``(W, b)`` for the call (restored after)."""
    now = net.get_params()
    net.set_params(W, b)
    try:
        return objective()
    finally:
        net.set_params(*now)
