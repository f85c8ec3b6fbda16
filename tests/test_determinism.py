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


def _set_threads(monkeypatch, backend, n):
    if backend == "cython":
        import fastmlp.backends.cython as cy

        if not cy.OPENMP:
            pytest.skip("the Cython build has no OpenMP")
        monkeypatch.setattr(cy, "NUM_THREADS", n)
    else:
        import numba

        from fastmlp import config

        if not config.PARALLEL:
            pytest.skip("the Numba epoch is compiled serial (FASTMLP_NUMBA_PARALLEL=0)")
        monkeypatch.setattr(config, "NUM_THREADS", n)
        if n > numba.config.NUMBA_NUM_THREADS:
            pytest.skip("Numba's thread pool is smaller")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", COMPILED)
def test_epoch_thread_count_within_tolerance(monkeypatch, backend, dtype):
    """FASTMLP_NUM_THREADS (1 vs 2) splits each minibatch differently: sums are reassociated, so within tolerance."""
    _set_threads(monkeypatch, backend, 1)
    one, _ = _fit(backend, dtype)
    _set_threads(monkeypatch, backend, 2)
    two, _ = _fit(backend, dtype)
    two_again, _ = _fit(backend, dtype)
    _assert_params(two, one, TOL[dtype])
    _assert_params(two, two_again)  # a fixed thread count is still bit-reproducible
