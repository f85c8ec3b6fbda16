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
        net.fit(X, y, epochs=2, batch_size=10, X_valid=X, y_valid=y, verbose=2)
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


# ---------------------------------------------------------------------------- progress, as Keras shows it
def test_verbose_1_is_a_bar_per_epoch_2_a_line_0_nothing(rng, capsys):
    """verbose=1 (the default): a tqdm bar per epoch on stderr with the steps, the loss and accuracy and, at the
    end, the validation numbers; verbose=2: one line per epoch on stdout; verbose=0: silent."""
    X, y = _blobs(rng, n=120)
    net = Network([8, 4, 3], loss="ce", backend="numpy", seed=0)
    hist = net.fit(X, y, epochs=2, batch_size=10, lr=0.5, validation_split=0.25)
    out, err = capsys.readouterr()
    assert out.startswith("Training Network(8-4-3") and "Epoch" not in out
    for e in (1, 2):
        final = [seg for seg in err.splitlines() if seg.startswith(f"Epoch {e}/2") and "9/9" in seg][-1]
        assert f"loss={hist.train_loss[e - 1]:.4f}" in final and f"accuracy={hist.train_acc[e - 1]:.4f}" in final
        assert f"val_loss={hist.valid_loss[e - 1]:.4f}" in final and f"val_accuracy={hist.valid_acc[e - 1]:.4f}" in final
    net.fit(X, y, epochs=2, batch_size=10, verbose=2)
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("Continuing training of Network(8-4-3") and "after its epoch 2" in out
    assert [line[:14] for line in out.splitlines()[1:]] == ["Epoch: 003/004", "Epoch: 004/004"] and err == ""
    net.fit(X, y, epochs=1, batch_size=10, verbose=0)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="verbose must be <= 2"):
        net.fit(X, y, epochs=1, verbose=3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bar_runs_epochs_in_chunks_that_train_the_same_weights(backend, rng, monkeypatch, capsys):
    """Under a bar an epoch runs as several compiled calls of consecutive steps; with dropout and Adam (masks
    and optimizer steps counted across the calls) the weights are bit for bit those of one call per epoch."""
    from fastmlp import progress
    from fastmlp.backends import PreparedEpochs

    X, y = _blobs(rng, n=400)
    calls = []
    real = PreparedEpochs.__call__

    def counting(self, order, *args):
        calls.append(len(order))
        return real(self, order, *args)

    monkeypatch.setattr(PreparedEpochs, "__call__", counting)
    monkeypatch.setattr(progress, "CHUNK_SECONDS", 1e-9)  # as many chunks as allowed,
    monkeypatch.setattr(progress, "OVERHEAD", 1.0)  # whatever a call costs
    kw = dict(epochs=3, batch_size=7, lr=1e-2, optimizer="adam", dropout=0.3, input_dropout=0.1, seed=4)
    chunked = Network([8, 16, 3], activation="relu", loss="ce", backend=backend, seed=0)
    h1 = chunked.fit(X, y, verbose=1, **kw)
    assert len(calls) > 3 * 2 and sum(calls) == 3 * 400
    del calls[:]
    whole = Network([8, 16, 3], activation="relu", loss="ce", backend=backend, seed=0)
    h0 = whole.fit(X, y, verbose=0, **kw)
    assert calls == [400] * 3
    for a, b in zip(chunked.weights + chunked.biases, whole.weights + whole.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(h1.train_loss, h0.train_loss, rtol=1e-12)
    assert h1.train_acc == h0.train_acc and chunked.step_ == whole.step_
    assert chunked.optimizer_state_.t == whole.optimizer_state_.t
    capsys.readouterr()


@pytest.mark.parametrize("F,S,calls_after_the_first_epoch", [(0.15, 0.048, 1), (0.0008, 0.0024, 3), (0.0, 0.01, 15)])
def test_chunks_are_planned_from_the_measured_cost_of_a_call(F, S, calls_after_the_first_epoch):
    """Calls take F + S*steps: chunks last at least CHUNK_SECONDS and the extra calls cost at most OVERHEAD of
    an epoch (a network whose call costs three steps is not chunked at all); the first epoch probes twice."""
    from fastmlp import progress

    p = progress.EpochProgress(1, total=3, n_steps=400)
    for epoch in range(3):
        sizes, done = [], 0
        while done < 400:
            k = p.first_chunk() if done == 0 else p.next_chunk(done)
            sizes.append(k)
            p.timed(k, F + S * k)
            done += k
        assert sum(sizes) == 400
        if epoch == 0:
            assert sizes[:2] == [8, 16]  # the probes: 2 % of the steps, then twice that
        else:
            assert len(sizes) == calls_after_the_first_epoch, sizes
            assert (len(sizes) - 1) * F <= progress.OVERHEAD * (F + S * 400) + 1e-12
            assert min(S * k for k in sizes) >= progress.CHUNK_SECONDS * 0.99 or len(sizes) == 1
    assert p.call_seconds == pytest.approx(F, abs=1e-9) and p.step_seconds == pytest.approx(S, rel=1e-9)
    for verbose in (0, 2):
        assert progress.EpochProgress(verbose, 3, 400).first_chunk() == 400  # only a bar chunks


def test_a_chunked_epoch_that_diverges_keeps_the_last_finite_weights(rng, monkeypatch, capsys):
    from fastmlp import progress

    monkeypatch.setattr(progress, "CHUNK_SECONDS", 1e-9)
    monkeypatch.setattr(progress, "OVERHEAD", 1.0)
    X, y = _blobs(rng, n=300)
    net = Network([8, 6, 3], activation="identity", output="identity", loss="squared_error", backend="numpy", seed=0)
    t = np.eye(3)[y] * 1e3
    net.fit(X, t, epochs=1, lr=1e-7, batch_size=10, verbose=0)
    before = net.get_params()
    with pytest.raises(FloatingPointError, match="diverged"):
        net.fit(X * 1e3, t, epochs=2, lr=1e3, batch_size=10, verbose=1, warn=False)
    for a, b in zip(net.weights, before[0], strict=True):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()


# ---------------------------------------------------------------------------- no silent traps
def test_warns_when_inputs_look_unscaled_and_when_the_loss_stays_at_chance():
    """uint8 pixels 0..255 into a relu/softmax net: the loss sticks at log(10) = 2.30 and accuracy at 10 %.
    fit warns at once about the scale and after three epochs about the chance-level loss; scaled pixels train
    without either warning; warn=False silences both."""
    from fastmlp.datasets import load_digits

    X, y, _, _ = load_digits()
    kw = dict(epochs=4, lr=0.1, batch_size=32, verbose=0)
    with pytest.warns(UserWarning) as record:
        hist = Network([64, 32, 10], activation="relu", loss="ce", backend="numpy", seed=0).fit(X, y, **kw)
    msgs = [str(w.message) for w in record]
    assert hist.train_acc[-1] < 0.15 and abs(hist.train_data_loss[-1] - np.log(10)) < 0.01
    assert len(msgs) == 2 and "reach 255" in msgs[0] and "X / 255" in msgs[0]
    assert "chance level in the first 3 epochs" in msgs[1] and "2.30" in msgs[1]
    assert all(w.filename == __file__ for w in record)  # pointed at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Network([64, 32, 10], activation="relu", loss="ce", backend="numpy", seed=0).fit(X / 255.0, y, **kw)
        Network([64, 32, 10], activation="relu", loss="ce", backend="numpy", seed=0).fit(X, y, warn=False, **kw)


def test_batch_size_above_the_data_warns_and_clips(rng):
    X, y = _blobs(rng, n=40)
    net = Network([8, 3], backend="numpy", seed=0)
    with pytest.warns(UserWarning, match="batch_size=100 is larger than the 40 training samples; it is clipped to 40"):
        net.fit(X, y, epochs=2, verbose=0)
    assert net.step_ == 2  # one full batch per epoch


def test_any_callback_that_stops_sets_stopped_epoch(rng):
    class StopAt(fastmlp.Callback):
        def on_epoch_end(self, net, history):
            return history.epoch[-1] == 3

    X, y = _blobs(rng, n=60)
    hist = Network([8, 3], backend="numpy", seed=0).fit(X, y, epochs=10, batch_size=20, callbacks=[StopAt()], verbose=0)
    assert hist.stopped_epoch == 3 and len(hist) == 3 and hist.best_epoch is None


def test_validation_split_holds_out_the_last_rows(rng):
    X, y = _blobs(rng, n=100)
    kw = dict(epochs=2, batch_size=10, verbose=0, seed=1)
    a = Network([8, 3], backend="numpy", seed=0)
    ha = a.fit(X, y, validation_split=0.2, **kw)
    b = Network([8, 3], backend="numpy", seed=0)
    hb = b.fit(X[:80], y[:80], X_valid=X[80:], y_valid=y[80:], **kw)
    assert ha.valid_loss == hb.valid_loss and ha.valid_acc == hb.valid_acc
    np.testing.assert_array_equal(a.weights[0], b.weights[0])
    with pytest.raises(ValueError, match="not both"):
        a.fit(X, y, validation_split=0.2, X_valid=X, y_valid=y, **kw)
    with pytest.raises(ValueError, match="validation_split"):
        a.fit(X, y, validation_split=1.0, **kw)


def test_history_is_a_keras_dict_that_pandas_takes(rng):
    pd = pytest.importorskip("pandas")
    X, y = _blobs(rng, n=90)
    sched = fastmlp.LinearLR(0.5, start_factor=0.5, total_iters=4, per_step=True)
    hist = Network([8, 4, 3], loss="ce", backend="numpy", seed=0).fit(X, y, epochs=4, batch_size=30, lr=sched,
                                                                       validation_split=0.2, verbose=0)  # fmt: skip
    h = hist.history
    assert list(h) == ["loss", "train_data_loss", "accuracy", "val_loss", "val_accuracy", "val_score", "learning_rate",
                       "seconds"]  # fmt: skip
    df = pd.DataFrame(h)
    assert df.shape == (4, 8) and df["val_accuracy"].tolist() == hist.valid_acc
    d = pd.DataFrame(hist.as_dict())  # with the per-step rates of a schedule, one list per epoch
    assert len(d) == 4 and d["epoch"].tolist() == [1, 2, 3, 4] and len(d["step_lr"][0]) == 3


def test_summary_lists_layers_parameters_activation_and_dropout(rng):
    net = Network([8, 16, 4, 3], activation="relu", loss="ce", dtype="float32", backend="numpy", seed=0)
    lines = []
    assert net.summary(print_fn=lines.append) is None
    assert lines[0] == "Network 8-16-4-3 (loss 'ce', float32, backend 'numpy')"
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["dense_1", "dense_2", "output"]
    assert [int(r[7].replace(",", "")) for r in rows] == [8 * 16 + 16, 16 * 4 + 4, 4 * 3 + 3]
    assert [r[8] for r in rows] == ["relu", "relu", "softmax"] and [r[9] for r in rows] == ["-", "-", "-"]
    assert lines[5].startswith(f"Total parameters: {net.n_parameters:,} (float32")
    X, y = _blobs(rng, n=40)
    net.fit(X, y, epochs=1, batch_size=10, dropout=0.5, input_dropout=0.2, verbose=0)
    lines = []
    net.summary(print_fn=lines.append)
    assert [line.split()[-1] for line in lines[2:5]] == ["0.2", "0.5", "0.5"] and lines[5].endswith("trained 1 epochs")
    with pytest.raises(TypeError, match="print_fn"):
        net.summary(print_fn="stdout")


def test_messages_give_the_right_fix(rng):
    import fastmlp.compat as compat

    net = Network([8, 4, 3], loss="ce", backend="numpy", seed=0)
    with pytest.raises(ValueError, match=r"got shape \(8,\); for one sample use X\.reshape\(1, -1\)"):
        net.predict(np.zeros(8))
    with pytest.raises(ValueError, match=r"flatten each sample with X\.reshape\(len\(X\), -1\)"):
        net.predict(np.zeros((5, 2, 4)))
    onehot = np.eye(10)[rng.integers(0, 10, 40)]
    with pytest.raises(ValueError, match=r"one-hot labels for a 10-class problem.*y\.argmax\(1\)"):
        net.fit(np.zeros((40, 8)), onehot, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"look like one-hot rows: pass the class indices y_train\.argmax\(1\)"):
        compat.train(compat.NeuralNetMLP(8, 4, 10), np.zeros((200, 8)), np.eye(10)[np.arange(200) % 10],
                     np.zeros((100, 8)), np.arange(100) % 10, num_epochs=1)  # fmt: skip


# ---------------------------------------------------------------------------- files
def test_model_files_get_the_umask_mode_and_keep_a_symlink(tmp_path):
    net = Network([3, 2], backend="numpy", seed=0)
    old = os.umask(0o027)
    try:
        p = net.save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640  # 0o666 & ~umask, as open() would give, not mkstemp's 0o600
    os.umask(0o022)
    try:
        (tmp_path / "real").mkdir()
        (tmp_path / "link.npz").symlink_to(tmp_path / "real" / "target.npz")
        net.save(tmp_path / "link.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "link.npz").is_symlink() and (tmp_path / "real" / "target.npz").is_file()
    assert ((tmp_path / "real" / "target.npz").stat().st_mode & 0o777) == 0o644
    assert Network.load(tmp_path / "link").config() == net.config()  # load finds link.npz as save named it
    os.umask(0o027)
    try:  # checkpoints too
        net.fit(np.eye(3), np.array([0, 1, 0]), epochs=1, verbose=0, checkpoint=tmp_path / "ck.npz")
    finally:
        os.umask(old)
    assert ((tmp_path / "ck.npz").stat().st_mode & 0o777) == 0o640


def test_file_errors_name_the_file_never_a_temp_file_or_numpy_advice(tmp_path):
    net = Network([3, 2], backend="numpy", seed=0)
    with pytest.raises(ValueError) as exc:
        net.save(tmp_path / "missing" / "m.npz")
    assert "missing" in str(exc.value) and ".tmp" not in str(exc.value) and "does not exist" in str(exc.value)
    np.savez(tmp_path / "objects.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError) as exc:
        Network.load(tmp_path / "objects")
    assert "objects.npz" in str(exc.value) and "allow_pickle" not in str(exc.value)
    stale = tmp_path / ".m.npz.abc123.tmp"  # a temp file an interrupted save left
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    net.save(tmp_path / "m")
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["m.npz", "objects.npz"]
