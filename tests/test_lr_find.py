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
    assert res.turned and res.suggestion == res.turn_lr / 2 and res.min_lr <= res.turn_lr < res.divergence_lr
    assert lrs[0] < res.steepest <= res.min_lr
    # the loss of the sweep's first batches is the network's loss on them: training did start from `before`
    assert res.raw_losses[0] == pytest.approx(net.evaluate(X, y)[0], rel=0.5)


def test_smoothing_is_centred_in_log_lr_and_has_no_lag(rng, monkeypatch):
    """A centred Gaussian in log10(lr): a constant stays constant, a step is smoothed symmetrically about the
    step's rate (an exponential average would move it to the right), a straight line in log10(lr) is kept
    away from the ends, and the weights are the Gaussian's (checked against a direct sum)."""
    from fastmlp.lr_finder import smooth_losses

    lrs = 1e-5 * 1e6 ** (np.arange(121) / 120)  # 20 steps a decade
    np.testing.assert_allclose(smooth_losses(lrs, np.full(121, 0.7), 0.1), 0.7, rtol=1e-14)
    even = lrs[:120]  # 2.0 for the first 60 rates, 1.0 for the last 60: the step lies between rates 59 and 60
    s = smooth_losses(even, np.where(np.arange(120) < 60, 2.0, 1.0), 0.1)
    np.testing.assert_allclose(s + s[::-1], 3.0, rtol=1e-12)  # symmetric about the step: no lag
    assert s[59] > 1.5 > s[60] and s[30] == pytest.approx(2.0) and s[90] == pytest.approx(1.0)
    line = np.log10(lrs)
    np.testing.assert_allclose(smooth_losses(lrs, line, 0.1)[10:-10], line[10:-10], atol=1e-9)
    noisy = rng.normal(size=121)
    x = np.log10(lrs)
    w = np.exp(-0.5 * ((x[:, None] - x[None, :]) / 0.07) ** 2) * (np.abs(x[:, None] - x[None, :]) <= 0.28 + 1e-9)
    np.testing.assert_allclose(smooth_losses(lrs, noisy, 0.07), (w @ noisy) / w.sum(1), rtol=1e-12)
    np.testing.assert_array_equal(smooth_losses(lrs, noisy, 0.0), noisy)
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    _script(monkeypatch, net, [0.7] * 10)
    with pytest.warns(RuntimeWarning, match="did not turn up"):
        res = lr_find(net, X, y, num_iter=10, batch_size=10)
    np.testing.assert_array_equal(res.raw_losses, 0.7)
    np.testing.assert_allclose(res.losses, 0.7, rtol=1e-14)


def test_stops_when_the_running_median_exceeds_diverge_times_its_lowest(rng, monkeypatch):
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    raw = [1.0, 0.8, 0.5, 0.4, 0.4, 0.4, 5.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    calls = _script(monkeypatch, net, raw)
    res = lr_find(net, X, y, start=1e-3, end=1.0, num_iter=12, smooth=0.0, diverge=4.0, batch_size=10)
    # medians of 3: ... 0.4, 0.4 (lowest), then median(0.4, 5, 9) = 5 > 4 × 0.4 after step 8
    assert res.stopped_early and len(res) == 8 and len(calls) == 8
    assert res.turned and res.min_lr == res.lrs[3] and res.turn_lr == res.lrs[5] and res.divergence_lr == res.lrs[6]
    assert res.suggestion == res.lrs[5] / 2
    _script(monkeypatch, net, [1.0, float("nan")] + [1.0] * 8)
    res = lr_find(net, X, y, num_iter=10, smooth=0.0, batch_size=10)
    assert res.stopped_early and len(res) == 2 and res.turned and res.turn_lr == res.lrs[0]


def _curve(x):
    """A loss in x = log10(lr): flat at 2.3, falls from 1e-3 to 1e-1, a floor at 0.4 up to lr = 1, then a blow-up."""
    return 0.4 + 1.9 / (1 + np.exp(4 * (x + 2))) + 3 * np.maximum(0, x) ** 2


def test_the_lecture_rule_on_a_known_curve(rng, monkeypatch):
    """With no noise and no smoothing: the turn is the last rate within 30 % of the minimum before the loss
    doubles (log10 lr = sqrt(0.12/3) = 0.2), the divergence point where it doubles (sqrt(0.4/3) = 0.365), the
    suggestion half the turn, the steepest descent at lr = 0.01."""
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    x = np.linspace(-5, 1, 601)
    _script(monkeypatch, net, _curve(x))
    res = lr_find(net, X, y, num_iter=601, smooth=0.0, batch_size=10, diverge=100)
    assert res.turned and not res.stopped_early
    assert np.log10(res.turn_lr) == pytest.approx(0.2, abs=0.01)
    assert np.log10(res.divergence_lr) == pytest.approx(np.sqrt(0.4 / 3), abs=0.01)
    assert res.suggestion == res.turn_lr / 2 and res.steepest == pytest.approx(0.01, rel=0.03)
    assert "suggestion=0.79" in repr(res)


@pytest.mark.parametrize("num_iter", [100, 300, 1000])
def test_suggestion_is_robust_to_num_iter_and_noise(rng, monkeypatch, num_iter):
    """The same curve sampled at 100, 300 or 1000 rates with minibatch noise (20 % multiplicative): the
    suggestion of every run lies within 1.5x of the noiseless one (an exponential average of 0.98 moved it by
    two decades)."""
    X, y = _blobs(rng, n=50)
    net = Network([8, 3], backend="numpy", seed=0)
    x = np.linspace(-5, 1, num_iter)
    _script(monkeypatch, net, _curve(x))
    clean = lr_find(net, X, y, num_iter=num_iter, batch_size=10, diverge=100).suggestion
    for trial in range(5):
        _script(monkeypatch, net, _curve(x) * np.exp(0.2 * rng.normal(size=num_iter)))
        res = lr_find(net, X, y, num_iter=num_iter, batch_size=10, diverge=100)
        assert 1 / 2 <= res.suggestion / clean <= 2, (trial, res)
    assert 0.3 < clean < 0.8  # half of a turn at lr 1.6 (log10 0.2), slightly lowered by the smoothing


def test_a_loss_that_never_turns_gets_half_its_floor_and_a_warning(rng, monkeypatch):
    """A bounded loss that falls to a floor and stays there: no turn, so the suggestion is half the rate at
    which the loss came within 10 % of its descent below the chance level."""
    X, y = _blobs(rng, n=60, n_classes=3)
    net = Network([8, 3], backend="numpy", seed=0)
    x = np.linspace(-5, 1, 121)
    curve = 0.1 + 0.8 / (1 + np.exp(3 * (x + 1)))
    _script(monkeypatch, net, curve)
    with pytest.warns(RuntimeWarning, match="did not turn up"):
        res = lr_find(net, X, y, num_iter=121, smooth=0.0, batch_size=10)
    p = np.bincount(y, minlength=3) / len(y)
    assert res.chance == pytest.approx(np.mean(p * (1 - p)), rel=1e-12)  # MSE of predicting the class frequencies
    assert not res.turned and res.divergence_lr is None
    m = res.losses.min()
    level = m + 0.1 * (res.chance - m)
    assert res.losses[res.i_turn] <= level < res.losses[res.i_turn - 1] and res.suggestion == res.turn_lr / 2


def test_warns_when_the_sweep_ends_before_any_turn(rng):
    X, y = _blobs(rng)
    net = Network([8, 5, 3], backend="numpy", seed=0)
    with pytest.warns(RuntimeWarning, match="did not turn up"):
        res = lr_find(net, X, y, start=1e-5, end=1e-3, num_iter=20, batch_size=30)
    assert not res.turned and not res.stopped_early and not res.diverged


def test_real_divergence_is_caught_and_weights_restored(rng):
    X, y = _blobs(rng)
    X *= 100
    net = Network([8, 6, 3], activation="identity", output="identity", backend="numpy", seed=0)
    before = net.get_params()
    res = lr_find(net, X, y, start=1e-6, end=1e6, num_iter=100, batch_size=30, seed=0)
    assert res.stopped_early and res.diverged and len(res) < 100
    for a, b in zip(net.weights, before[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_sweeps_with_the_fits_optimizer(rng, monkeypatch):
    """optimizer='adam' sweeps with Adam (fresh state, every step an Adam step), leaving the network's own
    optimizer state alone; Adam's sensible rates are far below SGD's."""
    from fastmlp.backends import Backend

    X, y = _blobs(rng, n=400)
    X = X / 4 + rng.normal(size=X.shape)  # overlapping classes: the loss does not go to zero
    plans = []
    real = Backend.prepare
    monkeypatch.setattr(Backend, "prepare", lambda self, *a, **k: (plans.append(a[2]), real(self, *a, **k))[1])
    net = Network([8, 16, 3], activation="relu", loss="ce", backend="numpy", seed=0)
    adam = lr_find(net, X, y, num_iter=100, batch_size=20, optimizer="adam", seed=0)
    sgd = lr_find(net, X, y, num_iter=100, batch_size=20, seed=0)
    assert [p.optimizer for p in plans] == ["adam", "sgd"] and net.optimizer_state_ is None
    assert adam.turned and sgd.turned and adam.suggestion < sgd.suggestion / 5
    assert "Adam" in adam.params["optimizer"]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [({"start": 0.0}, ValueError, "start"), ({"start": 1.0, "end": 0.5}, ValueError, "end"),
     ({"num_iter": 1}, ValueError, "num_iter"), ({"smooth": 0.98}, ValueError, "smooth .the smoothing width"),
     ({"diverge": 2.0}, ValueError, "diverge"), ({"optimizer": "rmsprop"}, ValueError, "rmsprop"),
     ({"batch_size": 0}, ValueError, "batch_size"), ({"end": 1e308}, ValueError, "end must be at most 1e6"),
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
    with pytest.warns(RuntimeWarning, match="did not turn up"):  # full-batch GD up to lr = 1 keeps falling
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


MNIST_NETS = {
    "784-50-10 sigmoid/MSE": dict(layers=[784, 50, 10], activation="sigmoid", loss="mse"),
    "784-256-10 relu/softmax-CE": dict(layers=[784, 256, 10], activation="relu", loss="ce"),
    "784-256-256-10 tanh/softmax-CE": dict(layers=[784, 256, 256, 10], activation="tanh", loss="ce"),
}
GRID = (0.01, 0.03, 0.1, 0.3, 1, 3)


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize("name", list(MNIST_NETS))
def test_the_suggestion_trains_on_mnist_and_ignores_num_iter(mnist, name):
    """The issue's acceptance, on a 10,000-row training subset (pixels / 255, float32, the fastest compiled
    backend): 5 epochs at the suggestion of the lecture's sweep (1e-5 -> 10, 100 steps of 100 rows) reach at
    least 90 % of the best test accuracy over the grid {0.01, 0.03, 0.1, 0.3, 1, 3}, and the suggestion moves
    by at most 2x across num_iter in {100, 300, 1000}.  (docs/lr_finder.md has the full-data table.)"""
    X_train, y_train, X_test, y_test = mnist
    X, y = X_train[:10000].astype(np.float32) / 255, y_train[:10000]
    Xt = X_test.astype(np.float32) / 255
    cfg = MNIST_NETS[name]
    backend = fastmlp.available_backends()[0]

    def make():
        return Network(dtype="float32", backend=backend, seed=123, **cfg)

    def accuracy(lr):
        net = make()
        net.fit(X, y, epochs=5, lr=lr, batch_size=100, verbose=0, seed=0, on_divergence="stop", warn=False)
        return net.evaluate(Xt, y_test)[1]

    suggestions = {n: lr_find(make(), X, y, num_iter=n, seed=0, warn=False).suggestion for n in (100, 300, 1000)}
    assert max(suggestions.values()) / min(suggestions.values()) <= 2.0, suggestions
    at_suggestion = accuracy(suggestions[100])
    grid = {lr: accuracy(lr) for lr in GRID}
    best = max(grid.values())
    assert at_suggestion >= 0.9 * best, (name, suggestions, at_suggestion, grid)
    assert min(grid.values()) < 0.9 * best  # the grid does hold rates that train badly: the test can fail
