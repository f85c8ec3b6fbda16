"""CSVLogger and ModelCheckpoint: what Keras users expect, written atomically with the umask's mode."""

import csv
import os

import numpy as np
import pytest

from fastmlp import Network
from fastmlp.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint


def _blobs(rng, n=120, n_features=6, n_classes=3):
    centers = rng.normal(0, 2, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def _net():
    return Network([6, 8, 3], activation="tanh", loss="ce", backend="numpy", seed=0)


def test_csv_logger_writes_every_epoch_with_keras_columns(tmp_path, rng, monkeypatch):
    from fastmlp import _io

    X, y = _blobs(rng)
    writes = []
    real = _io.atomic_write
    monkeypatch.setattr(_io, "atomic_write", lambda path, write: (writes.append(str(path)), real(path, write)))
    path = tmp_path / "log.csv"
    old = os.umask(0o022)
    try:
        hist = _net().fit(X, y, epochs=3, batch_size=20, lr=0.3, validation_split=0.25, verbose=0,
                          callbacks=[CSVLogger(path)])  # fmt: skip
    finally:
        os.umask(old)
    assert writes == [str(path)] * 3  # the whole file, atomically, after each epoch
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "loss", "train_data_loss", "accuracy", "val_loss", "val_accuracy", "val_score",
                             "learning_rate", "seconds"]  # fmt: skip
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_loss"]) for r in rows] == hist.valid_loss  # repr: floats round-trip exactly
    assert [float(r["accuracy"]) for r in rows] == hist.train_acc
    assert (path.stat().st_mode & 0o777) == 0o644
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_csv_logger_append_continues_a_file_and_refuses_other_columns(tmp_path, rng):
    X, y = _blobs(rng)
    path = tmp_path / "log.tsv"
    net = _net()
    net.fit(X, y, epochs=2, batch_size=20, verbose=0, callbacks=[CSVLogger(path, separator="\t")])
    net.fit(X, y, epochs=2, batch_size=20, verbose=0, callbacks=[CSVLogger(path, separator="\t", append=True)])
    lines = path.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["epoch", "1", "2", "3", "4"]
    net.fit(X, y, epochs=1, batch_size=20, verbose=0, callbacks=[CSVLogger(path, separator="\t")])
    assert [line.split("\t")[0] for line in path.read_text().splitlines()] == ["epoch", "5"]  # afresh by default
    with pytest.raises(ValueError, match="has the columns"):
        net.fit(X, y, epochs=1, batch_size=20, validation_split=0.2, verbose=0,
                callbacks=[CSVLogger(path, separator="\t", append=True)])  # fmt: skip
    with pytest.raises(ValueError, match=r"directory .* does not exist"):
        CSVLogger(tmp_path / "nowhere" / "log.csv")
    with pytest.raises(ValueError, match="separator"):
        CSVLogger(path, separator="ab")


def test_model_checkpoint_save_best_only_keeps_the_best_epoch(tmp_path, rng, capsys):
    """With save_best_only the file holds the weights of the epoch with the best validation loss; the file
    loads back (the .npz suffix added) and predicts as that epoch's network did."""
    X, y = _blobs(rng)
    Xv, yv = X[90:], y[90:]
    snapshots = {}

    class Keep(EarlyStopping):
        def on_epoch_end(self, net, history):
            snapshots[history.epoch[-1]] = net.get_params()
            return False

    ck = ModelCheckpoint(tmp_path / "best", monitor="val_loss", save_best_only=True, verbose=1)
    hist = _net().fit(X[:90], y[:90], epochs=12, batch_size=10, lr=2.0, X_valid=Xv, y_valid=yv, verbose=0,
                      callbacks=[ck, Keep(patience=100)])  # fmt: skip
    best = int(np.argmin(hist.valid_loss)) + 1
    assert ck.best_epoch == best and ck.best == min(hist.valid_loss) and ck.last_saved == tmp_path / "best.npz"
    back = Network.load(tmp_path / "best", backend="numpy")
    for a, b in zip(back.weights, snapshots[best][0], strict=True):
        np.testing.assert_array_equal(a, b)
    saves = [line for line in capsys.readouterr().out.splitlines() if "model saved to" in line]
    improving = [e for e in range(1, 13) if hist.valid_loss[e - 1] < min(hist.valid_loss[: e - 1], default=np.inf)]
    assert [int(line.split(":")[0].split()[1]) for line in saves] == improving and len(improving) < 12


def test_model_checkpoint_every_epoch_with_a_formatted_name(tmp_path, rng):
    X, y = _blobs(rng)
    ck = ModelCheckpoint(tmp_path / "m-{epoch:02d}-{val_accuracy:.2f}.npz")
    hist = _net().fit(X, y, epochs=3, batch_size=20, validation_split=0.25, verbose=0, callbacks=[ck])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"m-{e:02d}-{a:.2f}.npz" for e, a in zip(hist.epoch, hist.valid_acc, strict=True)]
    assert Network.load(tmp_path / names[-1]).epochs_ == 3


def test_model_checkpoint_rejects_what_it_cannot_do(tmp_path, rng):
    X, y = _blobs(rng)
    with pytest.raises(ValueError, match="monitor must be one of"):
        ModelCheckpoint(tmp_path / "m.npz", monitor="val_f1")
    with pytest.raises(ValueError, match="does not exist"):
        ModelCheckpoint(tmp_path / "no" / "m.npz")
    with pytest.raises(ValueError, match="cannot fill in"):
        ModelCheckpoint(tmp_path / "m-{step}.npz")
    with pytest.raises(ValueError, match=r"validation metrics need X_valid/y_valid"):
        _net().fit(X, y, epochs=1, verbose=0, callbacks=[ModelCheckpoint(tmp_path / "m.npz", save_best_only=True)])
    assert EarlyStopping(monitor="val_accuracy").monitor == "valid_acc"  # Keras's names work for EarlyStopping too
