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
    """Make the kernel return scripted minibatch losses (as sums over the batch), touching no weights."""
    it = iter(losses)
    calls = []

    def fake(X, y, order, weights, biases, lrs, *args):
        calls.append(float(lrs[0]))
        return float(next(it)) * order.shape[0], 0

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
