"""Shared fixtures: real MNIST (skipped with a reason when absent) and the backend list."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fastmlp
from fastmlp.datasets import MNIST_FILES

HERE = Path(__file__).resolve().parent


def mnist_dir() -> Path | None:
    """``$FASTMLP_DATA``, else ``../shared/data/mnist`` beside the project, if it holds the four files."""
    cands = []
    if os.environ.get("FASTMLP_DATA"):
        cands.append(Path(os.environ["FASTMLP_DATA"]))
    cands.append(HERE.parent.parent / "shared" / "data" / "mnist")
    for c in cands:
        if all((c / f).is_file() for f in MNIST_FILES):
            return c
    return None


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not found: set FASTMLP_DATA to a directory with the four IDX .gz files "
                    "(or place them in ../shared/data/mnist)")  # fmt: skip
    return path


@pytest.fixture(scope="session")
def mnist(mnist_path):
    from fastmlp.datasets import load_mnist

    return load_mnist(mnist_path, download=False)


@pytest.fixture(scope="session")
def mnist_notebook(mnist):
    """The notebook's 55,000 / 5,000 / 10,000 float64 split."""
    from fastmlp.datasets import notebook_split

    return notebook_split(*mnist)


COMPILED = [b for b in fastmlp.available_backends() if b != "numpy"]
ALL_BACKENDS = fastmlp.available_backends()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports the same fastmlp this test process imported.

    In CI the package is pip-installed and the checkout's source tree has no compiled modules, so the
    child must not pick the checkout up from its working directory: run it with ``cwd`` elsewhere.
    """
    pkg_parent = str(Path(fastmlp.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env
