"""Whole-epoch benchmarks on real MNIST: every backend × dtype beside the classic NumPy loop.

Group per configuration: (a) 784-50-10 sigmoid/MSE batch 100,
(b) 784-256-256-10 sigmoid/MSE batch 256, (c) 784-1024-1024-10 relu/softmax-CE
batch 512.  The baseline row is the notebook's loop (float64).
"""

from __future__ import annotations

import pytest
from conftest import BACKENDS, DTYPES

from fastmlp.benchmark import CONFIGS, _classic_runner, _fastmlp_runner

ROUNDS = 3


@pytest.mark.parametrize("key", list(CONFIGS))
def test_epoch_classic_numpy_loop(benchmark, mnist_rows, key):
    X, y, _ = mnist_rows
    runner = _classic_runner(CONFIGS[key], X, y)
    benchmark.group = f"epoch {CONFIGS[key].label}"
    benchmark.extra_info["rows"] = len(X)
    benchmark.pedantic(runner.fn, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch(benchmark, mnist_rows, key, dtype, backend):
    X, y, _ = mnist_rows
    runner = _fastmlp_runner(backend, dtype, CONFIGS[key], X, y)
    benchmark.group = f"epoch {CONFIGS[key].label}"
    benchmark.extra_info["rows"] = len(X)
    benchmark.pedantic(runner.fn, rounds=ROUNDS, warmup_rounds=1)
