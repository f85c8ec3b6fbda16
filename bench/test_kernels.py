"""Kernel benchmarks: the three backends side by side in each group.

Groups are ``kernel shape``; each holds every backend × dtype, so a table
reads "NumPy time / our time" down a column.  JIT-compiled kernels are warmed
before timing; in-place kernels get fresh buffers every round.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, DTYPES

from fastmlp import get_backend
from fastmlp.backends.contract import ACT_CODES, LOSS_CODES, keep_threshold

# (batch, n_in, n_out): the layers of the three benchmark configurations
SHAPES = [(100, 784, 50), (100, 50, 10), (256, 784, 256), (512, 1024, 1024)]
SIG = ACT_CODES["sigmoid"]


def _arrays(shape, dtype, seed=0):
    n, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    A = rng.random((n, n_in)).astype(dtype)
    W = rng.normal(0, 0.1, (n_out, n_in)).astype(dtype)
    b = rng.normal(0, 0.1, n_out).astype(dtype)
    D = rng.normal(0, 0.01, (n, n_out)).astype(dtype)
    return A, W, b, D


def _ids(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend, dtype, shape):
    raw = get_backend(backend).raw
    A, W, b, _ = _arrays(shape, dtype)
    out = np.empty((A.shape[0], W.shape[0]), dtype=dtype)
    raw.forward(A, W, b, SIG, out)  # warm (JIT)
    benchmark.group = f"forward {_ids(shape)}"
    benchmark(raw.forward, A, W, b, SIG, out)


@pytest.mark.parametrize("n,k", [(100, 10), (512, 10)])
@pytest.mark.parametrize("pair", [("sigmoid", "mse"), ("softmax", "ce")], ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_delta(benchmark, backend, dtype, pair, n, k):
    raw = get_backend(backend).raw
    rng = np.random.default_rng(0)
    A = rng.random((n, k)).astype(dtype)
    A /= A.sum(1, keepdims=True)
    y = rng.integers(0, k, n)
    out = np.empty_like(A)
    args = (A, y, ACT_CODES[pair[0]], LOSS_CODES[pair[1]], out)
    raw.output_delta(*args)
    benchmark.group = f"output_delta {'-'.join(pair)} {n}x{k}"
    benchmark(raw.output_delta, *args)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_delta(benchmark, backend, dtype, shape):
    raw = get_backend(backend).raw
    n, n_units, n_next = shape[0], shape[2], 10
    rng = np.random.default_rng(0)
    D = rng.normal(size=(n, n_next)).astype(dtype)
    W = rng.normal(size=(n_next, n_units)).astype(dtype)
    A = rng.random((n, n_units)).astype(dtype)
    out = np.empty_like(A)
    raw.hidden_delta(D, W, A, SIG, None, out)
    benchmark.group = f"hidden_delta {n}x{n_next}->{n_units}"
    benchmark(raw.hidden_delta, D, W, A, SIG, None, out)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_update(benchmark, backend, dtype, shape):
    raw = get_backend(backend).raw
    A, W0, b0, D = _arrays(shape, dtype)
    raw.inplace_update(W0.copy(), b0.copy(), D, A, 0.1, 1e-4, 0.0)

    def fresh():  # the update mutates W and b: every round starts from the same values
        return (W0.copy(), b0.copy(), D, A, 0.1, 1e-4, 0.0), {}

    benchmark.group = f"update l2 {_ids(shape)}"
    benchmark.pedantic(raw.inplace_update, setup=fresh, rounds=50, warmup_rounds=2)


@pytest.mark.parametrize("shape", [(100, 784), (100, 50), (512, 1024)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask(benchmark, backend, dtype, shape):
    raw = get_backend(backend).raw
    out = np.empty(shape, dtype=dtype)
    thr = keep_threshold(0.8)
    raw.dropout_mask(7, 0, 0, thr, 1.25, out)
    benchmark.group = f"dropout_mask {'x'.join(map(str, shape))}"
    benchmark(raw.dropout_mask, 7, 3, 1, thr, 1.25, out)
