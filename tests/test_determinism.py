"""Determinism: same seed -> bit-identical weights per backend; across backends and thread counts within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastmlp
from fastmlp.network import Network

BACKENDS = fastmlp.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
TOL = {"float64": 1e-9, "float32": 1e-4}


def _data():
    rng = np.random.default_rng(11)
    X = rng.uniform(-1, 1, (300, 20))
    y = (X[:, :3].sum(1) > 0).astype(int) + 2 * (X[:, 3] > 0.5)
    return X, y


def _fit(backend, dtype, *, epochs=3, batch_size=32, **kw):
    X, y = _data()
    net = Network([20, 16, 8, 4], activation="sigmoid", output="sigmoid", loss="mse", dtype=dtype, backend=backend, seed=3)
    hist = net.fit(X, y, epochs=epochs, batch_size=batch_size, lr=0.2, l2=1e-4, dropout=0.3, input_dropout=0.1, seed=42,
                   verbose=False, **kw)  # fmt: skip
    return net, hist


def _assert_params(a, b, tol=None):
    for Wa, Wb in zip(a.weights + a.biases, b.weights + b.biases):
        if tol is None:
            np.testing.assert_array_equal(Wa, Wb)
        else:
            np.testing.assert_allclose(Wa, Wb, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_bit_identical(backend, dtype):
    a, ha = _fit(backend, dtype)
    b, hb = _fit(backend, dtype)
    _assert_params(a, b)
    assert ha.train_loss == hb.train_loss and ha.train_acc == hb.train_acc


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", COMPILED)
def test_backends_agree_with_reference_within_tolerance(backend, dtype):
    ref, href = _fit("numpy", dtype)
    got, hgot = _fit(backend, dtype)
    _assert_params(got, ref, TOL[dtype])
    np.testing.assert_allclose(hgot.train_loss, href.train_loss, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_blas_thread_count_does_not_change_the_result(backend, dtype):
    default, _ = _fit(backend, dtype, batch_size=200)  # larger gemms, where BLAS may use its threads
    with threadpool_limits(limits=1):
        one, _ = _fit(backend, dtype, batch_size=200)
    _assert_params(one, default, TOL[dtype])


def _skip_without_threads(backend):
    if backend == "cython":
        import fastmlp.backends.cython as cy

        if not cy.OPENMP:
            pytest.skip("the Cython build has no OpenMP")
    else:
        from fastmlp import config

        if not config.PARALLEL:
            pytest.skip("the Numba epoch is compiled serial (FASTMLP_NUMBA_PARALLEL=0)")
        if config.pool_size() < 2:
            pytest.skip("Numba's thread pool has one thread")


#: a shape whose minibatches the compiled epochs cut into several blocks (so that threads can share them)
SPLIT_SIZES, SPLIT_BATCH = [256, 128, 10], 128


def _fit_split(backend, dtype):
    rng = np.random.default_rng(4)
    X = rng.uniform(-1, 1, (640, 256))
    y = rng.integers(0, 10, 640)
    net = Network(SPLIT_SIZES, activation="relu", output="softmax", loss="ce", dtype=dtype, backend=backend, seed=3)
    net.fit(X, y, epochs=4, batch_size=SPLIT_BATCH, lr=0.05, l2=1e-4, dropout=0.2, seed=42, verbose=False)
    return net


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", COMPILED)
def test_epoch_thread_count_gives_the_same_bits(monkeypatch, backend, dtype):
    """The blocks of a minibatch follow its shape, not the threads: $FASTMLP_NUM_THREADS 1 or 2 and a
    thread_limit(1) block (a capped joblib worker) compute bit-identical weights."""
    from fastmlp import _threads

    _skip_without_threads(backend)
    assert _threads.n_blocks(SPLIT_SIZES, SPLIT_BATCH) > 1  # else no test of threads at all
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "1")
    assert _threads.thread_budget() == 1
    one = _fit_split(backend, dtype)
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "2")
    assert _threads.thread_budget() == min(2, _threads.cpu_count())
    two = _fit_split(backend, dtype)
    two_again = _fit_split(backend, dtype)
    with _threads.thread_limit(1):
        assert _threads.thread_budget() == 1
        capped = _fit_split(backend, dtype)
    assert _threads.current_cap() is None
    _assert_params(two, one)
    _assert_params(two, two_again)
    _assert_params(capped, two)
