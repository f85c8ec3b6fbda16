"""fastmlp.compat gives the classic notebook's numbers."""

import io
from contextlib import redirect_stdout

import notebook
import numpy as np
import pytest
from conftest import ALL_BACKENDS

import fastmlp.compat as compat


@pytest.fixture
def small_mnist(mnist):
    X_train, y_train, X_test, y_test = mnist
    X = ((X_train[:5000] / 255.0) - 0.5) * 2
    Xv = ((X_test[:1000] / 255.0) - 0.5) * 2
    return X, y_train[:5000], Xv, y_test[:1000]


@pytest.mark.mnist
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compat_matches_notebook_weights_and_output(small_mnist, backend, monkeypatch):
    X, y, Xv, yv = small_mnist
    monkeypatch.setattr(compat, "backend", backend)
    ref = notebook.NeuralNetMLP(784, 50, 10, random_seed=123)
    np.random.seed(123)
    out_ref = io.StringIO()
    with redirect_stdout(out_ref):
        hist_ref = notebook.train(ref, X, y, Xv, yv, num_epochs=2, learning_rate=0.1)
    state_after_ref = np.random.get_state()[1].copy()

    ours = compat.NeuralNetMLP(784, 50, 10, random_seed=123)
    np.random.seed(123)
    out = io.StringIO()
    with redirect_stdout(out):
        hist = compat.train(ours, X, y, Xv, yv, num_epochs=2, learning_rate=0.1)
    # the global RNG was consumed exactly as the notebook consumes it
    np.testing.assert_array_equal(np.random.get_state()[1], state_after_ref)
    for name in ("weight_h", "bias_h", "weight_out", "bias_out"):
        diff = np.max(np.abs(getattr(ours, name) - getattr(ref, name)))
        assert diff <= 1e-10, f"{name} differs by {diff}"
    assert out.getvalue() == out_ref.getvalue()
    np.testing.assert_allclose(hist[0], hist_ref[0], rtol=1e-10)
    assert hist[1] == hist_ref[1] and hist[2] == hist_ref[2]


def test_compat_forward_backward_match_notebook(rng):
    X = rng.normal(size=(37, 13))
    y = rng.integers(0, 4, size=37)
    a, b = compat.NeuralNetMLP(13, 7, 4, random_seed=5), notebook.NeuralNetMLP(13, 7, 4, random_seed=5)
    for ours, ref in zip(a.forward(X), b.forward(X), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-14)
    ah, ao = b.forward(X)
    for ours, ref in zip(a.backward(X, ah, ao, y), b.backward(X, ah, ao, y), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=1e-16)


def test_compat_helpers(rng):
    y = np.array([2, 0, 1, 2])
    np.testing.assert_array_equal(compat.int_to_onehot(y, 3), notebook.int_to_onehot(y, 3))
    probas = rng.random((4, 3))
    assert compat.mse_loss(y, probas, 3) == pytest.approx(np.mean((notebook.int_to_onehot(y, 3) - probas) ** 2))
    assert compat.accuracy(y, np.array([2, 0, 0, 2])) == 0.75
    X = np.arange(25.0).reshape(25, 1)
    np.random.seed(0)
    batches = list(compat.minibatch_generator(X, np.arange(25), 10))
    assert len(batches) == 2 and all(b[0].shape == (10, 1) for b in batches)
    assert compat.minibatch_size == 100


def test_compute_mse_and_acc_matches_notebook(rng):
    X = rng.normal(size=(350, 20))
    y = rng.integers(0, 10, size=350)
    m1, m2 = compat.NeuralNetMLP(20, 8, 10, random_seed=1), notebook.NeuralNetMLP(20, 8, 10, random_seed=1)
    np.random.seed(7)
    ref = notebook.compute_mse_and_acc(m2, X, y)
    np.random.seed(7)
    ours = compat.compute_mse_and_acc(m1, X, y)
    assert ours[0] == pytest.approx(ref[0], rel=1e-12)
    assert ours[1] == ref[1]


def test_compat_subclass_with_own_forward_runs_python_loop(rng):
    class Scaled(compat.NeuralNetMLP):
        def forward(self, x):
            return super().forward(x * 0.5)

    X = rng.normal(size=(300, 6))
    y = rng.integers(0, 3, size=300)
    m = Scaled(6, 4, 3)
    np.random.seed(0)
    with redirect_stdout(io.StringIO()):
        loss, tr, va = compat.train(m, X, y, X, y, num_epochs=1)
    assert len(loss) == 1 and 0 <= tr[0] <= 100


def test_compat_bad_input():
    m = compat.NeuralNetMLP(4, 3, 2)
    X = np.zeros((200, 4))
    with pytest.raises(ValueError, match="y_train"):
        compat.train(m, X, np.full(200, 5), X, np.zeros(200, int), num_epochs=1)
    with pytest.raises(ValueError, match="fewer than one minibatch"):
        compat.train(m, X[:10], np.zeros(10, int), X, np.zeros(200, int), num_epochs=1)
    with pytest.raises(ValueError, match="features"):
        compat.train(m, np.zeros((200, 5)), np.zeros(200, int), X, np.zeros(200, int), num_epochs=1)
    with pytest.raises(TypeError):
        compat.NeuralNetMLP(4.5, 3, 2)


def _both(rng, num_classes, n=300, f=6, h=4, epochs=2, lr=0.1, poison=False):
    """(ours, notebook's) curves, weights, printed lines and global RNG state after the same run.

    The notebook evaluates with its default ``num_labels=10``; compat passes the model's own class count
    (the same for MNIST), so the oracle here does too.
    """
    X = rng.normal(size=(n, f))
    y = rng.integers(0, num_classes, size=n)
    out = []
    for mod in (compat, notebook):
        m = mod.NeuralNetMLP(f, h, num_classes, random_seed=3)
        if poison:
            m.weight_out[0, 0] = np.nan  # a diverged model
        np.random.seed(5)
        buf = io.StringIO()
        with redirect_stdout(buf):
            curves = mod.train(m, X, y, X[:100], y[:100], num_epochs=epochs, learning_rate=lr)
        out.append((curves, [m.weight_h, m.bias_h, m.weight_out, m.bias_out], buf.getvalue(),
                    np.random.get_state()[1].copy()))  # fmt: skip
    return out


@pytest.fixture
def notebook_own_labels(monkeypatch):
    evaluate = notebook.compute_mse_and_acc

    def own(nnet, X, y, num_labels=10, minibatch_size=100):
        return evaluate(nnet, X, y, num_labels=nnet.num_classes, minibatch_size=minibatch_size)

    monkeypatch.setattr(notebook, "compute_mse_and_acc", own)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("num_classes", [1, 2, 4])
def test_compat_train_matches_notebook_for_any_class_count(rng, monkeypatch, notebook_own_labels, backend, num_classes):
    """One class (a single output unit whose one-hot target is 1), two and more: the notebook's numbers."""
    monkeypatch.setattr(compat, "backend", backend)
    (c_ours, w_ours, p_ours, s_ours), (c_ref, w_ref, p_ref, s_ref) = _both(rng, num_classes)
    np.testing.assert_array_equal(s_ours, s_ref)
    for a, b in zip(w_ours, w_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_ours[0], c_ref[0], rtol=1e-10)
    assert c_ours[1:] == c_ref[1:] and p_ours == p_ref


def test_compat_diverged_model_propagates_nan_like_the_notebook(rng, notebook_own_labels):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (c_ours, w_ours, p_ours, s_ours), (c_ref, w_ref, p_ref, s_ref) = _both(rng, 3, poison=True)
    np.testing.assert_array_equal(s_ours, s_ref)
    for a, b in zip(w_ours, w_ref, strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)  # NaN == NaN here
    assert p_ours == p_ref and np.isnan(c_ours[0]).all()


def test_compat_prepares_once_per_train_call_and_uses_the_fit_context(rng, monkeypatch):
    """The data are validated once per train call; every epoch is one prepared epoch over the full
    minibatches of the shuffled order (the partial last one dropped), inside the backend's fit context."""
    from contextlib import contextmanager

    from fastmlp.backends import Backend, PreparedEpochs

    be = fastmlp_backend = compat.get_backend(compat.backend)
    prepares, orders, contexts = [], [], []
    real_prepare, real_call = Backend.prepare, PreparedEpochs.__call__

    def prepare(self, X, Y, plan, **kw):
        prepares.append(plan)
        return real_prepare(self, X, Y, plan, **kw)

    def call(self, order, params, state, lrs, step0=0):
        orders.append(np.array(order))
        assert state is None and step0 == 0
        return real_call(self, order, params, state, lrs, step0)

    @contextmanager
    def fit_context(sizes, batch_size):
        contexts.append((list(sizes), batch_size))
        yield False

    monkeypatch.setattr(Backend, "prepare", prepare)
    monkeypatch.setattr(PreparedEpochs, "__call__", call)
    monkeypatch.setattr(be.raw, "fit_context", fit_context, raising=False)
    X = rng.normal(size=(250, 5))
    y = rng.integers(0, 3, size=250)
    m = compat.NeuralNetMLP(5, 4, 3)
    np.random.seed(0)
    with redirect_stdout(io.StringIO()):
        compat.train(m, X, y, X[:100], y[:100], num_epochs=3)
    assert len(prepares) == 1 and contexts == [([5, 4, 3], 100)]
    plan = prepares[0]
    assert (plan.sizes, plan.hidden, plan.output, plan.loss, plan.optimizer, plan.batch_size, plan.has_dropout) == (
        (5, 4, 3), "sigmoid", "sigmoid", "mse", "sgd", 100, False)
    assert plan.l2 == plan.l1 == plan.alpha == 0.0 and plan.target == "labels" and plan.dtype == "float64"
    assert [len(o) for o in orders] == [200, 200, 200] and all(len(set(o.tolist())) == 200 for o in orders)
    assert fastmlp_backend is be


def _caller_module(source: str):
    """A module of its own (as a notebook's namespace is) whose code calls compat.train."""
    import types

    mod = types.ModuleType("a_notebook")
    exec(source, mod.__dict__)
    return mod


def test_train_reads_minibatch_size_from_the_calling_module_first(rng, monkeypatch, notebook_own_labels):
    """The notebook's train reads the notebook's global minibatch_size: after the one changed import, a
    `minibatch_size = 10` cell changes the batch size of fastmlp.compat.train too (weights as the notebook's
    loop at batch 10); without such a global, fastmlp.compat.minibatch_size is used."""
    X = rng.normal(size=(250, 6))
    y = rng.integers(0, 3, size=250)
    monkeypatch.setattr(notebook, "minibatch_size", 10)
    ref = notebook.NeuralNetMLP(6, 4, 3, random_seed=3)
    np.random.seed(5)
    with redirect_stdout(io.StringIO()):
        notebook.train(ref, X, y, X[:100], y[:100], num_epochs=2, learning_rate=0.1)
    nb = _caller_module("from fastmlp.compat import NeuralNetMLP, train\n"
                        "minibatch_size = 10\n"
                        "def run(X, y):\n"
                        "    model = NeuralNetMLP(6, 4, 3, random_seed=3)\n"
                        "    train(model, X, y, X[:100], y[:100], num_epochs=2, learning_rate=0.1)\n"
                        "    return model\n")  # fmt: skip
    np.random.seed(5)
    with redirect_stdout(io.StringIO()):
        ours = nb.run(X, y)
    for name in ("weight_h", "bias_h", "weight_out", "bias_out"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=0, atol=1e-12)
    # the same call at compat's default batch of 100 trains other weights
    nb100 = _caller_module("from fastmlp.compat import NeuralNetMLP, train\n"
                           "def run(X, y):\n"
                           "    model = NeuralNetMLP(6, 4, 3, random_seed=3)\n"
                           "    train(model, X, y, X[:100], y[:100], num_epochs=2, learning_rate=0.1)\n"
                           "    return model\n")  # fmt: skip
    np.random.seed(5)
    with redirect_stdout(io.StringIO()):
        default = nb100.run(X, y)
    assert np.abs(default.weight_h - ref.weight_h).max() > 1e-3
    # no global in the caller: fastmlp.compat.minibatch_size decides
    monkeypatch.setattr(compat, "minibatch_size", 10)
    np.random.seed(5)
    with redirect_stdout(io.StringIO()):
        via_module = nb100.run(X, y)
    np.testing.assert_allclose(via_module.weight_h, ref.weight_h, rtol=0, atol=1e-12)
    nb.minibatch_size = 0
    with pytest.raises(ValueError, match=r"minibatch_size \(a global of the calling module\) must be >= 1"):
        nb.run(X, y)
