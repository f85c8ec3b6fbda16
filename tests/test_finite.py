"""Finiteness checks: the Cython build's exponent-bit scan against NumPy's ``isfinite``, and the inference
road that checks parameters on every call but their structure only when an array was replaced."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import fastmlp
from fastmlp import _validation as V
from fastmlp.network import Network

SIZES = (1, 2, 7, 15, 16, 17, 255, 2047, 2048, 2049, 4095, 4096, 4097, 32767, 32768, 65535, 65536, 100_003)
BAD = (np.nan, np.inf, -np.inf, -np.nan)


@pytest.mark.skipif("cython" not in fastmlp.available_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_all_finite_matches_numpy(dtype, rng):
    from fastmlp.backends.cython import _k

    info = np.finfo(dtype)
    for n in SIZES:
        a = rng.normal(size=n).astype(dtype)
        a[rng.integers(0, n)] = info.max  # the largest finite value and the smallest subnormal are finite
        a[rng.integers(0, n)] = -info.max
        a[rng.integers(0, n)] = info.smallest_subnormal
        assert _k.all_finite([a]) and V.all_finite(a), n
        for bad in BAD:
            for pos in {0, n // 2, n - 1}:
                b = a.copy()
                b[pos] = bad
                assert not _k.all_finite([b]), (n, pos, bad)
                assert not _k.all_finite([a, b]) and not _k.all_finite([b, a])
                assert V.all_finite(b) == bool(np.isfinite(b).all()) is False
        assert _k.all_finite([a.reshape(1, n), np.zeros((0, 3), dtype), a.view(np.memmap)])
        assert not _k.all_finite([b.view(np.memmap)])
    with pytest.raises(TypeError, match="C-contiguous"):
        _k.all_finite([np.zeros((4, 4), dtype)[:, ::2]])
    with pytest.raises(TypeError, match="float32 or float64"):
        _k.all_finite([np.zeros(4, np.int64)])
    with pytest.raises(TypeError, match="numpy arrays"):
        _k.all_finite([[1.0, 2.0]])


@pytest.mark.parametrize("backend", fastmlp.available_backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_sees_every_in_place_change_and_every_replaced_array(backend, dtype, rng):
    net = Network([6, 5, 3], output="softmax", loss="ce", dtype=dtype, backend=backend, seed=1)
    X = rng.uniform(size=(4, 6)).astype(dtype)
    P = net.predict_proba(X)  # checked: the structure is remembered
    for i, arr in enumerate((net.weights[0], net.biases[1], net.weights[1])):
        for bad in (np.nan, np.inf):
            old = arr.flat[-1]
            arr.flat[-1] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                net.predict_proba(X)
            with pytest.raises(ValueError, match="NaN or infinite"):
                net.predict(X)
            arr.flat[-1] = old
    np.testing.assert_array_equal(net.predict_proba(X), P)
    # replaced arrays: a wrong shape, a wrong dtype, a view sharing memory, a non-contiguous array
    W0 = net.weights[0]
    other = np.float64 if dtype == "float32" else np.float32
    for bad, msg in ((np.zeros((5, 7), dtype), "shape"), (W0.astype(other), "must be"),
                     (np.asfortranarray(W0), "C-contiguous")):  # fmt: skip
        net.weights[0] = bad
        with pytest.raises((ValueError, TypeError), match=msg):
            net.predict_proba(X)
    net.weights[0] = W0.copy()
    np.testing.assert_array_equal(net.predict_proba(X), P)
    net.biases[0] = net.weights[0][0, :5]  # a view of another parameter
    with pytest.raises(ValueError, match="share memory"):
        net.predict_proba(X)
    net.biases[0] = np.zeros(5, dtype)
    net.layers = [6, 4, 3]  # the declared layers changed under the arrays
    with pytest.raises(ValueError):
        net.predict_proba(X)


@pytest.mark.parametrize("backend", fastmlp.available_backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers", [[1100, 130, 3], [37, 300, 19, 3], [5, 1, 2]])
def test_predict_finds_a_bad_value_anywhere_in_any_layer(backend, dtype, layers, rng):
    """The Cython SIMD builds test the weights inside the first rows' products (tiles of rows and outputs,
    slabs of W, a masked tail along the inputs): a NaN or an infinity at every kind of place, in every layer,
    for batches shorter than a row tile, of a tile and a remainder, and of more than one chunk."""
    net = Network(layers, activation="relu", output="softmax", loss="ce", dtype=dtype, backend=backend, seed=2)
    batches = {n: rng.uniform(size=(n, layers[0])).astype(dtype) for n in (1, 3, 4, 5, 300)}
    want = {n: net.predict_proba(X) for n, X in batches.items()}
    for arr in (*net.weights, *net.biases):
        flat = arr.reshape(-1)
        places = {0, flat.size - 1, flat.size // 2, *rng.integers(0, flat.size, 6).tolist()}
        if arr.ndim == 2:  # the last input of a row (the masked tail), the first of the last row
            places |= {arr.shape[1] - 1, (arr.shape[0] - 1) * arr.shape[1]}
        for pos in sorted(places):
            old = flat[pos]
            for bad in (np.nan, np.inf, -np.inf):
                flat[pos] = bad
                for n, X in batches.items():
                    with pytest.raises(ValueError, match="NaN or infinite"):
                        net.predict_proba(X)
            flat[pos] = old
    for n, X in batches.items():
        np.testing.assert_array_equal(net.predict_proba(X), want[n])


def test_a_pickled_network_checks_its_own_arrays(rng):
    net = Network([6, 5, 3], seed=1)
    X = rng.uniform(size=(2, 6))
    net.predict_proba(X)
    twin = pickle.loads(pickle.dumps(net))
    assert "_checked" not in twin.__dict__
    twin.weights[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        twin.predict_proba(X)
    net.predict_proba(X)  # the original is untouched


def test_the_fast_road_takes_only_what_it_can_use_as_it_is(rng):
    """float64 X for a float32 network, a non-contiguous X, lists, NaN in X: the full checks, same result."""
    net = Network([6, 5, 3], dtype="float32", seed=1)
    X = rng.uniform(size=(3, 6))
    want = net.predict_proba(X.astype(np.float32))
    for variant in (X, np.asfortranarray(X.astype(np.float32)), X.tolist(), X[:, :6].astype(np.float32)):
        np.testing.assert_array_equal(net.predict_proba(variant), want)
    Xn = X.astype(np.float32)
    Xn[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        net.predict_proba(Xn)
    with pytest.raises(ValueError, match="features"):
        net.predict_proba(X[:, :5].astype(np.float32))


def test_remembered_sample_stays_small_and_a_change_in_it_rescans():
    """finite_checked keeps a bounded sample of a large array (64 rows, about 1,024 columns of wide rows) and
    scans again when a sampled value changes in place."""
    from fastmlp import _validation as V

    W = np.zeros((200, 100_000))
    assert V.finite_checked(W)
    kept = V._SEEN[V._seen_key(W)][1]
    assert kept.size < 70_000 and kept.shape[0] <= 70, kept.shape
    X = np.zeros((20_000, 784))
    assert V.finite_checked(X)
    assert V._SEEN[V._seen_key(X)][1].shape[1] == 784  # rows up to 1,024 wide are kept whole
    X[0, 3] = np.inf  # row 0 is in the sample
    assert not V.finite_checked(X)
    X[0, 3] = 0.5  # a finite change in the sample: scanned again and remembered anew
    calls = []
    real = V.all_finite
    try:
        V.all_finite = lambda a: calls.append(a.shape) or real(a)
        assert V.finite_checked(X)
        assert V.finite_checked(X)
    finally:
        V.all_finite = real
    assert calls == [X.shape]


@pytest.mark.parametrize("src", ["float64", "fortran", "uint8"])
def test_the_one_cast_of_a_large_x_lands_on_a_cache_line(src):
    """``as_features`` copies a large X of another dtype or layout into a buffer on a 64-byte boundary (the compiled
    epochs then read its rows in place), with the values NumPy's cast gives; an X already right is not copied, and
    overflow and NaN are still reported."""
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 255, size=(700, 784))  # 2.2 MB as float32: above the aligned-copy threshold
    Xs = {"float64": X, "fortran": np.asfortranarray(X.astype(np.float32)), "uint8": X.astype(np.uint8)}[src]
    out = V.as_features(Xs, np.dtype(np.float32))
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, np.ascontiguousarray(Xs, dtype=np.float32))
    assert V.as_features(out, np.dtype(np.float32)) is out
    bad = Xs.astype(np.float64)
    bad[5, 7] = 1e300
    with pytest.raises(ValueError, match="overflows"):
        V.as_features(bad, np.dtype(np.float32))
    bad[5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        V.as_features(bad, np.dtype(np.float32))
