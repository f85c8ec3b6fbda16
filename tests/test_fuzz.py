"""Runs the property-based fuzz suite (``tests/fuzz_cases.py``) in a child process.

A segfault or abort in a compiled kernel then shows up as a failed test with
the child's output instead of killing the test run.  The child imports the
same ``fastmlp`` as this process (``PYTHONPATH`` from ``fastmlp.__file__``) and
runs from a scratch directory, so that a pip-installed package is not
shadowed by the source checkout (which lacks the compiled modules in CI).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastmlp
from fastmlp.network import Network

HERE = Path(__file__).resolve().parent
#: the suite must execute at least this many generated cases
MIN_CASES = 5000


#: the outcome columns of the per-class table (tests/fuzz_cases.py OUTCOMES)
COLUMNS = ("cases", "crashes", "hangs", "wrong results", "unclear errors", "data lost")


def _table(stats: dict[str, dict[str, int]]) -> str:
    width = max(len("class"), *map(len, stats))
    lines = [f"{'class':<{width}} | " + " | ".join(COLUMNS)]
    for name, row in stats.items():
        lines.append(f"{name:<{width}} | " + " | ".join(f"{row.get(c, 0):>{len(c)}}" for c in COLUMNS))
    return "\n".join(lines)


def test_fuzz_suite_in_subprocess(tmp_path, capsys):
    pkg_parent = Path(fastmlp.__file__).resolve().parent.parent
    count_file = tmp_path / "fuzz_count.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg_parent), os.environ.get("PYTHONPATH")])),
           "FASTMLP_FUZZ_COUNT_FILE": str(count_file)}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", str(HERE / "fuzz_cases.py"), "-q", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning", "--hypothesis-show-statistics"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        current = Path(f"{count_file}.current")
        where = current.read_text() if current.exists() else "?"
        pytest.fail(f"the fuzz run hung (900 s) in the class {where!r}")
    seconds = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-8000:]
    stats_file = Path(f"{count_file}.json")
    if proc.returncode < 0:
        current = Path(f"{count_file}.current")
        where = current.read_text() if current.exists() else "?"
        with capsys.disabled():
            print(f"\n[fuzz] crashed in the class {where!r}")
        pytest.fail(f"the fuzz run crashed with {signal.Signals(-proc.returncode).name} in {where!r}:\n{tail}")
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    count = int(count_file.read_text()) if count_file.exists() else 0
    with capsys.disabled():  # shown in CI's output
        print(f"\n[fuzz] {count} cases in {seconds:.0f} s\n{_table(stats)}")
    assert proc.returncode == 0, f"fuzz cases failed (exit {proc.returncode}):\n{tail}"
    bad = {name: {c: n for c, n in row.items() if c != "cases" and n} for name, row in stats.items()}
    assert not any(bad.values()), f"fuzz failures by class: {bad}"
    assert count >= MIN_CASES, f"only {count} fuzz cases ran, expected at least {MIN_CASES}"
    for name in ("integer aliasing", "tampered parameters", "file limits", "interrupts"):
        assert stats.get(name, {}).get("cases", 0) > 0, f"no {name} cases ran"


def _zip_header_offsets(raw: bytes) -> list[int]:
    """Offsets of the general-purpose flag field of every local and central ZIP header."""
    local = [i + 6 for i in range(len(raw) - 4) if raw[i : i + 4] == b"PK\x03\x04"]
    central = [i + 8 for i in range(len(raw) - 4) if raw[i : i + 4] == b"PK\x01\x02"]
    return local + central


@pytest.mark.parametrize("field", ["method=99", "method=1", "flag=encrypted", "flag=strong-encryption"])
def test_load_corrupted_zip_header_fields_give_valueerror(tmp_path, field):
    """Deterministic corruptions the random byte flips of the fuzz suite rarely hit (about 1 flip in 120)."""
    path = Network([3, 4, 2], seed=1, backend="numpy").save(tmp_path / "m")
    raw = path.read_bytes()
    name, value = field.split("=")
    number = {"99": 99, "1": 1, "encrypted": 0x1, "strong-encryption": 0x40}[value]
    for off in _zip_header_offsets(raw):
        b = bytearray(raw)
        struct.pack_into("<H", b, off + (2 if name == "method" else 0), number)
        path.write_bytes(bytes(b))
        try:
            Network.load(path, backend="numpy")  # some header copies are not read: loading is then fine
        except ValueError:
            pass


# ------------------------------------------------------------------ regressions the fuzz classes found
def test_interrupt_in_a_commit_forgets_the_rolled_back_epoch_in_early_stopping(tmp_path):
    """A KeyboardInterrupt from a callback after EarlyStopping rolls the epoch back; EarlyStopping then
    restored (and checkpointed) that rolled-back epoch's weights as the best ones (class: interrupts)."""
    from fastmlp.callbacks import Callback, EarlyStopping

    class Raise(Callback):
        def on_epoch_end(self, net, history):
            if len(history.epoch) == 2:
                raise KeyboardInterrupt
            return False

    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (24, 4)), rng.integers(0, 3, 24)
    kw = dict(batch_size=5, X_valid=X, y_valid=y, verbose=False, warn=False)
    net = Network([4, 5, 3], backend="numpy", seed=1)
    with contextlib.redirect_stderr(io.StringIO()):
        hist = net.fit(X, y, epochs=3, callbacks=[EarlyStopping(patience=10), Raise()], checkpoint=tmp_path / "c.npz", **kw)
    whole = Network([4, 5, 3], backend="numpy", seed=1)
    whole.fit(X, y, epochs=1, callbacks=[EarlyStopping(patience=10)], **kw)
    assert net.epochs_ == 1 and hist.epoch == [1] and hist.interrupted
    for a, b in zip(net.weights + net.biases, whole.weights + whole.biases):
        np.testing.assert_array_equal(a, b)  # before: the weights of the rolled-back epoch 2
    with np.load(tmp_path / "c.npz") as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["epochs_done"] == 1 and meta["callbacks"][0]["state"]["best_epoch"] == 1  # before: 2


@pytest.mark.parametrize("kind", ["dir", "fifo", "devzero"])
def test_load_idx_of_a_path_that_is_not_a_file_is_a_valueerror(tmp_path, kind):
    """A directory, FIFO or device given as an IDX file: ValueError saying so (before: FileNotFoundError
    'IDX file not found' for a path that exists; class: file limits)."""
    from fastmlp.datasets import load_idx

    labels = tmp_path / "labels"
    labels.write_bytes(struct.pack(">II", 2049, 0))
    images = tmp_path / "images"
    if kind == "dir":
        images.mkdir()
    elif kind == "fifo":
        os.mkfifo(images)
    else:
        images.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        load_idx(images, labels)
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "missing", labels)


@pytest.mark.parametrize("backend", fastmlp.available_backends())
def test_sample_weight_viewing_a_bias_is_read_once(backend):
    """fit(sample_weight=net.biases[0]): the weights are the values at the call, not the bias as it trains
    (before: every epoch re-read the updated bias; class: integer aliasing)."""
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (4, 3)), np.array([0, 1, 1, 0])
    out = []
    for alias in (True, False):
        net = Network([3, 4, 2], backend=backend, seed=1)
        net.biases[0][:] = np.abs(net.biases[0]) + 0.1
        sw = net.biases[0] if alias else net.biases[0].copy()
        net.fit(X, y, epochs=3, batch_size=2, lr=0.3, seed=1, sample_weight=sw, verbose=False, warn=False)
        out.append(net.weights + net.biases)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
