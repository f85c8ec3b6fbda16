"""Checkpoints: an interrupted, resumed fit ends with the same weights as an uninterrupted one."""

import pickle

import numpy as np
import pytest
from conftest import ALL_BACKENDS

from fastmlp import Callback, EarlyStopping, Network
from fastmlp.schedules import ReduceLROnPlateau


class InterruptAt(Callback):
    """Simulates Ctrl-C at the end of a given epoch."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, net, history):
        if history.epoch[-1] == self.epoch:
            raise KeyboardInterrupt
        return False


def _data(n=240):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, size=(3, 10))
    y = rng.integers(0, 3, n)
    return centers[y] + rng.normal(size=(n, 10)), y


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_resume_gives_the_uninterrupted_weights(tmp_path, backend):
    X, y = _data()
    kw = dict(epochs=6, batch_size=32, seed=7, dropout=0.3, l2=1e-3, X_valid=X[:50], y_valid=y[:50], verbose=False)

    full = Network([10, 8, 3], backend=backend, seed=1)
    sched = ReduceLROnPlateau(0.5, patience=1)
    full.fit(X, y, lr=sched, checkpoint=tmp_path / "full.ckpt", callbacks=[InterruptAt(99)], **kw)

    part = Network([10, 8, 3], backend=backend, seed=1)
    ck = tmp_path / "part.ckpt"
    h1 = part.fit(X, y, lr=ReduceLROnPlateau(0.5, patience=1), checkpoint=ck, callbacks=[InterruptAt(3)], **kw)
    assert h1.interrupted and len(h1) == 3 and ck.exists()

    fresh = Network([10, 8, 3], backend=backend, seed=1)  # as in a new process
    h2 = fresh.fit(X, y, lr=ReduceLROnPlateau(0.5, patience=1), checkpoint=ck, resume=True,
                   callbacks=[InterruptAt(99)], **kw)  # fmt: skip
    assert len(h2) == 6 and h2.epoch == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full.weights + full.biases, fresh.weights + fresh.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fresh.step_ == full.step_
    np.testing.assert_array_equal(h2.lr, full.history_.lr)


def test_checkpoint_every_and_resume_errors(tmp_path):
    X, y = _data()
    net = Network([10, 4, 3], backend="numpy", seed=1)
    ck = tmp_path / "c.ckpt"
    net.fit(X, y, epochs=4, checkpoint=ck, checkpoint_every=2, verbose=False)
    with open(ck, "rb") as fh:
        assert pickle.load(fh)["epochs_done"] == 4
    with pytest.raises(ValueError, match="different run"):
        Network([10, 4, 3], backend="numpy", seed=1).fit(X, y, epochs=4, batch_size=10, checkpoint=ck, resume=True,
                                                         verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs checkpoint"):
        net.fit(X, y, epochs=1, resume=True, verbose=False)
    ck.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable fastmlp checkpoint"):
        net.fit(X, y, epochs=4, checkpoint=ck, resume=True, verbose=False)
    # a missing file starts afresh
    h = Network([10, 4, 3], backend="numpy", seed=1).fit(X, y, epochs=2, checkpoint=tmp_path / "new.ckpt",
                                                         resume=True, verbose=False)  # fmt: skip
    assert len(h) == 2 and (tmp_path / "new.ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_interrupt_keeps_best_weights_under_early_stopping(tmp_path):
    X, y = _data()
    net = Network([10, 8, 3], backend="numpy", seed=1)
    es = EarlyStopping(patience=50)
    h = net.fit(X, y, epochs=10, X_valid=X[:60], y_valid=y[:60], early_stopping=es, callbacks=[InterruptAt(5)],
                verbose=False)  # fmt: skip
    assert h.interrupted and h.restored_best
    best = h.best_epoch
    assert net.evaluate(X[:60], y[:60])[0] == pytest.approx(h.valid_loss[best - 1], rel=1e-12)


def test_network_pickles(tmp_path):
    X, y = _data()
    net = Network([10, 4, 3], seed=1)
    net.fit(X, y, epochs=1, verbose=False)
    net2 = pickle.loads(pickle.dumps(net))
    assert net2.backend.name == net.backend.name
    np.testing.assert_array_equal(net.predict_proba(X), net2.predict_proba(X))
