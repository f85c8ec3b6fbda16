"""Shared pieces of the pytest-benchmark suites.

Run with ``pytest bench/ --benchmark-only``; ``FASTMLP_BENCH_ROWS`` shrinks the
epoch benchmarks (default 55,000 MNIST rows), ``FASTMLP_DATA`` points at MNIST
(else ``../shared/data/mnist``; synthetic data of MNIST's shape when absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fastmlp
from fastmlp.datasets import MNIST_FILES

BACKENDS = fastmlp.available_backends()
DTYPES = ["float32", "float64"]


def mnist_dir() -> str | None:
    cands = [os.environ.get("FASTMLP_DATA"), str(Path(__file__).resolve().parent.parent.parent / "shared/data/mnist")]
    for c in cands:
        if c and all((Path(c) / f).is_file() for f in MNIST_FILES):
            return c
    return None


def bench_rows() -> int:
    return int(os.environ.get("FASTMLP_BENCH_ROWS", "55000"))


@pytest.fixture(scope="session")
def mnist_rows():
    """``(X, y, source)``: the first rows of MNIST's training set scaled to [0, 1]."""
    from fastmlp.benchmark import load_data

    return load_data(bench_rows(), mnist_dir())
