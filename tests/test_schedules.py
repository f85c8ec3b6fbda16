"""Learning-rate schedules: closed forms, PyTorch's documented values, plateau logic, fit integration."""

import math

import numpy as np
import pytest
from conftest import ALL_BACKENDS

import fastmlp
from fastmlp import Network
from fastmlp.history import History
from fastmlp.schedules import (
    Constant,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    ReduceLROnPlateau,
    Schedule,
    StepLR,
)


def _blobs(rng, n=120, n_features=6, n_classes=3):
    centers = rng.normal(0, 3, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def test_linear_lr_matches_pytorch_documented_values():
    # torch.optim.lr_scheduler.LinearLR docs: base lr 0.05, start_factor=0.5, total_iters=4
    s = LinearLR(0.05, start_factor=0.5, total_iters=4)
    expected = [0.025, 0.03125, 0.0375, 0.04375, 0.05, 0.05, 0.05]
    got = [float(s.epoch_lrs(e, 3)[0]) for e in range(7)]
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    for e in range(7):  # per-epoch stepping: every step of the epoch has the same rate
        np.testing.assert_allclose(s.epoch_lrs(e, 3), expected[e], rtol=1e-15, atol=0)


def test_linear_lr_defaults_and_decay():
    s = LinearLR(0.3)  # PyTorch defaults: start 1/3, end 1, 5 iterations
    np.testing.assert_allclose([s(t) for t in range(7)], [0.1, 0.14, 0.18, 0.22, 0.26, 0.3, 0.3], rtol=1e-14)
    d = LinearLR(1.0, start_factor=1.0, end_factor=0.0, total_iters=4)
    np.testing.assert_allclose([d(t) for t in range(6)], [1.0, 0.75, 0.5, 0.25, 0.0, 0.0], atol=1e-15)


@pytest.mark.parametrize(
    "sched,closed",
    [
        (Constant(0.2), lambda t: 0.2),
        (StepLR(0.1, step_size=3, gamma=0.5), lambda t: 0.1 * 0.5 ** (t // 3)),
        (ExponentialLR(0.4, gamma=0.9), lambda t: 0.4 * 0.9**t),
        (CosineAnnealingLR(0.1, T_max=10, eta_min=0.001),
         lambda t: 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * t / 10)) / 2),
        (LinearLR(0.6, start_factor=0.25, end_factor=0.75, total_iters=6),
         lambda t: 0.6 * (0.25 + 0.5 * min(t, 6) / 6)),
    ],
)  # fmt: skip
def test_schedules_match_closed_forms(sched, closed):
    ts = range(25)
    np.testing.assert_allclose([sched(t) for t in ts], [closed(t) for t in ts], rtol=1e-13, atol=1e-17)
    np.testing.assert_allclose(sched(np.arange(25)), [closed(t) for t in ts], rtol=1e-13, atol=1e-17)
    for e in (0, 4, 11):
        np.testing.assert_allclose(sched.epoch_lrs(e, 5), closed(e), rtol=1e-13, atol=1e-17)


def test_cosine_endpoints_and_step_lr_boundaries():
    c = CosineAnnealingLR(0.1, T_max=8, eta_min=0.01)
    assert c(0) == pytest.approx(0.1, rel=1e-15)
    assert c(4) == pytest.approx(0.055, rel=1e-14)
    assert c(8) == pytest.approx(0.01, rel=1e-14)
    s = StepLR(1.0, step_size=2, gamma=0.1)
    assert [s(t) for t in range(5)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01], rel=1e-14)


def test_per_step_advances_every_minibatch():
    s = StepLR(1.0, step_size=4, gamma=0.5, per_step=True)
    np.testing.assert_array_equal(s.epoch_lrs(0, 6), [1, 1, 1, 1, 0.5, 0.5])
    np.testing.assert_array_equal(s.epoch_lrs(1, 6), [0.5, 0.5, 0.25, 0.25, 0.25, 0.25])
    w = LinearLR(0.1, start_factor=0.5, total_iters=10, per_step=True)
    lrs = np.concatenate([w.epoch_lrs(e, 4) for e in range(4)])
    np.testing.assert_allclose(lrs, [0.1 * (0.5 + 0.5 * min(t, 10) / 10) for t in range(16)], rtol=1e-14)
    e = ExponentialLR(1.0, gamma=0.9)  # per epoch: one rate for the whole epoch
    np.testing.assert_array_equal(e.epoch_lrs(2, 3), [0.81, 0.81, 0.81])


@pytest.mark.parametrize(
    "factory,match",
    [(lambda: LinearLR(0.0), "lr"), (lambda: LinearLR(0.1, start_factor=0.0), "start_factor"),
     (lambda: LinearLR(0.1, end_factor=1.5), "end_factor"), (lambda: LinearLR(0.1, total_iters=0), "total_iters"),
     (lambda: StepLR(0.1, step_size=0), "step_size"), (lambda: StepLR(0.1, 2, gamma=0.0), "gamma"),
     (lambda: ExponentialLR(0.1, gamma=1.5), "gamma"), (lambda: CosineAnnealingLR(0.1, T_max=0), "T_max"),
     (lambda: CosineAnnealingLR(0.1, T_max=5, eta_min=0.2), "eta_min"),
     (lambda: ReduceLROnPlateau(0.1, factor=1.0), "factor"), (lambda: ReduceLROnPlateau(0.1, patience=-1), "patience"),
     (lambda: ReduceLROnPlateau(0.1, monitor="loss"), "monitor"),
     (lambda: ReduceLROnPlateau(0.1, threshold_mode="x"), "threshold_mode"), (lambda: Constant(float("nan")), "lr")],
)  # fmt: skip
def test_schedules_validate_inputs(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_types_and_times():
    with pytest.raises(TypeError, match="step_size"):
        StepLR(0.1, step_size=2.5)
    with pytest.raises(TypeError, match="per_step"):
        Constant(0.1, per_step="yes")
    with pytest.raises(ValueError, match="non-negative"):
        Constant(0.1)(-1)
    with pytest.raises(ValueError, match="epoch"):
        Constant(0.1).epoch_lrs(-1, 3)


def test_reprs():
    assert repr(LinearLR(0.05, start_factor=0.5, total_iters=4)) == (
        "LinearLR(lr=0.05, start_factor=0.5, end_factor=1, total_iters=4, per_step=False)"
    )
    assert repr(StepLR(0.1, 3)) == "StepLR(lr=0.1, step_size=3, gamma=0.1, per_step=False)"
    assert repr(CosineAnnealingLR(0.1, 5, per_step=True)) == "CosineAnnealingLR(lr=0.1, T_max=5, eta_min=0, per_step=True)"
    assert repr(Constant(0.1)) == "Constant(lr=0.1, per_step=False)"
    assert repr(ExponentialLR(0.1, 0.5)) == "ExponentialLR(lr=0.1, gamma=0.5, per_step=False)"
    assert repr(ReduceLROnPlateau(0.1)).startswith("ReduceLROnPlateau(lr=0.1, factor=0.1, patience=10,")
    assert isinstance(LinearLR(0.1), Schedule)


def _feed(sched, values, monitor="valid_loss"):
    """Drive a plateau schedule with a scripted metric; return the rate used in each epoch."""
    h = History(valid_loss=[], valid_acc=[])
    sched.on_train_begin(h)
    used = []
    for e, v in enumerate(values, start=1):
        used.append(float(sched.epoch_lrs(e - 1, 2)[0]))
        h.epoch.append(e)
        getattr(h, monitor).append(v)
        sched.step_epoch(h)
    return used


def test_reduce_on_plateau_follows_pytorch_rules():
    # patience 2: the rate drops after the 3rd epoch in a row without improvement (num_bad_epochs > patience)
    s = ReduceLROnPlateau(1.0, factor=0.5, patience=2, threshold=0.0)
    used = _feed(s, [1.0, 0.9, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85, 0.85, 0.85])
    assert used == [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]
    assert s.reductions == [5, 9] and s.current_lr == 0.25
    # relative threshold: 0.9 -> 0.8999 is not a 1% improvement
    s = ReduceLROnPlateau(1.0, factor=0.1, patience=0, threshold=0.01)
    assert _feed(s, [1.0, 0.9, 0.8999, 0.85]) == pytest.approx([1, 1, 1, 0.1])
    # cooldown: bad epochs are not counted for 2 epochs after a reduction; min_lr floors the rate
    s = ReduceLROnPlateau(1.0, factor=0.1, patience=0, threshold=0.0, cooldown=2, min_lr=0.05)
    assert _feed(s, [1, 2, 2, 2, 2, 2, 2]) == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert s.reductions == [2, 5]


def test_reduce_on_plateau_maximizes_accuracy():
    s = ReduceLROnPlateau(1.0, factor=0.5, patience=1, threshold=0.0, monitor="valid_acc")
    assert _feed(s, [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7], monitor="valid_acc") == [1, 1, 1, 1, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fit_records_schedule_rates(backend, rng):
    X, y = _blobs(rng)
    net = Network([6, 5, 3], backend=backend, seed=0)
    sched = LinearLR(0.4, start_factor=0.25, total_iters=7, per_step=True)
    hist = net.fit(X, y, epochs=3, batch_size=40, lr=sched, verbose=False, seed=0)  # 3 steps an epoch
    expected = [0.4 * (0.25 + 0.75 * min(t, 7) / 7) for t in range(9)]
    np.testing.assert_allclose(hist.iteration_lr(), expected, rtol=1e-15)
    assert [a.shape for a in hist.step_lr] == [(3,)] * 3
    np.testing.assert_allclose(np.concatenate(hist.as_dict()["step_lr"]), expected, rtol=1e-15)
    np.testing.assert_allclose(hist.lr, np.mean(np.reshape(expected, (3, 3)), axis=1), rtol=1e-15)
    # the rates really reach the kernel: the same fit with the recorded rates given by hand is identical,
    # and a fit at a constant rate is not
    recorded = hist.iteration_lr()

    class ByHand:
        def epoch_lrs(self, epoch, n_steps):
            return recorded[3 * epoch : 3 * epoch + 3]

    twin = Network([6, 5, 3], backend=backend, seed=0)
    twin.fit(X, y, epochs=3, batch_size=40, lr=ByHand(), verbose=False, seed=0)
    for a, b in zip(net.weights, twin.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    plain = Network([6, 5, 3], backend=backend, seed=0)
    assert plain.fit(X, y, epochs=3, batch_size=40, lr=0.4, verbose=False, seed=0).step_lr == []
    assert not np.allclose(plain.weights[0], net.weights[0], rtol=1e-6, atol=0)


def test_fit_with_reduce_on_plateau_reacts_to_history(rng, monkeypatch):
    X, y = _blobs(rng)
    net = Network([6, 4, 3], backend="numpy", seed=0)
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.45, 0.46])
    monkeypatch.setattr(net, "_evaluate_checked", lambda X, Y, sample_weight, score: (next(losses), 0.5, 0.5))
    sched = ReduceLROnPlateau(0.2, factor=0.5, patience=1, threshold=0.0)
    hist = net.fit(X, y, epochs=7, lr=sched, X_valid=X, y_valid=y, verbose=False)
    assert hist.lr == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1])
    assert sched.reductions == [4, 7]
    with pytest.raises(ValueError, match="validation data"):
        net.fit(X, y, epochs=1, lr=ReduceLROnPlateau(0.1), verbose=False)


def test_schedules_are_exported():
    for name in ("Constant", "LinearLR", "StepLR", "ExponentialLR", "CosineAnnealingLR", "ReduceLROnPlateau"):
        assert getattr(fastmlp, name) is getattr(fastmlp.schedules, name)


def test_plateau_state_dict_round_trip_continues_identically():
    """What a checkpoint keeps of ReduceLROnPlateau: a copy fed the rest of the curve acts as the original."""
    curve = [1.0, 0.9, 0.95, 0.97, 0.96, 0.8, 0.85, 0.86, 0.87, 0.88]
    a = ReduceLROnPlateau(1.0, factor=0.5, patience=1, threshold=0.0, cooldown=1)
    h = History(valid_loss=[], valid_acc=[])
    a.on_train_begin(h)
    for e, v in enumerate(curve[:5], start=1):
        h.epoch.append(e)
        h.valid_loss.append(v)
        a.step_epoch(h)
    b = ReduceLROnPlateau(1.0, factor=0.5, patience=1, threshold=0.0, cooldown=1)
    b.on_train_begin(History(valid_loss=[], valid_acc=[]))
    b.load_state_dict(json_round_trip(a.state_dict()))
    assert (b.current_lr, b.reductions, b.best, b.num_bad_epochs) == (a.current_lr, a.reductions, a.best, a.num_bad_epochs)
    for e, v in enumerate(curve[5:], start=6):
        h.epoch.append(e)
        h.valid_loss.append(v)
        a.step_epoch(h)
        b.step_epoch(h)
        assert b.current_lr == a.current_lr
    assert b.reductions == a.reductions and len(a.reductions) >= 2
    assert StepLR(0.1, 2).state_dict() == {}


def json_round_trip(d):
    import json

    return json.loads(json.dumps(d))
