"""The fastmlp command, driven as a subprocess the way a user runs it."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, tmp_path, env=None, timeout=600):
    """Run ``python -m fastmlp ARGS`` from a scratch directory (so the installed package is imported)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastmlp", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _write_idx_dir(d, rng, n_train=400, n_test=100, side=6, n_classes=3):
    d.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, n_classes, n).astype(np.uint8)
        X = (rng.random((n, side, side)) * 60).astype(np.uint8)
        X[np.arange(n), y, :] = 250  # class k lights up row k: learnable
        img = struct.pack(">iiii", 2051, n, side, side) + X.tobytes()
        lab = struct.pack(">ii", 2049, n) + y.tobytes()
        (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
        (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab))


def test_help_on_every_subcommand(tmp_path):
    for sub in ([], ["train"], ["lr-find"], ["predict"], ["bench"], ["info"]):
        r = run([*sub, "--help"], tmp_path)
        assert r.returncode == 0 and "usage: fastmlp" in r.stdout


def test_train_and_predict_on_synthetic_idx(tmp_path, rng):
    _write_idx_dir(tmp_path / "idx", rng)
    r = run(["train", "--data", "idx", "--hidden", "16", "--epochs", "8", "--lr", "2", "--valid", "50",
             "--out", "m.npz", "--quiet"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    acc = float(r.stdout.split("Test accuracy: ")[1].split("%")[0])
    assert acc > 90
    assert "samples/s" in r.stdout and (tmp_path / "m.npz").exists()
    r = run(["predict", "--model", "m.npz", "--data", "idx"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"Test accuracy: {acc:.2f}%" in r.stdout
    assert "Confusion matrix" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.strip() and line.split()[0] in {"0", "1", "2"}]
    assert sum(int(v) for line in rows for v in line.split()[1:]) == 100


def test_digits_fallback_when_mnist_unreachable(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {"FASTMLP_DATA": str(tmp_path / "empty"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "FASTMLP_MNIST_MIRRORS": "http://127.0.0.1:9/"}  # fmt: skip
    r = run(["train", "--epochs", "2", "--hidden", "20", "--lr", "1"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "MNIST unavailable" in line]
    assert len(notes) == 1 and "digits" in notes[0]
    assert "Test accuracy:" in r.stdout and "Epoch: 002/002" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [(["train", "--data", "nowhere"], "no such directory"), (["train", "--backend", "gpu"], "unknown backend"),
     (["train", "--lr", "-0.1"], "--lr"), (["train", "--dropout", "1"], "--dropout"), (["train", "--epochs", "0"], "--epochs"),
     (["predict", "--model", "missing.npz", "--data", "digits"], "missing.npz"),
     (["predict", "--model", "bad.npz", "--data", "digits"], "bad.npz"),
     (["train", "--data", "corrupt"], "corrupt"), (["bench", "--configs", "xyz"], "--configs")],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(tmp_path, rng, args, needle):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    _write_idx_dir(tmp_path / "corrupt", rng)
    (tmp_path / "corrupt" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    r = run(args, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run(["train", "--data", "nowhere", "--debug"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_info(tmp_path):
    r = run(["info"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Backends" in r.stdout and "numpy" in r.stdout and "MNIST is looked for in" in r.stdout
    assert "Threads: compiled epochs use up to" in r.stdout
    r = run(["info"], tmp_path, env={"FASTMLP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "use up to 1 of the" in r.stdout and "$FASTMLP_NUM_THREADS=1" in r.stdout
    r = run(["info"], tmp_path, env={"FASTMLP_NUM_THREADS": "many"})
    assert r.returncode == 2 and "FASTMLP_NUM_THREADS" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.mnist
def test_train_on_real_mnist(tmp_path, mnist_path):
    r = run(["train", "--data", str(mnist_path), "--epochs", "3", "--plot", "trace.png", "--out", "mnist.npz"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("Epoch: 003/003") for line in lines)
    acc = float(r.stdout.split("Test accuracy: ")[1].split("%")[0])
    assert acc > 85  # 784-50-10 sigmoid/MSE after 3 epochs at lr 0.1 on [-1, 1] pixels: the notebook has 87-88 %
    assert (tmp_path / "trace.png").read_bytes()[:8] == PNG_MAGIC


def test_lr_find_prints_suggestion_and_writes_plot(tmp_path, rng):
    _write_idx_dir(tmp_path / "idx", rng)
    r = run(["lr-find", "--data", "idx", "--hidden", "16", "--activation", "relu", "--loss", "ce", "--num-iter", "60",
             "--batch-size", "20", "--plot", "lr.png"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("Suggested learning rate:"))
    suggestion = float(line.split(":")[1].split()[0])
    assert 1e-5 <= suggestion <= 10
    assert (tmp_path / "lr.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("schedule", ["linear", "step", "exp", "cosine", "plateau"])
def test_train_with_each_schedule(tmp_path, rng, schedule):
    _write_idx_dir(tmp_path / "idx", rng)
    r = run(["train", "--data", "idx", "--hidden", "8", "--epochs", "3", "--lr", "1", "--valid", "50",
             "--schedule", schedule, "--l2", "1e-4", "--dropout", "0.2", "--patience", "5"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Epoch: 003/003" in r.stdout and "Test accuracy:" in r.stdout


@pytest.mark.parametrize("optimizer,lr", [("adam", "0.01"), ("nesterov", "0.5")])
def test_train_with_an_optimizer_saves_its_state(tmp_path, rng, optimizer, lr):
    """--optimizer reaches the fit; the saved model keeps the optimizer's state for a later fit."""
    from fastmlp import Network

    _write_idx_dir(tmp_path / "idx", rng)
    r = run(["train", "--data", "idx", "--hidden", "16", "--activation", "relu", "--loss", "ce", "--init", "he",
             "--epochs", "6", "--lr", lr, "--optimizer", optimizer, "--valid", "50", "--out", "m.npz", "--quiet"],
            tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("Test accuracy: ")[1].split("%")[0]) > 90
    net = Network.load(tmp_path / "m.npz", backend="numpy")
    assert net.output == "softmax" and net.init == "he" and net.epochs_ == 6
    assert net.optimizer_state_.kind == optimizer and net.optimizer_state_.t == 6 * 4  # 350 rows, batch 100
    r = run(["train", "--data", "idx", "--optimizer", "rmsprop"], tmp_path)
    assert r.returncode == 2 and "--optimizer" in r.stderr


def test_predict_refuses_a_regression_model(tmp_path):
    from fastmlp import Network

    Network([64, 1], loss="squared_error", seed=0).save(tmp_path / "reg.npz")
    r = run(["predict", "--model", "reg.npz", "--data", "digits"], tmp_path)
    assert r.returncode == 2 and "regression network" in r.stderr and "Traceback" not in r.stderr
