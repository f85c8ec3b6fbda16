"""Checkpoints: an interrupted, resumed fit ends with the same weights as an uninterrupted one."""

import json
import os
import pickle
import signal
import zipfile

import numpy as np
import pytest
from conftest import ALL_BACKENDS

from fastmlp import Callback, EarlyStopping, Network
from fastmlp.schedules import ReduceLROnPlateau


class InterruptAt(Callback):
    """Presses Ctrl-C (a real SIGINT to this process) at the end of a given epoch.

    The fit defers a Ctrl-C that arrives while it commits an epoch until the commit is done, so the
    interrupted run keeps that epoch.
    """

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, net, history):
        if history.epoch[-1] == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)
        return False


def _meta(path):
    """The JSON metadata of a checkpoint (an .npz without pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z["meta"].tobytes())


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
    saved = []

    class Spy(Callback):  # the checkpoint's epochs_done after each epoch
        def on_epoch_end(self, net, history):
            saved.append(_meta(ck)["epochs_done"] if ck.exists() else None)
            return False

    net.fit(X, y, epochs=5, checkpoint=ck, checkpoint_every=2, callbacks=[Spy()], verbose=False)
    assert zipfile.is_zipfile(ck) and _meta(ck)["epochs_done"] == 5  # the last epoch is always written
    assert saved == [None, None, 2, 2, 4]  # the spy runs before the epoch's own write
    with pytest.raises(ValueError, match=r"different run \(batch_size: checkpoint 100, this run 10"):
        Network([10, 4, 3], backend="numpy", seed=1).fit(X, y, epochs=5, batch_size=10, checkpoint=ck, resume=True,
                                                         callbacks=[Spy()], verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"different run.*data: checkpoint"):
        Network([10, 4, 3], backend="numpy", seed=1).fit(X + 1, y, epochs=5, checkpoint=ck, resume=True,
                                                         callbacks=[Spy()], verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"different run.*lr: checkpoint"):
        Network([10, 4, 3], backend="numpy", seed=1).fit(X, y, epochs=5, lr=0.2, checkpoint=ck, resume=True,
                                                         callbacks=[Spy()], verbose=False)  # fmt: skip
    # an edited file is refused by its checksum
    with np.load(ck, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["W0"] = arrays["W0"] + 1.0
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(ValueError, match="checksum"):
        Network([10, 4, 3], backend="numpy", seed=1).fit(X, y, epochs=5, checkpoint=tmp_path / "edited.npz",
                                                         resume=True, callbacks=[Spy()], verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs checkpoint"):
        net.fit(X, y, epochs=1, resume=True, verbose=False)
    ck.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable fastmlp checkpoint"):
        net.fit(X, y, epochs=5, checkpoint=ck, resume=True, verbose=False)
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


def test_resume_carries_optimizer_state_and_early_stopping(tmp_path):
    """Adam's moments and step count and the early-stopping callback's count, best value and best weights
    come back from the checkpoint: the resumed run ends as the uninterrupted one, best epoch included."""
    X, y = _data()
    Xv, yv = _data(90)
    kw = dict(epochs=8, batch_size=40, lr=0.02, optimizer="adam", seed=5, X_valid=Xv, y_valid=yv, verbose=False)

    def run(path, stop_at, resume=False):
        net = Network([10, 8, 3], activation="relu", loss="ce", backend="numpy", seed=2)
        es = EarlyStopping(patience=3, monitor="valid_acc")
        hist = net.fit(X, y, checkpoint=path, resume=resume, callbacks=[InterruptAt(stop_at)], early_stopping=es, **kw)
        return net, hist

    full, hf = run(tmp_path / "full.ckpt", 99)
    _, h1 = run(tmp_path / "part.ckpt", 4)
    assert h1.interrupted and len(h1) == 4
    meta = _meta(tmp_path / "part.ckpt")
    assert meta["optimizer"]["kind"] == "adam" and meta["optimizer"]["t"] == 4 * 6 and meta["epochs_done"] == 4
    back, h2 = run(tmp_path / "part.ckpt", 99, resume=True)
    assert h2.epoch == hf.epoch and h2.best_epoch == hf.best_epoch and h2.stopped_epoch == hf.stopped_epoch
    np.testing.assert_array_equal(h2.valid_acc, hf.valid_acc)
    for a, b in zip(full.weights + full.biases, back.weights + back.biases, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.optimizer_state_.t == full.optimizer_state_.t
    for a, b in zip(full.optimizer_state_.arrays(), back.optimizer_state_.arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
