"""Inference: predict_proba of a 784-100-10 relu/softmax float32 network at batch 1 and 10,000 rows.

Groups ``predict batch 1``, ``predict batch 10000`` (uniform data: every entry nonzero) and ``predict batch
10000 MNIST`` (MNIST's first rows, about 19 % nonzero, which the Cython build's sparse first layer takes):
every backend, the scikit-learn estimator's single-row call (validation included), and onnxruntime on the same
weights when onnx and onnxruntime are importable.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

import fastmlp

ROWS = {"1": 1, "10000": 10000}


def _mnist(mnist_rows):
    X, _, src = mnist_rows
    if src.startswith("synthetic") or X.shape[0] < 10000:
        pytest.skip(f"needs 10,000 MNIST rows ({src}); point FASTMLP_DATA at MNIST and FASTMLP_BENCH_ROWS >= 10000")
    return np.ascontiguousarray(X[:10000], dtype=np.float32)


def _net(backend):
    return fastmlp.Network([784, 100, 10], activation="relu", loss="ce", dtype="float32", backend=backend, seed=0)


@pytest.mark.parametrize("batch", list(ROWS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_proba(benchmark, backend, batch):
    X = np.random.default_rng(0).random((ROWS[batch], 784)).astype(np.float32)
    net = _net(backend)
    benchmark.group = f"predict batch {batch}"
    P = benchmark(net.predict_proba, X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_proba_mnist(benchmark, backend, mnist_rows):
    X = _mnist(mnist_rows)
    net = _net(backend)
    benchmark.group = "predict batch 10000 MNIST"
    P = benchmark(net.predict_proba, X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-5)


def _ort_session(net):
    ort = pytest.importorskip("onnxruntime")
    onnx_mod = pytest.importorskip("fastmlp.onnx")
    model = onnx_mod.to_onnx(net)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_predict_proba_onnxruntime_mnist(benchmark, mnist_rows):
    X = _mnist(mnist_rows)
    net = _net("auto")
    sess = _ort_session(net)
    name = sess.get_inputs()[0].name
    benchmark.group = "predict batch 10000 MNIST"
    out = benchmark(sess.run, None, {name: X})
    np.testing.assert_allclose(out[0], net.predict_proba(X), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", list(ROWS))
def test_predict_proba_onnxruntime(benchmark, batch):
    X = np.random.default_rng(0).random((ROWS[batch], 784)).astype(np.float32)
    net = _net("auto")
    sess = _ort_session(net)
    name = sess.get_inputs()[0].name
    benchmark.group = f"predict batch {batch}"
    out = benchmark(sess.run, None, {name: X})
    np.testing.assert_allclose(out[0], net.predict_proba(X), rtol=1e-4, atol=1e-6)


def test_estimator_single_row(benchmark):
    import warnings

    from fastmlp.sklearn import MLPClassifier

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(max_iter=1, dtype="float32", random_state=0).fit(rng.random((300, 784)).astype(np.float32),
                                                                           rng.integers(0, 10, 300))  # fmt: skip
    X = rng.random((1, 784)).astype(np.float32)
    benchmark.group = "predict batch 1"
    P = benchmark(clf.predict_proba, X)
    assert P.shape == (1, 10)
