"""The fastmlp command, driven as a subprocess the way a user runs it."""

from __future__ import annotations

import argparse
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
    for sub in ([], ["train"], ["lr-find"], ["predict"], ["bench"], ["info"], ["export"]):
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
    assert len(notes) == 1 and "digits" in notes[0] and "--data DIR" in notes[0] and "FASTMLP_DATA=DIR" in notes[0]
    assert "Test accuracy:" in r.stdout and "Epoch: 002/002" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [(["train", "--data", "nowhere"], "no such directory"), (["train", "--backend", "gpu"], "unknown backend"),
     (["train", "--lr", "-0.1"], "--lr"), (["train", "--dropout", "1"], "--dropout"), (["train", "--epochs", "0"], "--epochs"),
     (["predict", "--model", "missing.npz", "--data", "digits"], "missing.npz"),
     (["predict", "--model", "bad.npz", "--data", "digits"], "bad.npz"),
     (["train", "--data", "corrupt"], "corrupt"), (["bench", "--configs", "xyz"], "--configs"),
     (["bench", "--sections", "fit,gpu"], "--sections")],
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


# ---------------------------------------------------------------------------- predict rows, help, pipes, names
def test_predict_rows_from_npy_and_csv_to_a_predictions_file(tmp_path, rng):
    """predict --input rows --output file: one CSV row per input row with the label and the probabilities (as
    Network.predict_proba gives them); uint8 rows are scaled as train scaled the pixels; --mc-samples adds the
    means, standard deviations and entropy, and asks for --mc-dropout when the model has no dropout."""
    from fastmlp import Network
    from fastmlp.datasets import load_mnist

    _write_idx_dir(tmp_path / "idx", rng)
    r = run(["train", "--data", "idx", "--hidden", "16", "--epochs", "3", "--lr", "2", "--valid", "0", "--out", "m.npz",
             "--quiet"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, _, X_test, _ = load_mnist(tmp_path / "idx", download=False)
    rows = X_test[:7]
    np.save(tmp_path / "rows.npy", rows)
    np.savetxt(tmp_path / "rows.csv", rows, delimiter=",", fmt="%d", header=",".join(f"px{i}" for i in range(36)),
               comments="")  # fmt: skip
    net = Network.load(tmp_path / "m.npz", backend="numpy")
    expected = net.predict_proba(((rows / 255.0) - 0.5) * 2)
    for src in ("rows.npy", "rows.csv"):
        r = run(["predict", "--model", "m.npz", "--input", src, "--output", "p.csv"], tmp_path)
        assert r.returncode == 0, r.stderr
        assert "scaled to [-1, 1]" in r.stderr and "written to p.csv" in r.stderr
        lines = (tmp_path / "p.csv").read_text().splitlines()
        assert lines[0] == "label,p_0,p_1,p_2" and len(lines) == 8
        table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
        np.testing.assert_allclose(table[:, 1:], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(table[:, 0], expected.argmax(1))
    r = run(["predict", "--model", "m.npz", "--input", "rows.npy", "--mc-samples", "5"], tmp_path)
    assert r.returncode == 2 and "--mc-dropout RATE" in r.stderr and "trained without dropout" in r.stderr
    assert "dropout=" not in r.stderr  # no Python keyword advice on the command line
    r = run(["predict", "--model", "m.npz", "--input", "rows.npy", "--mc-samples", "5", "--mc-dropout", "0.3"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # no --output with --input: the CSV goes to stdout
    assert lines[0] == "label,mean_0,mean_1,mean_2,std_0,std_1,std_2,entropy" and len(lines) == 8
    table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    np.testing.assert_allclose(table[:, 1:4].sum(1), 1.0, atol=1e-5)
    assert (table[:, 4:7] > 0).any() and (table[:, 7] >= 0).all()
    np.save(tmp_path / "wide.npy", np.zeros((2, 5)))
    r = run(["predict", "--model", "m.npz", "--input", "wide.npy"], tmp_path)
    assert r.returncode == 2 and "expects 36 features" in r.stderr
    np.save(tmp_path / "one.npy", np.zeros(36))
    r = run(["predict", "--model", "m.npz", "--input", "one.npy"], tmp_path)
    assert r.returncode == 2 and "reshape(1, -1)" in r.stderr


def test_every_option_says_what_it_does_and_its_default():
    from fastmlp.cli import _Formatter, build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) >= {"train", "lr-find", "predict", "bench", "info"}
    for name, sp in subs.items():
        text = sp.format_help()
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.option_strings)
            shown = _Formatter(name)._get_help_string(action)
            assert action.required or "default" in shown or "unset" in shown, (name, action.option_strings, shown)
        if name == "train":
            assert "learning rate (fastmlp lr-find suggests one) (default: 0.1)" in " ".join(text.split())
    lf = " ".join(subs["lr-find"].format_help().split())
    assert "(default: 1e-05)" in lf and "(default: lr_find.png)" in lf


def test_a_closed_pipe_ends_quietly_with_exit_0(tmp_path):
    """`fastmlp info | head -1`: the reader goes away; the command stops without a traceback or an error line."""
    proc = subprocess.Popen([sys.executable, "-m", "fastmlp", "info"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    proc.stdout.close()  # before anything is read: the first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
    r = subprocess.run(f"{sys.executable} -m fastmlp info | head -1", shell=True, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert r.stdout.startswith("fastmlp ") and r.stderr == ""


def test_plot_extra_checked_before_training(tmp_path, rng):
    """Without matplotlib, --plot fails at once (before the data are loaded), naming the extra to install."""
    _write_idx_dir(tmp_path / "idx", rng)
    (tmp_path / "nomatplotlib").mkdir()
    (tmp_path / "nomatplotlib" / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "nomatplotlib"), os.environ.get("PYTHONPATH", "")])}
    for args in (["train", "--epochs", "50", "--plot", "t.png"], ["lr-find"]):
        r = run([*args, "--data", "idx"], tmp_path, env=env)
        assert r.returncode == 2 and "needs matplotlib: pip install 'fastmlp[plot]'" in r.stderr, r.stderr
        assert "Epoch" not in r.stdout and "Data:" not in r.stdout
    r = run(["lr-find", "--data", "idx", "--no-plot", "--num-iter", "20", "--batch-size", "20"], tmp_path, env=env)
    assert r.returncode == 0 and "Suggested learning rate" in r.stdout, r.stderr


def test_dataset_names_come_from_the_files(tmp_path, rng, monkeypatch, capsys, mnist_path):
    """A directory of real MNIST is called MNIST, of Fashion-MNIST (its published digests) Fashion-MNIST, of
    anything else 'IDX files in DIR'."""
    from fastmlp import cli, datasets

    _write_idx_dir(tmp_path / "idx", rng)
    assert cli.load_data(str(tmp_path / "idx"))[0] == f"IDX files in {tmp_path / 'idx'}"
    assert cli.load_data(str(mnist_path))[0] == f"MNIST ({mnist_path})"
    files = datasets.find_mnist(tmp_path / "idx")
    fake = {str(p): datasets.KNOWN_MD5["Fashion-MNIST"][p.name] for p in files}
    real = datasets._digest
    monkeypatch.setattr(datasets, "_digest", lambda p, alg: fake.get(str(p), "") if alg == "md5" else real(p, alg))
    assert cli.load_data(str(tmp_path / "idx"))[0] == f"Fashion-MNIST ({tmp_path / 'idx'})"
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "idx"))
    assert cli.load_data("mnist")[0] == "Fashion-MNIST"


def test_export_writes_onnx_or_says_what_to_install(tmp_path):
    """`fastmlp export MODEL OUT.onnx` (fastmlp.onnx's command): an ONNX file where onnx is installed, else one
    line naming what to install, exit 2."""
    import importlib.util

    from fastmlp import Network

    Network([4, 3, 2], loss="ce", seed=0).save(tmp_path / "m.npz")
    r = run(["export", "m.npz", "m.onnx", "--no-check"], tmp_path)
    if importlib.util.find_spec("onnx") is None:
        assert r.returncode == 2 and "onnx" in r.stderr and "Traceback" not in r.stderr
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
    else:
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "m.onnx").stat().st_size > 100 and "Exported" in r.stdout
    r = run(["export", "missing.npz", "x.onnx"], tmp_path)
    assert r.returncode == 2 and "missing.npz" in r.stderr


def test_ctrl_c_during_training_saves_the_last_complete_epoch_and_exits_130(tmp_path):
    """SIGINT in the middle of ``train``: one line on stderr, the model of the last complete epoch saved
    (and loadable), exit code 130; no evaluation or plot after it, no traceback."""
    import signal
    import time

    from fastmlp import Network

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastmlp", "train", "--data", "digits", "--epochs", "100000",
                             "--hidden", "30", "--out", "m.npz", "--plot", "trace.png"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    deadline = time.monotonic() + 240
    while "Epoch: 003/" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "Epoch:" in seen, seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted after" in err, err
    assert "Test accuracy" not in out and not (tmp_path / "trace.png").exists()
    saved = [line for line in out.splitlines() if line.startswith("Model of epoch")]
    assert len(saved) == 1, out
    net = Network.load(tmp_path / "m.npz")
    assert net.epochs_ == int(saved[0].split()[3])


def test_an_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    """A bug of ours (any exception the CLI does not expect) prints one line pointing at --debug."""
    from fastmlp import cli

    def broken(args):
        raise RuntimeError("boom")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: RuntimeError: boom" in err[0] and "--debug" in err[0]
    with pytest.raises(RuntimeError):
        cli.main(["info", "--debug"])
