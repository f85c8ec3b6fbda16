"""Every Python block of the README runs as written (with small data where the README loads MNIST).

Each block runs as a script of its own in a scratch directory, so ``if __name__ == "__main__"`` blocks (worker
processes) behave as they do for a reader.  ``load_mnist`` is replaced by a small subset (3,000 training and
500 test rows of the real MNIST when it is here, else random 28x28 images) so that the blocks stay fast.  A
block preceded by ``<!-- readme-test: skip (reason) -->`` is skipped with that reason (a cluster it needs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import mnist_dir, subprocess_env

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every fenced ``python`` block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = SKIP.search(before)
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", m.group("reason") if m else None))
            i = j
        i += 1
    return blocks


PRELUDE = textwrap.dedent(
    """
    # test_readme.py: small data instead of the full MNIST download
    import numpy as _np
    import fastmlp.datasets as _datasets

    def _small_mnist(path=None, download=True):
        src = {src!r}
        if src:
            X, y, Xt, yt = _datasets._load_mnist_files(src)
            return X[:3000], y[:3000], Xt[:500], yt[:500]
        rng = _np.random.default_rng(0)
        y, yt = rng.integers(0, 10, 3000), rng.integers(0, 10, 500)
        proto = rng.integers(0, 256, (10, 784))
        noisy = lambda lab: _np.clip(proto[lab] + rng.normal(0, 40, (lab.size, 784)), 0, 255).astype(_np.uint8)
        return noisy(y), y, noisy(yt), yt

    _datasets._load_mnist_files = _datasets.load_mnist
    _datasets.load_mnist = _small_mnist
    """
)

BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_the_extractor_finds_them():
    assert len(BLOCKS) >= 4
    assert any("fastmlp.Network(" in code for _, code, _ in BLOCKS)
    sample = "x\n<!-- readme-test: skip (no cluster) -->\n```python\nprint(1)\n```\n```python\nprint(2)\n```\n"
    assert python_blocks(sample) == [(4, "print(1)\n", "no cluster"), (7, "print(2)\n", None)]


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    if "plot_history" in code or ".plot(" in code:
        pytest.importorskip("matplotlib")
    src = mnist_dir()
    script = tmp_path / f"readme_{line}.py"
    script.write_text(PRELUDE.replace("{src!r}", repr(str(src) if src else "")) + code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, f"README.md:{line} failed:\n{r.stderr[-3000:]}"
