"""The LR range test: sweep, smoothing, divergence stop, weight restore, the suggestion rules."""

import numpy as np
import pytest
from conftest import ALL_BACKENDS

import fastmlp
from fastmlp import LRFinderResult, Network, lr_find


def _blobs(rng, n=300, n_features=8, n_classes=3):
    centers = rng.normal(0, 2, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def _script(monkeypatch, net, losses):
    """Make the raw epoch return scripted minibatch losses (as sums over the batch), touching no weights."""
    it = iter(losses)
    calls = []

    def fake(X, Y, order, weights, biases, state, lrs, plan, step0, sample_weight):
        assert lrs.shape == (1,) and order.shape == (plan.batch_size,)  # one step of one minibatch per call
        calls.append(float(lrs[0]))
        return float(next(it)) * order.shape[0], 0.0, 0

    monkeypatch.setattr(net.backend.raw, "train_epoch", fake)
    return calls


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sweep_restores_weights_and_step_counter(backend, rng):
    X, y = _blobs(rng)
    net = Network([8, 10, 3], activation="tanh", output="softmax", loss="ce", backend=backend, seed=0)
    net.fit(X, y, epochs=1, verbose=False)
    before, step = net.get_params(), net.step_
    res = lr_find(net, X, y, start=1e-4, end=1e3, num_iter=60, batch_size=20, seed=1)
    for a, b in zip(net.weights + net.biases, before[0] + before[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert net.step_ == step
    lrs, losses = res  # unpacks as (lrs, smoothed losses)
    assert len(res) == lrs.size == losses.size == res.raw_losses.size
    np.testing.assert_allclose(lrs, 1e-4 * (1e7) ** (np.arange(lrs.size) / 59), rtol=1e-12)
    assert res.turned and res.suggestion == res.min_lr / 2 == lrs[np.argmin(losses)] / 2
    assert lrs[0] < res.steepest <= res.min_lr
    # the loss of the sweep's first batches is the network's loss on them: training did start from `before`
    assert res.raw_losses[0] == pytest.approx(net.evaluate(X, y)[0], rel=0.5)


@pytest.mark.filterwarnings("ignore:lr_find:RuntimeWarning")
def test_smoothing_is_bias_corrected_ema(rng, monkeypatch):
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    _script(monkeypatch, net, [0.7] * 10)
    res = lr_find(net, X, y, num_iter=10, batch_size=10)
    np.testing.assert_allclose(res.losses, 0.7, rtol=1e-14)  # a constant stays constant: no start-up bias
    raw = [1.0, 0.5, 0.8, 0.4, 0.2, 0.3]
    _script(monkeypatch, net, raw)
    res = lr_find(net, X, y, num_iter=6, smooth=0.9, batch_size=10, diverge=100)
    avg, expected = 0.0, []
    for i, v in enumerate(raw):
        avg = 0.9 * avg + 0.1 * v
        expected.append(avg / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(res.losses, expected, rtol=1e-13)
    np.testing.assert_array_equal(res.raw_losses, raw)


def test_stops_when_smoothed_loss_exceeds_diverge_times_best(rng, monkeypatch):
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    raw = [1.0, 0.8, 0.5, 0.4, 1.5, 1.55, 5.0, 9.0, 9.0, 9.0]
    calls = _script(monkeypatch, net, raw)
    res = lr_find(net, X, y, start=1e-3, end=1.0, num_iter=10, smooth=0.0, diverge=4.0, batch_size=10)
    assert res.diverged and len(res) == 7 and len(calls) == 7  # 5.0 > 4 × 0.4: stop after that step
    assert res.turned and res.min_lr == res.lrs[3] and res.suggestion == res.lrs[3] / 2
    _script(monkeypatch, net, [1.0, 0.8, 0.5, 0.4, 1.5, 1.59, 1.5, 1.2, 1.0, 0.9])
    res = lr_find(net, X, y, num_iter=10, smooth=0.0, batch_size=10)
    assert not res.diverged and len(res) == 10
    _script(monkeypatch, net, [1.0, float("nan")] + [1.0] * 8)
    res = lr_find(net, X, y, num_iter=10, smooth=0.0, batch_size=10)
    assert res.diverged and len(res) == 2 and res.min_lr == res.lrs[0]


def test_suggestion_and_steepest_on_a_known_curve(rng, monkeypatch):
    """loss(x = log10 lr) = 2 − tanh(3(x + 2)) + 3·max(0, x)²: steepest fall at lr = 0.01, minimum at lr = 1."""
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    x = np.linspace(-5, 1, 121)
    _script(monkeypatch, net, 2 - np.tanh(3 * (x + 2)) + 3 * np.maximum(0, x) ** 2)
    res = lr_find(net, X, y, start=1e-5, end=10, num_iter=121, smooth=0.0, batch_size=10)
    assert res.min_lr == pytest.approx(1.0, rel=1e-12)
    assert res.suggestion == pytest.approx(0.5, rel=1e-12)
    assert res.steepest == pytest.approx(0.01, rel=1e-12)
    assert res.turned and "suggestion=0.5" in repr(res)


def test_warns_when_the_loss_never_turns(rng):
    X, y = _blobs(rng)
    net = Network([8, 5, 3], backend="numpy", seed=0)
    with pytest.warns(RuntimeWarning, match="did not rise"):
        res = lr_find(net, X, y, start=1e-5, end=1e-3, num_iter=20, batch_size=30)
    assert not res.turned and not res.diverged


def test_real_divergence_is_caught_and_weights_restored(rng):
    X, y = _blobs(rng)
    X *= 100
    net = Network([8, 6, 3], activation="identity", output="identity", backend="numpy", seed=0)
    before = net.get_params()
    res = lr_find(net, X, y, start=1e-6, end=1e6, num_iter=100, batch_size=30, seed=0)
    assert res.diverged and len(res) < 100
    for a, b in zip(net.weights, before[0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [({"start": 0.0}, ValueError, "start"), ({"start": 1.0, "end": 0.5}, ValueError, "end"),
     ({"num_iter": 1}, ValueError, "num_iter"), ({"smooth": 1.0}, ValueError, "smooth"),
     ({"diverge": 1.0}, ValueError, "diverge"), ({"batch_size": 0}, ValueError, "batch_size"),
     ({"num_iter": 5.0}, TypeError, "num_iter")],
)  # fmt: skip
def test_rejects_bad_arguments(kwargs, exc, match, rng):
    X, y = _blobs(rng, n=20)
    with pytest.raises(exc, match=match):
        lr_find(Network([8, 3], backend="numpy", seed=0), X, y, **kwargs)


def test_optimizer_state_history_and_epochs_are_untouched(rng):
    """lr_find sweeps with plain SGD: the Adam state a fit left (its moments and step count), the history and
    the epoch count stay what they were, so a following fit continues exactly where the last one stopped."""
    X, y = _blobs(rng)
    net = Network([8, 6, 3], activation="tanh", output="softmax", loss="ce", backend="numpy", seed=0)
    hist = net.fit(X, y, epochs=2, optimizer="adam", lr=1e-2, verbose=False, seed=3)
    state = net.optimizer_state_
    moments, t, epochs = [a.copy() for a in state.arrays()], state.t, net.epochs_
    assert t > 0 and any(a.any() for a in moments)
    lr_find(net, X, y, start=1e-4, end=1e2, num_iter=30, batch_size=20, seed=1)
    assert net.optimizer_state_ is state and state.kind == "adam" and state.t == t
    for a, b in zip(state.arrays(), moments, strict=True):
        np.testing.assert_array_equal(a, b)
    assert net.history_ is hist and net.epochs_ == epochs
    # the continued fit is the one an lr_find never interrupted
    twin = Network([8, 6, 3], activation="tanh", output="softmax", loss="ce", backend="numpy", seed=0)
    twin.fit(X, y, epochs=2, optimizer="adam", lr=1e-2, verbose=False, seed=3)
    for a in (net, twin):
        a.fit(X, y, epochs=1, optimizer="adam", lr=1e-2, verbose=False, seed=4)
    for a, b in zip(net.weights + net.biases, twin.weights + twin.biases, strict=True):
        np.testing.assert_array_equal(a, b)


def test_data_validated_once_and_each_step_is_one_minibatch(rng, monkeypatch):
    """The sweep prepares its epochs once; every step is one minibatch at its own rate, the loss of that
    minibatch before the update, as a one-step fit computes it."""
    from fastmlp.backends import Backend

    X, y = _blobs(rng, n=60)
    prepared = []
    real_prepare = Backend.prepare

    def counting(self, *args, **kwargs):
        prepared.append(args[2])
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(Backend, "prepare", counting)
    net = Network([8, 5, 3], backend="numpy", seed=0)
    with pytest.warns(RuntimeWarning, match="did not rise"):  # full-batch GD up to lr = 1 keeps falling
        res = lr_find(net, X, y, start=1e-3, end=1.0, num_iter=12, batch_size=60, smooth=0.0, diverge=1e6, seed=0)
    assert len(prepared) == 1 and len(res) == 12
    plan = prepared[0]
    assert (plan.batch_size, plan.optimizer, plan.has_dropout, plan.l2, plan.l1, plan.alpha) == (60, "sgd", False, 0, 0, 0)
    # with one batch of all rows the sweep is full-batch GD at the swept rates: replay it step by step
    twin = Network([8, 5, 3], backend="numpy", seed=0)
    for lr, loss in zip(res.lrs, res.raw_losses, strict=True):
        assert loss == pytest.approx(twin.evaluate(X, y)[0], rel=1e-12)
        twin.fit(X, y, epochs=1, batch_size=None, lr=lr, shuffle=False, verbose=False)


def test_regression_network_with_dense_targets(rng):
    """A one-output identity/squared_error network takes 1-D float targets, as its fit does."""
    X = rng.normal(size=(200, 4))
    t = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=200)
    net = Network([4, 8, 1], activation="tanh", loss="squared_error", backend="numpy", seed=0)
    assert net.output == "identity"
    before = net.get_params()
    res = lr_find(net, X, t, start=1e-4, end=1e2, num_iter=60, batch_size=20, seed=0)
    assert res.diverged and res.turned and res.lrs[0] < res.min_lr < res.lrs[-1]
    assert res.raw_losses[0] == pytest.approx(net.evaluate(X, t)[0], rel=0.5)
    for a, b in zip(net.weights + net.biases, before[0] + before[1], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="target columns"):
        lr_find(net, X, np.zeros((200, 2)))


def test_exported():
    assert fastmlp.lr_find is lr_find and fastmlp.LRFinderResult is LRFinderResult


@pytest.mark.mnist
def test_suggestion_on_mnist_follows_the_lecture_rule(mnist):
    """784-50-10 on real MNIST with the lecture's sweep (1e-5 → 10, 100 steps of 100 rows): the loss falls,
    bottoms out and blows up; the suggestion is half the rate at the smoothed minimum, it lies inside the
    falling part of the curve, and training at it works while 10× the turning point does not."""
    X_train, y_train, _, _ = mnist
    X, y = X_train[:10000] / 255.0, y_train[:10000]
    Xv, yv = X_train[10000:15000] / 255.0, y_train[10000:15000]
    backend = fastmlp.available_backends()[0]
    net = Network([784, 50, 10], activation="relu", output="softmax", loss="ce", backend=backend, seed=123)
    res = lr_find(net, X, y, seed=0)
    lrs, losses = res
    i_min = int(np.argmin(losses))
    assert res.turned and i_min < len(res) - 1
    assert res.min_lr == lrs[i_min] and res.suggestion == lrs[i_min] / 2
    assert lrs[0] < res.suggestion < lrs[-1]
    # the suggestion lies where the smoothed loss is falling: below the flat start, above the minimum
    at = int(np.searchsorted(lrs, res.suggestion))
    assert losses[i_min] < losses[at] < 0.97 * losses[0]
    assert losses[i_min:].max() > 1.1 * losses[i_min]  # and the loss blows up after the minimum
    accs = {}
    for name, lr in (("suggestion", res.suggestion), ("10x turning point", 10 * res.min_lr)):
        trial = Network([784, 50, 10], activation="relu", output="softmax", loss="ce", backend=backend, seed=123)
        hist = trial.fit(X, y, epochs=1, lr=lr, X_valid=Xv, y_valid=yv, verbose=False, seed=0, on_divergence="stop")
        accs[name] = hist.valid_acc[-1] if hist.valid_acc else 0.0
    assert accs["suggestion"] > 0.85, (res, accs)
    assert accs["10x turning point"] < accs["suggestion"] - 0.2, (res, accs)
