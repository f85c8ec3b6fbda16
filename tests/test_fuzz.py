"""Runs the property-based fuzz suite (``tests/fuzz_cases.py``) in a child process.

A segfault or abort in a compiled kernel then shows up as a failed test with
the child's output instead of killing the test run.  The child imports the
same ``fastmlp`` as this process (``PYTHONPATH`` from ``fastmlp.__file__``) and
runs from a scratch directory, so that a pip-installed package is not
shadowed by the source checkout (which lacks the compiled modules in CI).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import fastmlp
from fastmlp.network import Network

HERE = Path(__file__).resolve().parent
#: the suite must execute at least this many generated cases
MIN_CASES = 5000


def test_fuzz_suite_in_subprocess(tmp_path, capsys):
    pkg_parent = Path(fastmlp.__file__).resolve().parent.parent
    count_file = tmp_path / "fuzz_count.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg_parent), os.environ.get("PYTHONPATH")])),
           "FASTMLP_FUZZ_COUNT_FILE": str(count_file)}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", str(HERE / "fuzz_cases.py"), "-q", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning", "--hypothesis-show-statistics"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-8000:]
    if proc.returncode < 0:
        pytest.fail(f"the fuzz run crashed with {signal.Signals(-proc.returncode).name}:\n{tail}")
    assert proc.returncode == 0, f"fuzz cases failed (exit {proc.returncode}):\n{tail}"
    count = int(count_file.read_text())
    with capsys.disabled():  # shown in CI's output
        print(f"\n[fuzz] cases executed: {count} (crashes: 0)")
    assert count >= MIN_CASES, f"only {count} fuzz cases ran, expected at least {MIN_CASES}"


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
