"""The shared backend test suite: every compiled backend against the NumPy reference.

Parametrized over the compiled backends that ``fastmlp.available_backends()``
reports (Cython, Numba, ... whichever load here), each public ``Backend`` method
is compared with ``get_backend("numpy")`` on awkward shapes, both dtypes, every
activation and every valid output/loss pair ("bottleneck" style: the fast
function against its slow twin).  Dropout masks must be bit-identical; a whole
``train_epoch`` must match the reference epoch to ``EPOCH_TOL``.

``FASTMLP_REQUIRE_BACKENDS=cython,numba`` makes a backend that fails to load a
test failure instead of a silently shorter parameter list.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import subprocess_env

import fastmlp
from fastmlp import get_backend
from fastmlp._threads import ThreadChoice
from fastmlp.backends import backend_errors
from fastmlp.backends.contract import ACT_CODES as ACT
from fastmlp.backends.contract import HIDDEN_ACTIVATIONS, KEEP_BITS, VALID_OUTPUT_LOSS, keep_threshold, mask_bits

COMPILED = [name for name in fastmlp.available_backends() if name != "numpy"]
REF = get_backend("numpy")
DTYPES = ("float32", "float64")
ALL_ACTS = ("identity", "sigmoid", "tanh", "relu", "softmax", "exp")
PAIRS = sorted(VALID_OUTPUT_LOSS)

#: single kernels: element-wise agreement with the reference
TOL = {"float32": {"rtol": 2e-5, "atol": 2e-6}, "float64": {"rtol": 1e-12, "atol": 1e-13}}
#: one whole epoch: max abs difference of every weight and bias
EPOCH_TOL = {"float32": 1e-4, "float64": 1e-9}
#: summed losses
LOSS_RTOL = {"float32": 1e-5, "float64": 1e-12}

#: (n_samples, n_in, n_out): single rows, one unit, sizes off every SIMD width
SHAPES = [(0, 5, 3), (1, 1, 1), (1, 7, 3), (3, 1, 5), (13, 17, 5), (64, 16, 8), (100, 33, 10), (37, 784, 50)]


@pytest.fixture(params=COMPILED)
def be(request):
    return get_backend(request.param)


def _rng(*key):
    return np.random.default_rng([abs(hash(str(k))) % (2**32) for k in key])


def _layer(rng, dtype, n, n_in, n_out, scale=1.0):
    A = rng.normal(size=(n, n_in)).astype(dtype)
    W = (rng.normal(size=(n_out, n_in)) * scale / np.sqrt(n_in)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    return A, W, b


def _activations(rng, dtype, n, k, output):
    """Plausible output activations for ``output``, with exact 0/1 and ties to stress the clip and arg-max."""
    if output == "softmax":
        z = rng.normal(size=(n, k)) * 3
        A = np.exp(z - z.max(1, keepdims=True))
        A /= A.sum(1, keepdims=True)
    elif output == "sigmoid":
        A = rng.uniform(size=(n, k))
        if n > 2 and k > 1:
            A[1, 0], A[2, -1] = 0.0, 1.0  # log clip on both sides
    else:
        A = rng.normal(size=(n, k))
    if n > 3 and k > 2:
        A[3, :] = A[3, 0]  # an all-tie row: the first arg-max is unit 0
        A[0, 1] = A[0, 2] = A[0].max() + 0.25  # two-way tie on the top
    return A.astype(dtype)


def _assert_close(got, want, dtype, what=""):
    """Element-wise closeness; the absolute part scales with the result's magnitude (a gemm's rounding
    error grows with the size of its terms, not of the possibly cancelled result)."""
    scale = max(1.0, float(np.abs(want).max())) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale, err_msg=what)


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(be, dtype, act, shape):
    A, W, b = _layer(_rng("fwd", dtype, act, shape), dtype, *shape)
    got = be.forward(A, W, b, act)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    _assert_close(got, REF.forward(A, W, b, act), dtype)


@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_extreme_preactivations(be, dtype, act):
    """Pre-activations far beyond exp's range: finite results that still match (no NaN from a clamped exp)."""
    A = np.array([[1.0], [-1.0], [0.5], [-0.5], [0.0]], dtype=dtype)
    W = np.array([[1e4], [-1e4], [800.0], [-800.0], [89.0], [-89.0], [0.0]], dtype=dtype)
    b = np.zeros(7, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        want = REF.forward(A, W, b, act)
    got = be.forward(A, W, b, act)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"], atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_out_buffer_and_layouts(be, dtype):
    """Strided, Fortran-ordered and read-only inputs are copied at the boundary; results still match."""
    rng = _rng("layouts", dtype)
    A_big = rng.normal(size=(40, 60)).astype(dtype)
    A = A_big[::2, ::3]  # (20, 20), non-contiguous
    W = np.asfortranarray(rng.normal(size=(9, 20)).astype(dtype) / 4)
    b = rng.normal(size=18).astype(dtype)[::2]
    A_ro = np.ascontiguousarray(A)
    A_ro.flags.writeable = False
    want = REF.forward(np.ascontiguousarray(A), np.ascontiguousarray(W), np.ascontiguousarray(b), "sigmoid")
    for a in (A, A_ro):
        _assert_close(be.forward(a, W, b, "sigmoid"), want, dtype)
    out = np.full((20, 9), np.nan, dtype=dtype)
    res = be.forward(A, W, b, "sigmoid", out=out)
    assert res is out
    _assert_close(out, want, dtype)


# ------------------------------------------------------------------ output delta
@pytest.mark.parametrize("nk", [(1, 1), (1, 10), (2, 2), (7, 3), (100, 10), (33, 17)], ids=str)
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", DTYPES)
def test_output_delta(be, dtype, pair, nk):
    output, loss = pair
    n, k = nk
    if output == "softmax" and k < 2:
        pytest.skip("softmax needs two units")
    rng = _rng("od", dtype, pair, nk)
    A = _activations(rng, dtype, n, k, output)
    if output == "exp":
        A = np.exp(rng.normal(size=(n, k))).astype(dtype)
    y = rng.integers(0, max(k, 2), size=n)
    if n > 3:
        y[3] = 0
    d_want, l_want, c_want = REF.output_delta(A, y, output, loss)
    d_got, l_got, c_got = be.output_delta(A, y, output, loss)
    _assert_close(d_got, d_want, dtype)
    np.testing.assert_allclose(l_got, l_want, rtol=LOSS_RTOL[dtype])
    assert c_got == c_want
    assert isinstance(l_got, float) and isinstance(c_got, int)


@pytest.mark.parametrize("nk", [(1, 1), (1, 3), (7, 3), (100, 10), (33, 17)], ids=str)
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", DTYPES)
def test_output_delta_dense_targets(be, dtype, pair, nk):
    """Dense targets: regression values, multi-label indicators, soft labels, counts."""
    output, loss = pair
    n, k = nk
    if output == "softmax" and k < 2:
        pytest.skip("softmax needs two units")
    rng = _rng("od-dense", dtype, pair, nk)
    A = _activations(rng, dtype, n, k, output)
    if output == "exp":
        A = np.exp(rng.normal(size=(n, k))).astype(dtype)
    if output == "softmax":
        Y = rng.uniform(0.05, 1, size=(n, k))
        Y = (Y / Y.sum(1, keepdims=True)).astype(dtype)
    elif output == "sigmoid":
        Y = (rng.uniform(size=(n, k)) < 0.5).astype(dtype)
    elif loss == "poisson":
        Y = rng.poisson(2.0, size=(n, k)).astype(dtype)
    else:
        Y = rng.normal(size=(n, k)).astype(dtype)
    d_want, l_want, c_want = REF.output_delta(A, Y, output, loss)
    d_got, l_got, c_got = be.output_delta(A, Y, output, loss)
    _assert_close(d_got, d_want, dtype)
    np.testing.assert_allclose(l_got, l_want, rtol=LOSS_RTOL[dtype])
    assert c_got == c_want


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_delta_layouts(be, dtype):
    rng = _rng("od-layout", dtype)
    A = _activations(rng, dtype, 30, 20, "sigmoid")[:, ::2]  # (30, 10), strided
    y = rng.integers(0, 10, size=30).astype(np.int32)[::-1]
    want = REF.output_delta(np.ascontiguousarray(A), np.ascontiguousarray(y), "sigmoid", "mse")
    got = be.output_delta(A, y, "sigmoid", "mse")
    _assert_close(got[0], want[0], dtype)
    assert got[2] == want[2]


# ------------------------------------------------------------------ hidden delta
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_delta(be, dtype, act, shape, with_mask):
    n, n_units, n_next = shape
    rng = _rng("hd", dtype, act, shape, with_mask)
    D = rng.normal(size=(n, n_next)).astype(dtype)
    W = rng.normal(size=(n_next, n_units)).astype(dtype)
    A = REF.forward(rng.normal(size=(n, 3)).astype(dtype), rng.normal(size=(n_units, 3)).astype(dtype),
                    np.zeros(n_units, dtype), act)  # fmt: skip
    mask = REF.dropout_mask(5, 1, 1, n, n_units, 0.6, dtype=dtype) if with_mask else None
    _assert_close(be.hidden_delta(D, W, A, act, mask), REF.hidden_delta(D, W, A, act, mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_delta_layouts(be, dtype):
    rng = _rng("hd-layout", dtype)
    D = np.asfortranarray(rng.normal(size=(11, 6)).astype(dtype))
    W = rng.normal(size=(6, 26)).astype(dtype)[:, ::2]
    A = rng.uniform(size=(11, 13)).astype(dtype)
    mask = REF.dropout_mask(1, 2, 3, 11, 26, 0.5, dtype=dtype)[:, ::2]
    want = REF.hidden_delta(*(np.ascontiguousarray(x) for x in (D, W, A)), "sigmoid", np.ascontiguousarray(mask))
    _assert_close(be.hidden_delta(D, W, A, "sigmoid", mask), want, dtype)


# ------------------------------------------------------------------ update
@pytest.mark.parametrize(
    "lr,l2,l1",
    [(0.1, 0.0, 0.0), (0.1, 1e-2, 0.0), (0.1, 0.0, 1e-2), (0.05, 1e-3, 1e-3), (0.5, 3.0, 0.0), (0.5, 3.0, 1e-2),
     (0.0, 0.1, 0.1)],
)  # fmt: skip
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_update(be, dtype, shape, lr, l2, l1):
    """Decay, L1 (sign of the old W, 0 at exact zeros), the decay clamp at 0 (lr*l2 > 1) and the bias."""
    n, n_in, n_out = shape
    rng = _rng("upd", dtype, shape, lr, l2, l1)
    W = rng.normal(size=(n_out, n_in)).astype(dtype)
    W.flat[::3] = 0.0
    b = rng.normal(size=n_out).astype(dtype)
    D = rng.normal(size=(n, n_out)).astype(dtype) / n
    A = rng.normal(size=(n, n_in)).astype(dtype)
    W_ref, b_ref = W.copy(), b.copy()
    REF.inplace_update(W_ref, b_ref, D, A, lr, l2, l1)
    D_before, A_before = D.copy(), A.copy()
    assert be.inplace_update(W, b, D, A, lr, l2, l1) is None
    _assert_close(W, W_ref, dtype, "W")
    _assert_close(b, b_ref, dtype, "b")
    np.testing.assert_array_equal(D, D_before)
    np.testing.assert_array_equal(A, A_before)


# ------------------------------------------------------------------ products over every tile remainder
#: rows, inputs and outputs around the register tiles of the SIMD kernels of both builds and their vector
#: widths, so that every partial tile, panel and masked tail runs at least once.  avx512: the outer-product
#: kernel (forward on the transposed W, hidden delta, update) tiles up to 6 rows by 4 vectors of 16 float32 /
#: 8 float64, the dot-product kernel (inference, and training's forward where the shape rule picks it) 4 rows
#: by 5 outputs; avx2: 4 rows by 3 vectors of 8 / 4, and 4 rows by 3 outputs.  The transposed copy of W goes
#: in blocks of one vector width square.
TILE_ROWS = (1, 2, 3, 4, 5, 6, 7, 9, 12, 13)
#: widths of the vectorized dimension (a forward's outputs, a hidden delta's or an update's inputs)
TILE_WIDTHS = (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 131)
#: the other dimension, taken in turn
TILE_OTHER = (1, 5, 13, 6, 7)
#: reductions longer than one block of the kernel's accumulation (256 values of q in both builds)
LONG_REDUCTIONS = (255, 256, 257, 300, 520, 769)


def _check_products(be, rng, dtype, n, n_in, n_out, l2s=(0.0, 0.3, 20.0)):
    what = f"n={n} n_in={n_in} n_out={n_out}"
    A, W, b = _layer(rng, dtype, n, n_in, n_out)
    out = np.full((n, n_out), np.nan, dtype)
    be.forward(A, W, b, "identity", out=out)
    _assert_close(out, REF.forward(A, W, b, "identity"), dtype, "forward " + what)
    D = rng.normal(size=(n, n_out)).astype(dtype)
    H = rng.uniform(size=(n, n_in)).astype(dtype)
    got = np.full((n, n_in), np.nan, dtype)
    be.hidden_delta(D, W, H, "sigmoid", out=got)
    _assert_close(got, REF.hidden_delta(D, W, H, "sigmoid"), dtype, "hidden delta " + what)
    for l2 in l2s:  # 20: lr * l2 > 1 clamps the decay to 0
        W1, b1, W2, b2 = W.copy(), b.copy(), W.copy(), b.copy()
        be.inplace_update(W1, b1, D, A, 0.1, l2, 0.0)
        REF.inplace_update(W2, b2, D, A, 0.1, l2, 0.0)
        _assert_close(W1, W2, dtype, f"update l2={l2} " + what)
        _assert_close(b1, b2, dtype, f"update bias l2={l2} " + what)
    P = be.forward_network(A, [W], [b], "identity", "identity")  # inference: the products on W as stored
    _assert_close(P, REF.forward(A, W, b, "identity"), dtype, "forward_network " + what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_over_every_tile_remainder(be, dtype):
    """Forward, hidden delta, update and inference against the reference for every combination of tile
    remainders, with NaN in the output buffers the kernels must not read (``beta = 0``)."""
    rng = _rng("tiles", dtype)
    for n in TILE_ROWS:
        for i, w in enumerate(TILE_WIDTHS):
            other = TILE_OTHER[(i + n) % len(TILE_OTHER)]
            _check_products(be, rng, dtype, n, w, other)  # updates and hidden deltas w wide, a short forward
            _check_products(be, rng, dtype, n, other, w, l2s=(0.3,))  # forwards w wide, updates of w rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_over_long_reductions(be, dtype):
    """Sums longer than the kernels' accumulation blocks: many inputs (forward), many outputs (hidden delta)
    and many rows (update), each against the reference."""
    rng = _rng("long", dtype)
    for q in LONG_REDUCTIONS:
        for n, n_in, n_out in ((5, q, 17), (q, 33, 7), (7, 19, q), (q, q, 3)):
            _check_products(be, rng, dtype, n, n_in, n_out, l2s=(0.3,))


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**64 - 1])
@pytest.mark.parametrize(
    "step,layer,n_rows,n_units,keep",
    [(0, 0, 1, 1, 0.5), (1, 0, 100, 784, 0.8), (7, 1, 37, 50, 0.5), (2**40, 3, 3, 17, 1e-7), (5, 2, 9, 33, 0.999999),
     (3, 1, 13, 5, 1.0)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_bit_identical(be, dtype, seed, step, layer, n_rows, n_units, keep):
    scale = 1.0 / keep
    got = be.dropout_mask(seed, step, layer, n_rows, n_units, keep, dtype=dtype)
    want = REF.dropout_mask(seed, step, layer, n_rows, n_units, keep, dtype=dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    # and against the contract's generator itself
    bits = mask_bits(seed, step, layer, n_rows, n_units, keep)
    np.testing.assert_array_equal(got, np.where(bits, np.asarray(scale, dtype=dtype), 0).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_custom_scale(be, dtype):
    got = be.dropout_mask(42, 3, 1, 20, 30, 0.3, scale=1.0, dtype=dtype)
    np.testing.assert_array_equal(got, REF.dropout_mask(42, 3, 1, 20, 30, 0.3, scale=1.0, dtype=dtype))
    assert set(np.unique(got)) <= {0.0, 1.0}


# ------------------------------------------------------------------ whole network
def _network(rng, sizes, dtype):
    weights = [(rng.normal(size=(b, a)) / np.sqrt(a)).astype(dtype) for a, b in zip(sizes[:-1], sizes[1:])]
    biases = [(rng.normal(size=b) * 0.1).astype(dtype) for b in sizes[1:]]
    return weights, biases


@pytest.mark.parametrize(
    "sizes,hidden,output",
    [([1, 1], "sigmoid", "sigmoid"), ([5, 3, 2], "tanh", "softmax"), ([784, 50, 10], "sigmoid", "sigmoid"),
     ([17, 9, 33, 4], "relu", "identity"), ([20, 15, 13, 11, 7], "tanh", "softmax"),
     ([31, 7, 6, 5, 4, 3], "sigmoid", "sigmoid")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_network(be, dtype, n, sizes, hidden, output):
    rng = _rng("fn", dtype, n, sizes)
    weights, biases = _network(rng, sizes, dtype)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    _assert_close(be.forward_network(X, weights, biases, hidden, output),
                  REF.forward_network(X, weights, biases, hidden, output), dtype)  # fmt: skip


# ------------------------------------------------------------------ whole epoch
EPOCHS = {
    # the benchmark network, a partial last batch, no extras
    "784-50-10": dict(sizes=[784, 50, 10], n=1037, batch=100),
    # everything at once: dropout on the input and the hidden layer, L1 and L2, per-step learning rates
    "784-50-10-all": dict(
        sizes=[784, 50, 10], n=1037, batch=100, l2=1e-3, l1=1e-4, keep=[0.8, 0.5], seed=2**64 - 1, step0=17, lrs="varying"
    ),
    "no-hidden": dict(sizes=[13, 4], n=50, batch=8, output="softmax", loss="ce", l1=1e-3, keep=[0.7]),
    "1x1": dict(sizes=[1, 1], n=9, batch=4, l2=1e-2),
    "2-hidden-tanh-softmax-ce": dict(
        sizes=[30, 20, 17, 10], n=203, batch=32, hidden="tanh", output="softmax", loss="ce", keep=[1.0, 0.9, 0.6], l2=1e-4
    ),
    "3-hidden-relu-identity-mse": dict(
        sizes=[25, 19, 13, 9, 3], n=150, batch=10, hidden="relu", output="identity", loss="mse",
        keep=[0.9, 1.0, 0.75, 0.8], l1=1e-4, lr=0.02,
    ),
    "4-hidden-sigmoid-ce": dict(
        sizes=[11, 9, 8, 7, 6, 5], n=77, batch=16, output="sigmoid", loss="ce", keep=[0.8, 0.7, 0.6, 0.5, 0.9],
        l2=1e-3, l1=1e-3, lrs="varying",
    ),
    "softmax-mse-batch1": dict(sizes=[6, 5, 4], n=23, batch=1, output="softmax", loss="mse", keep=[0.5, 0.5]),
    "batch-bigger-than-data": dict(sizes=[10, 8, 3], n=40, batch=64, keep=[1.0, 0.5], inverted=False),
    "decay-clamped": dict(sizes=[8, 6, 3], n=40, batch=7, l2=20.0, lr=0.1),
    "wide-both": dict(sizes=[800, 770, 3], n=37, batch=16, hidden="relu", output="softmax", loss="ce"),
    "wide-hidden": dict(sizes=[784, 256, 256, 10], n=230, batch=100, keep=[0.9, 0.5, 0.5], l2=1e-4),
    # ---- targets
    "binary-one-unit-ce": dict(sizes=[12, 7, 1], n=91, batch=16, output="sigmoid", loss="ce", alpha=1e-3),
    "binary-one-unit-mse": dict(sizes=[12, 7, 1], n=40, batch=9, output="sigmoid", loss="mse"),
    "regression-squared-error": dict(sizes=[9, 8, 1], n=77, batch=10, hidden="relu", output="identity",
                                     loss="squared_error", target="dense", lr=0.01),
    "multi-output-regression": dict(sizes=[9, 11, 3], n=64, batch=13, hidden="tanh", output="identity",
                                    loss="squared_error", target="dense", lr=0.01, alpha=1e-2, weights=True),
    "poisson": dict(sizes=[7, 6, 2], n=50, batch=8, hidden="relu", output="exp", loss="poisson", target="dense",
                    lr=0.01, keep=[0.9, 0.8]),
    "multilabel-ce": dict(sizes=[15, 10, 4], n=70, batch=11, output="sigmoid", loss="ce", target="dense"),
    "soft-labels-softmax-ce": dict(sizes=[15, 10, 4], n=70, batch=11, output="softmax", loss="ce", target="soft"),
    "dense-identity-mse": dict(sizes=[10, 6, 3], n=33, batch=5, output="identity", loss="mse", target="dense"),
    # ---- penalties and weights
    "alpha-and-weights": dict(sizes=[20, 12, 5], n=97, batch=20, output="softmax", loss="ce", alpha=1e-2,
                              weights=True, keep=[0.9, 0.7]),
    "alpha-l1-l2": dict(sizes=[20, 12, 5], n=97, batch=20, alpha=1e-3, l2=1e-3, l1=1e-4),
    # ---- optimizers
    "momentum": dict(sizes=[30, 16, 4], n=120, batch=16, opt="momentum", mu=0.9, lrs="varying"),
    "nesterov-alpha": dict(sizes=[30, 16, 4], n=120, batch=16, output="softmax", loss="ce", opt="nesterov", mu=0.9,
                           alpha=1e-4, weights=True),
    "adam": dict(sizes=[30, 16, 4], n=120, batch=16, output="softmax", loss="ce", opt="adam", lr=1e-3, t0=3),
    "adam-torch-eps-l1": dict(sizes=[30, 16, 8, 4], n=120, batch=16, hidden="relu", opt="adam", eps_mode="torch",
                              lr=1e-3, l1=1e-4, keep=[0.9, 0.8, 1.0]),
    "adamw": dict(sizes=[784, 50, 10], n=300, batch=100, output="softmax", loss="ce", opt="adamw", lr=1e-3, l2=1e-2,
                  t0=100),
    "gradient-full-batch": dict(sizes=[20, 12, 3], n=60, batch=60, hidden="tanh", output="softmax", loss="ce",
                                opt="gradient", alpha=1e-3, weights=True),
}


def _plan(cfg, dtype, n_rows):
    from fastmlp.backends.contract import plan_epoch

    opt = cfg.get("opt", "sgd")
    extra = {}
    if opt in ("momentum", "nesterov"):
        extra = dict(momentum=cfg.get("mu", 0.9))
    elif opt in ("adam", "adamw"):
        extra = dict(beta1=0.9, beta2=0.999, eps=1e-8, eps_mode="torch" if opt == "adamw" else cfg.get("eps_mode", "sklearn"))
    target = "labels" if cfg.get("target", "labels") == "labels" else "dense"
    return plan_epoch(cfg["sizes"], dtype, batch_size=cfg.get("batch", 100), hidden=cfg.get("hidden", "sigmoid"),
                      output=cfg.get("output", "sigmoid"), loss=cfg.get("loss", "mse"), target=target,
                      l2=cfg.get("l2", 0.0), l1=cfg.get("l1", 0.0), alpha=cfg.get("alpha", 0.0), keep=cfg.get("keep"),
                      inverted=cfg.get("inverted", True), optimizer=opt, seed=cfg.get("seed", 3), **extra)  # fmt: skip


def _state(plan, rng):
    from fastmlp.backends.contract import OptimizerState

    state = OptimizerState.zeros(plan.optimizer, plan.sizes, plan.dtype)
    for a in state.arrays():  # a state mid-run: velocities of both signs, positive second moments
        a[...] = rng.normal(size=a.shape) * 1e-2
    if plan.optimizer in ("adam", "adamw"):
        for v in (*state.weights[1], *state.biases[1]):
            np.abs(v, out=v)
    return state


def _targets(rng, cfg, dtype, n_rows):
    k = cfg["sizes"][-1]
    target = cfg.get("target", "labels")
    if target == "labels":
        return rng.integers(0, max(k, 2), size=n_rows)
    if target == "soft":
        p = rng.uniform(0.05, 1, size=(n_rows, k))
        return (p / p.sum(1, keepdims=True)).astype(dtype)
    if cfg.get("loss") == "ce":  # multi-label indicators
        return (rng.uniform(size=(n_rows, k)) < 0.4).astype(dtype)
    if cfg.get("loss") == "poisson":
        return rng.poisson(2.0, size=(n_rows, k)).astype(dtype)
    return rng.normal(size=(n_rows, k)).astype(dtype)


def _run_epoch(backend, cfg, dtype, weights, biases, X, Y, order, state, sw):
    plan = _plan(cfg, dtype, X.shape[0])
    n_steps = plan.n_steps(len(order))
    lr = cfg.get("lr", 0.1)
    lrs = np.linspace(lr, lr / 3, n_steps) if cfg.get("lrs") == "varying" else lr
    return backend.train_epoch(X, Y, order, (weights, biases), state, lrs, plan, cfg.get("step0", 0), sample_weight=sw)


def _epoch_case(name, dtype):
    cfg = EPOCHS[name]
    rng = _rng("epoch", name, dtype)
    sizes = cfg["sizes"]
    weights, biases = _network(rng, sizes, dtype)
    n_rows = cfg["n"] + 5
    X = rng.uniform(-1, 1, size=(n_rows, sizes[0])).astype(dtype)
    Y = _targets(rng, cfg, dtype, n_rows)
    order = rng.permutation(n_rows)[: cfg["n"]]  # leaves rows out, visits the rest shuffled
    plan = _plan(cfg, dtype, n_rows)
    state = _state(plan, rng)
    state.t = cfg.get("t0", 0)
    sw = rng.uniform(0.1, 3.0, size=n_rows) if cfg.get("weights") else None
    return cfg, weights, biases, X, Y, order, state, sw


def _check_epoch(backend, name, dtype):
    cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dtype)
    W_ref, b_ref, state_ref = [w.copy() for w in weights], [b.copy() for b in biases], state.copy()
    ref = _run_epoch(REF, cfg, dtype, W_ref, b_ref, X, Y, order, state_ref, sw)
    X0, Y0, order0 = X.copy(), Y.copy(), order.copy()
    got = _run_epoch(backend, cfg, dtype, weights, biases, X, Y, order, state, sw)
    for i, (w, wr, b, br) in enumerate(zip(weights, W_ref, biases, b_ref)):
        assert np.abs(w - wr).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(wr).max()), \
            f"W[{i}] differs by {np.abs(w - wr).max():.3g}"  # fmt: skip
        assert np.abs(b - br).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(br).max()), \
            f"b[{i}] differs by {np.abs(b - br).max():.3g}"  # fmt: skip
        assert np.abs(wr).max() > 0  # the comparison is not vacuous
    assert state.t == state_ref.t
    for i, (a, ar) in enumerate(zip(state.arrays(), state_ref.arrays())):
        assert np.abs(a - ar).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(ar).max()), f"state array {i} differs"
    np.testing.assert_allclose(got.loss_sum, ref.loss_sum, rtol=LOSS_RTOL[dtype])
    np.testing.assert_allclose(got.penalty_sum, ref.penalty_sum, rtol=LOSS_RTOL[dtype])
    assert got.n_correct == ref.n_correct
    if cfg.get("alpha"):
        assert ref.penalty_sum > 0
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Y, Y0)
    np.testing.assert_array_equal(order, order0)


@pytest.mark.parametrize("name", list(EPOCHS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_train_epoch_matches_reference(be, dtype, name):
    _check_epoch(be, name, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_epoch_readonly_and_strided_inputs(be, dtype):
    cfg, weights, biases, X, y, order, state, sw = _epoch_case("2-hidden-tanh-softmax-ce", dtype)
    W_ref, b_ref = [w.copy() for w in weights], [b.copy() for b in biases]
    _run_epoch(REF, cfg, dtype, W_ref, b_ref, X, y, order, state.copy(), sw)
    X_ro = X.copy()
    X_ro.flags.writeable = False
    y_strided = np.repeat(y, 2)[::2].astype(np.int32)
    order_ro = order.copy()
    order_ro.flags.writeable = False
    _run_epoch(be, cfg, dtype, weights, biases, X_ro, y_strided, order_ro, state, sw)
    for w, wr in zip(weights + biases, W_ref + b_ref):
        assert np.abs(w - wr).max() <= EPOCH_TOL[dtype]


def _at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("name", ["784-50-10", "adamw", "gradient-full-batch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_train_epoch_bits_do_not_depend_on_where_x_starts(be, dtype, name):
    """The Cython build reads X's rows in place when they start on cache lines and gathers them otherwise;
    Numba always gathers into aligned buffers: either way every weight ends with the same bits."""
    cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dtype)
    results = []
    for offset in (0, 8, 16, 32):
        W, b, st = [w.copy() for w in weights], [v.copy() for v in biases], state.copy()
        Xo = _at_offset(X, offset)
        assert Xo.ctypes.data % 64 == offset
        got = _run_epoch(be, cfg, dtype, W, b, Xo, Y, order, st, sw)
        results.append((W + b + st.arrays(), got))
    for params, got in results[1:]:
        for a, a0 in zip(params, results[0][0]):
            np.testing.assert_array_equal(a, a0)
        assert got == results[0][1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_epoch_consecutive_epochs_continue_step_numbering(be, dtype):
    """Two epochs with ``step0`` carried over equal the reference's two epochs (dropout masks included)."""
    cfg, weights, biases, X, y, order, state, sw = _epoch_case("784-50-10-all", dtype)
    W_ref, b_ref = [w.copy() for w in weights], [b.copy() for b in biases]
    for backend, W, b in ((REF, W_ref, b_ref), (be, weights, biases)):
        for epoch in range(2):
            _run_epoch(backend, dict(cfg, step0=epoch * 11), dtype, W, b, X, y, order[::-1] if epoch else order,
                       state.copy(), sw)  # fmt: skip
    for w, wr in zip(weights + biases, W_ref + b_ref):
        assert np.abs(w - wr).max() <= EPOCH_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_epochs_continue_the_step_count(be, dtype):
    """Two Adam epochs in a row (t carried in the state) equal the reference's; t counts the steps."""
    cfg, weights, biases, X, y, order, state, sw = _epoch_case("adam", dtype)
    W_ref, b_ref, s_ref = [w.copy() for w in weights], [b.copy() for b in biases], state.copy()
    for _ in range(2):
        _run_epoch(REF, cfg, dtype, W_ref, b_ref, X, y, order, s_ref, sw)
        _run_epoch(be, cfg, dtype, weights, biases, X, y, order, state, sw)
    assert state.t == s_ref.t == cfg.get("t0", 0) + 2 * -(-len(order) // cfg["batch"])
    for w, wr in zip(weights + biases + state.arrays(), W_ref + b_ref + s_ref.arrays()):
        assert np.abs(w - wr).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(wr).max())


# ------------------------------------------------------------------ process-wide side effects and availability
def test_loading_backends_keeps_subnormals():
    """A kernel built with -ffast-math and linked with it would switch on flush-to-zero for the whole process."""
    assert COMPILED == [n for n in fastmlp.available_backends() if n != "numpy"]
    for dt in (np.float32, np.float64):
        tiny = np.array([np.finfo(dt).smallest_subnormal], dtype=dt)
        assert (tiny * dt(3))[0] > 0, f"{dt.__name__} subnormals flushed to zero after loading {COMPILED}"
        assert (np.array([np.finfo(dt).tiny], dtype=dt) / dt(4))[0] > 0


def test_required_backends_are_available():
    required = [s.strip() for s in os.environ.get("FASTMLP_REQUIRE_BACKENDS", "").split(",") if s.strip()]
    if not required:
        pytest.skip("FASTMLP_REQUIRE_BACKENDS is not set (CI sets it, e.g. 'cython,numba')")
    available = fastmlp.available_backends()
    errors = backend_errors()
    missing = {name: errors.get(name, "unknown backend name") for name in required if name not in available}
    assert not missing, f"required backends did not load: {missing}"


def test_compiled_backends_report_their_name():
    for name in COMPILED:
        assert get_backend(name).name == name


def test_keep_threshold_full_means_no_dropout():
    assert keep_threshold(1.0) == 1 << KEEP_BITS


# ------------------------------------------------------------------ Cython specifics
needs_cython = pytest.mark.skipif("cython" not in COMPILED, reason="the Cython backend is not built here")


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(**env),
                          cwd=tempfile.gettempdir(), timeout=120)  # fmt: skip


@needs_cython
def test_cython_fma_peak():
    """The compiled FMA loop that ``fastmlp bench`` calls as ``fma_peak(dtype, n_threads)``: GFLOP/s, positive."""
    import fastmlp.backends.cython as cy

    for dtype in ("float32", "float64"):
        assert cy._k.fma_peak(dtype, 1, seconds=0.005, repeats=1) > 0
    assert cy._k.fma_peak("float32", 2, seconds=0.005, repeats=1) > 0
    with pytest.raises(ValueError):
        cy._k.fma_peak("int32")


@needs_cython
def test_cython_variant_and_isa_override():
    import fastmlp.backends.cython as cy

    assert cy.VARIANT in ("baseline", "avx2", "avx512")
    forced = os.environ.get("FASTMLP_CYTHON_ISA")
    best = "avx512" if cy.cpu_has_avx512() else "avx2" if cy.cpu_has_avx2() else "baseline"
    assert cy.VARIANT == (forced or best)
    assert cy.SIMD_GEMM == (cy.VARIANT in ("avx512", "avx2"))  # the baseline build trains through BLAS
    assert cy._k.ISA == cy.VARIANT
    code = (
        "import numpy as np, fastmlp.backends.cython as cy\n"
        "from fastmlp import get_backend\n"
        "rng = np.random.default_rng(0)\n"
        "A, W, b = rng.normal(size=(9, 13)), rng.normal(size=(5, 13)), rng.normal(size=5)\n"
        "for dt in ('float32', 'float64'):\n"
        "    a, w, bb = A.astype(dt), W.astype(dt), b.astype(dt)\n"
        "    got = get_backend('cython').forward(a, w, bb, 'sigmoid')\n"
        "    want = get_backend('numpy').forward(a, w, bb, 'sigmoid')\n"
        "    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), dt\n"
        "print(cy.VARIANT)\n"
    )
    res = _python(code, FASTMLP_CYTHON_ISA="baseline")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "baseline"
    for isa, has in (("avx2", cy.cpu_has_avx2), ("avx512", cy.cpu_has_avx512)):
        res = _python(code, FASTMLP_CYTHON_ISA=isa)
        if has():
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == isa
        else:  # forcing a build this CPU cannot run is an error, not a crash
            assert res.returncode != 0 and "FASTMLP_CYTHON_ISA" in res.stderr


@needs_cython
def test_cython_bad_isa_makes_backend_unavailable_with_reason():
    code = "import fastmlp\nprint('cython' in fastmlp.available_backends())\nprint(fastmlp.backends.backend_errors())"
    res = _python(code, FASTMLP_CYTHON_ISA="sse9")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "False"
    assert "FASTMLP_CYTHON_ISA" in res.stdout


def _forced_threads(monkeypatch, n_threads, n_blocks):
    """Make the Cython adapter run every epoch on ``n_threads`` threads over ``n_blocks`` blocks."""
    import fastmlp.backends.cython as cy

    monkeypatch.setattr(cy, "_choice", ThreadChoice())
    monkeypatch.setattr(cy, "_threads_for", lambda plan, n_used: (n_threads, n_blocks, ("forced", n_threads, n_blocks)))


#: epochs that exercise every part of the split: dropout, several layers, batch 1, dense targets, weights,
#: alpha (its penalty sum comes from the column blocks), every optimizer's fused update
THREADED_CASES = ("784-50-10-all", "4-hidden-sigmoid-ce", "softmax-mse-batch1", "multi-output-regression",
                  "alpha-and-weights", "nesterov-alpha", "adam-torch-eps-l1", "gradient-full-batch")  # fmt: skip


@needs_cython
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_threaded_epoch_matches_reference(monkeypatch, dtype, n_threads):
    """The OpenMP split (row blocks, then column blocks of W) gives the reference's epoch on any thread count."""
    import fastmlp.backends.cython as cy

    if not cy.OPENMP and n_threads > 1:
        pytest.skip("built without OpenMP")
    _forced_threads(monkeypatch, n_threads, 4)
    for name in THREADED_CASES:
        _check_epoch(get_backend("cython"), name, dtype)
    assert set(cy._choice.speed) == {("forced", n_threads, 4)}  # every epoch went through the forced split


@needs_cython
@pytest.mark.parametrize("road", [True, False], ids=["dot-products-on-W", "outer-products-on-W.T"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_epoch_forward_products_either_road(dtype, road):
    """Training's forward products by dot products on W as stored (fm_ntp) or by the outer-product kernel on W's
    transpose give the reference's epoch on every case (every layer the one way, whatever the shape rule picks)."""
    import fastmlp.backends.cython as cy

    k = cy._k
    old = k.set_train_forward_nt(road)
    try:
        assert k.train_forward_nt(784, 50, 4) == int(road) and k.train_forward_nt(30, 1000, 8) == int(road)
        for name in EPOCHS:
            _check_epoch(get_backend("cython"), name, dtype)
    finally:
        k.set_train_forward_nt(old)


def _at_offset(X, offset):
    """A copy of ``X`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(X.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start : start + X.nbytes].view(X.dtype).reshape(X.shape)
    out[...] = X
    assert out.ctypes.data % 64 == offset
    return out


@needs_cython
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_epoch_reads_x_in_place_or_gathered_alike(dtype):
    """Rows of X read in place (on a cache line or off it) or gathered first give the reference's epoch, and the
    same bits as each other: the products' order depends on the shapes only."""
    import fastmlp.backends.cython as cy

    k = cy._k
    for name in ("784-50-10", "adamw", "wide-hidden"):
        cfg, weights0, biases0, X, Y, order, state0, sw = _epoch_case(name, dtype)
        W_ref, b_ref = [w.copy() for w in weights0], [b.copy() for b in biases0]
        _run_epoch(REF, cfg, dtype, W_ref, b_ref, X, Y, order, state0.copy(), sw)
        results = []
        for offset in (0, 16, 48):
            for mode in (True, False, None):
                old = k.set_x_in_place_unaligned(mode)
                try:
                    weights, biases = [w.copy() for w in weights0], [b.copy() for b in biases0]
                    Xo = _at_offset(X, offset)
                    _run_epoch(get_backend("cython"), cfg, dtype, weights, biases, Xo, Y, order, state0.copy(), sw)
                finally:
                    k.set_x_in_place_unaligned(old)
                np.testing.assert_array_equal(Xo, X)
                for w, wr in zip(weights + biases, W_ref + b_ref, strict=True):
                    assert np.abs(w - wr).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(wr).max()), (name, offset, mode)
                results.append(weights + biases)
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)


@needs_cython
def test_cython_forward_road_rule():
    """The shape rule (avx512: float32 layers up to 112 units or 768 by 768 take the dot products; avx2: float32
    layers of 128 inputs or more; float64 never)."""
    import fastmlp.backends.cython as cy

    if not cy._k.SIMD_GEMM:
        pytest.skip("this build trains through BLAS")
    rule = cy._k.train_forward_nt
    if cy._k.ISA == "avx2":
        assert [rule(784, 50, 4), rule(784, 256, 4), rule(128, 1000, 4), rule(127, 50, 4)] == [1, 1, 1, 0]
    else:
        assert [rule(784, 50, 4), rule(784, 112, 4), rule(784, 113, 4), rule(784, 256, 4)] == [1, 1, 0, 0]
        assert [rule(1024, 1024, 4), rule(768, 768, 4), rule(767, 1024, 4), rule(64, 30, 4)] == [1, 1, 0, 0]
    assert [rule(784, 50, 8), rule(1024, 1024, 8)] == [0, 0]


@needs_cython
@pytest.mark.filterwarnings("ignore:.*more than the")
def test_cython_threaded_epoch_restores_blas_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    import fastmlp.backends.cython as cy

    if not cy.OPENMP:
        pytest.skip("built without OpenMP")
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "2")
    monkeypatch.setattr(cy, "_choice", ThreadChoice())
    before = {d["filepath"]: d["num_threads"] for d in threadpool_info()}
    _check_epoch(get_backend("cython"), "784-50-10", "float32")
    assert [2] in [list(v) for v in cy._choice.speed.values()]  # the first epoch of the shape ran on two threads
    assert {d["filepath"]: d["num_threads"] for d in threadpool_info()} == before
    # epochs overlapping from several Python threads share one pin; the last one out restores
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda name: _check_epoch(get_backend("cython"), name, "float64"), ["784-50-10-all"] * 3))
    assert {d["filepath"]: d["num_threads"] for d in threadpool_info()} == before


@needs_cython
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cython_thread_count_never_changes_the_result(monkeypatch, dtype):
    """With the blocks fixed, one, two or three threads compute the same bits (so choosing threads is free)."""
    import fastmlp.backends.cython as cy

    if not cy.OPENMP:
        pytest.skip("built without OpenMP")
    for name in THREADED_CASES:
        results = []
        for n_threads in (1, 2, 3):
            _forced_threads(monkeypatch, n_threads, 4)
            cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dtype)
            stats = _run_epoch(get_backend("cython"), cfg, dtype, weights, biases, X, Y, order, state, sw)
            results.append((weights + biases + state.arrays(), tuple(stats), state.t))
        for other in results[1:]:
            for a, b in zip(results[0][0], other[0], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)
            assert other[1:] == results[0][1:], name


@needs_cython
@pytest.mark.filterwarnings("ignore:.*more than the")
def test_cython_thread_choice_follows_measurements(monkeypatch):
    import fastmlp.backends.cython as cy
    from fastmlp import _threads
    from fastmlp.backends.contract import plan_epoch

    if not cy.OPENMP:
        pytest.skip("built without OpenMP")
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "2")
    monkeypatch.setattr(cy, "_choice", ThreadChoice())
    plan = plan_epoch([784, 50, 10], "float32", batch_size=100, hidden="sigmoid", output="sigmoid", loss="mse")
    assert _threads.n_blocks(plan.sizes, 100) == 2
    n, blocks, key = cy._threads_for(plan, 1000)
    assert (n, blocks) == (2, 2) and key is not None  # first: as many threads as blocks
    cy._choice.record(key, 2, 9e-3, 100)
    assert cy._threads_for(plan, 1000)[0] == 2  # the first epoch is cold: two threads are timed again
    cy._choice.record(key, 2, 8e-3, 100)
    assert cy._threads_for(plan, 1000)[0] == 1  # then one thread, once
    cy._choice.record(key, 1, 2e-4, 100)  # two threads were 40x slower (a busy machine)
    every = _threads.PROBE_EVERY
    picks = [cy._threads_for(plan, 1000)[0] for _ in range(8 * every)]
    assert picks.count(2) == 2  # re-measured only every 4 * PROBE_EVERY epochs
    cy._choice.speed[key] = {2: 1e-6, 1: 2e-6}  # a quiet machine: two threads, one re-check every PROBE_EVERY
    picks = [cy._threads_for(plan, 1000)[0] for _ in range(4 * every)]
    assert picks.count(1) == 4 and picks.count(2) == 4 * every - 4
    # the cap and the environment lower the budget; the blocks stay those of the shape
    with _threads.thread_limit(1):
        assert cy._threads_for(plan, 1000) == (1, 2, None)
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "1")
    assert cy._threads_for(plan, 1000) == (1, 2, None)
    monkeypatch.setenv("FASTMLP_NUM_THREADS", "2")
    assert cy._threads_for(plan, 40)[:2] == (1, 1)  # an epoch of 40 rows is one block
    # epochs through the public road record both thread counts, under the shape's key
    monkeypatch.setattr(cy, "_choice", ThreadChoice())
    rng = np.random.default_rng(3)
    X = rng.uniform(size=(300, 784)).astype("float32")
    y = rng.integers(0, 10, 300)
    W, b = _network(rng, [784, 50, 10], "float32")
    for _ in range(2):
        get_backend("cython").train_epoch(X, y, np.arange(300), (W, b), None, 0.1, plan)
    assert {k: set(v) for k, v in cy._choice.speed.items()} == {key: {2}}  # two threads, twice (the first is cold)
    get_backend("cython").train_epoch(X, y, np.arange(300), (W, b), None, 0.1, plan)
    assert {k: set(v) for k, v in cy._choice.speed.items()} == {key: {1, 2}}


@needs_cython
def test_cython_never_falls_back_to_the_reference(monkeypatch):
    """Every kernel of the Cython backend is compiled: the reference's functions are never called."""
    from fastmlp.backends import reference

    def boom(*args, **kwargs):
        raise AssertionError("the Cython backend called the NumPy reference")

    cy_be = get_backend("cython")
    cases = [(name, dt) for name in ("poisson", "multilabel-ce", "adamw", "gradient-full-batch", "binary-one-unit-ce",
                                     "alpha-and-weights") for dt in DTYPES]  # fmt: skip
    refs = {}
    for name, dt in cases:  # reference results first, then the Cython runs with the reference disabled
        cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dt)
        refs[name, dt] = _run_epoch(REF, cfg, dt, weights, biases, X, Y, order, state, sw)
    for fn in ("train_epoch", "output_delta", "forward_network", "forward", "hidden_delta", "inplace_update",
               "optimizer_update", "sample_losses", "target_matrix", "n_correct", "_delta"):  # fmt: skip
        monkeypatch.setattr(reference, fn, boom)
    for name, dt in cases:
        cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dt)
        got = _run_epoch(cy_be, cfg, dt, weights, biases, X, Y, order, state, sw)
        np.testing.assert_allclose(got.loss_sum, refs[name, dt].loss_sum, rtol=LOSS_RTOL[dt])
        assert got.n_correct == refs[name, dt].n_correct
    A = np.exp(np.random.default_rng(0).normal(size=(9, 3)))
    cy_be.output_delta(A, np.ones((9, 3)), "exp", "poisson")
    cy_be.forward_network(A, [np.ones((2, 3))], [np.zeros(2)], "relu", "exp")


@needs_cython
def test_cython_kernels_check_their_arguments():
    """The raw kernels refuse arrays that do not fit (a ValueError, never a crash), before releasing the GIL."""
    import fastmlp.backends.cython as cy
    from fastmlp.backends.contract import EXP_CAP, OPTIMIZER_CODES

    assert cy._k.EXP_CAP == EXP_CAP and cy._k.OPTIMIZER_CODES == OPTIMIZER_CODES
    rng = np.random.default_rng(5)
    X = rng.normal(size=(20, 6))
    y = rng.integers(0, 3, 20)
    W, b = _network(rng, [6, 4, 3], "float64")
    thr = np.full(2, 1 << KEEP_BITS, np.int64)
    sc = np.ones(2)

    def call(**kw):
        args = dict(X=X, Y=y, order=np.arange(20), weights=W, biases=b, state_weights=[], state_biases=[],
                    lrs=np.full(3, 0.1), sample_weight=None, hidden_act=1, output_act=4, loss=1, target=0,
                    batch_size=8, l2=0.0, l1=0.0, alpha=0.0, thresholds=thr, scales=sc, optimizer=0, momentum=0.0,
                    beta1=0.0, beta2=0.0, eps=0.0, eps_mode=0, seed=0, step0=0, t0=0)  # fmt: skip
        args.update(kw)
        return cy._k.train_epoch(*args.values())

    ls, ps, nc = call()  # the arguments above are valid
    assert ls > 0 and ps == 0.0 and 0 <= nc <= 20
    bad = [dict(order=np.array([0, 20])), dict(order=np.array([-1])), dict(order=np.arange(20, dtype=np.int32)),
           dict(Y=y[:10]), dict(Y=y.astype(np.int32)), dict(target=1), dict(lrs=np.full(2, 0.1)),
           dict(sample_weight=np.ones(19)), dict(weights=[W[0], W[1].T.copy()]), dict(biases=b[:1]),
           dict(optimizer=3), dict(optimizer=9), dict(thresholds=thr[:1]), dict(output_act=2), dict(batch_size=0),
           dict(X=np.asfortranarray(X)), dict(X=X.astype(np.float32))]  # fmt: skip
    for kw in bad:
        with pytest.raises(ValueError):
            call(**kw)
    ro = W[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        call(weights=[ro, W[1]])
    out = np.empty((20, 3))
    with pytest.raises(ValueError):
        cy.output_delta(np.ones((20, 3)), np.ones((20, 2)), 4, 1, out)
    with pytest.raises(ValueError):
        cy.output_delta(np.ones((20, 3)), y[:5], 4, 1, out)
    with pytest.raises(ValueError):
        cy._k.forward_network(X, W, b, 1, 4, np.empty((20, 2)), 1)
    with pytest.raises(ValueError):
        cy.forward(X, W[0], b[1], 1, np.empty((20, 4)))


@needs_cython
def test_cython_describe():
    import fastmlp.backends.cython as cy

    line = cy.describe()
    assert f"variant {cy.VARIANT}" in line and ("debug build" in line) == bool(cy._k.DEBUG_BUILD)


# ------------------------------------------------------------------ minibatches in row chunks
CHUNKED = ["784-50-10", "784-50-10-all", "alpha-and-weights", "4-hidden-sigmoid-ce",
           "alpha-l1-l2", "momentum", "nesterov-alpha", "adam", "adamw", "gradient-full-batch",
           "multi-output-regression", "binary-one-unit-ce", "multilabel-ce", "soft-labels-softmax-ce"]


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
def test_minibatches_run_in_row_chunks_end_like_the_reference(monkeypatch, backend, dtype, name):
    """With the work-buffer budget cut to 7 rows, every minibatch's gradient is summed over chunks of 7 rows
    and applied once: weights, state, losses and counts equal the reference's unchunked epoch."""
    from fastmlp.backends import _chunked

    cfg, weights, biases, X, Y, order, state, sw = _epoch_case(name, dtype)
    W_ref, b_ref, state_ref = [w.copy() for w in weights], [b.copy() for b in biases], state.copy()
    ref = _run_epoch(REF, cfg, dtype, W_ref, b_ref, X, Y, order, state_ref, sw)
    plan = _plan(cfg, dtype, X.shape[0])
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 7 * _chunked.row_bytes(plan) + 3)
    assert _chunked.chunk_rows(plan) == 7 and _chunked.needs_chunks(plan, len(order))
    calls = []
    real = _chunked.chunked_epoch
    monkeypatch.setattr(_chunked, "chunked_epoch", lambda *a: calls.append(1) or real(*a))
    got = _run_epoch(get_backend(backend), cfg, dtype, weights, biases, X, Y, order, state, sw)
    assert calls, "the epoch did not run in chunks"
    for a, ar in zip(weights + biases + state.arrays(), W_ref + b_ref + state_ref.arrays()):
        assert np.abs(a - ar).max() <= EPOCH_TOL[dtype] * max(1.0, np.abs(ar).max())
    assert state.t == state_ref.t
    np.testing.assert_allclose(got.loss_sum, ref.loss_sum, rtol=LOSS_RTOL[dtype] * 10)
    np.testing.assert_allclose(got.penalty_sum, ref.penalty_sum, rtol=LOSS_RTOL[dtype])
    assert got.n_correct == ref.n_correct


def test_chunk_masks_number_rows_from_the_chunks_place():
    """A chunk's masks from ``row0`` are the rows ``row0 ..`` of the whole minibatch's masks."""
    from fastmlp.backends.contract import mask_bits_thr

    thr = keep_threshold(0.5)
    whole = mask_bits_thr(7, 3, 1, 20, 13, thr)
    for row0, n in ((0, 7), (7, 7), (14, 6)):
        np.testing.assert_array_equal(mask_bits_thr(7, 3, 1, n, 13, thr, row0), whole[row0 : row0 + n])
    assert not np.array_equal(mask_bits_thr(7, 3, 1, 7, 13, thr), whole[7:14])


@pytest.mark.parametrize("keep", [None, [0.8, 0.5]], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("backend", ["numpy", *COMPILED])
def test_full_batch_epoch_memory_does_not_grow_with_the_rows(monkeypatch, backend, keep):
    """A full-batch epoch over 16,000 x 784 float32 rows (50 MB) allocates a few MiB of work buffers with a
    4 MiB budget, not a gathered copy of X (unchunked: 58-66 MiB, the NumPy backend with dropout 395 MiB).
    Dropout chunks run through the NumPy reference, whose temporaries take about 7 budgets."""
    import tracemalloc

    from fastmlp.backends import _chunked
    from fastmlp.backends.contract import plan_epoch

    n = 16_000
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(n, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    weights, biases = _network(rng, [784, 50, 10], "float32")
    plan = plan_epoch([784, 50, 10], "float32", batch_size=n, hidden="sigmoid", output="sigmoid", loss="mse",
                      keep=keep)  # fmt: skip
    epochs = get_backend(backend).prepare(X, y, plan)
    order = np.arange(n)
    epochs(order, (weights, biases), None, 0.1)  # compiled and warmed up, unchunked
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 4 * 2**20)
    tracemalloc.start()
    try:
        epochs(order, (weights, biases), None, 0.1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (12 if keep is None else 40) * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert X.nbytes > (4 if keep is None else 1) * peak


@pytest.mark.skipif("cython" not in fastmlp.available_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("road", ["dot products on W", "outer products on W.T"])
@pytest.mark.parametrize(
    "sizes,hidden,output",
    [([1, 1], "sigmoid", "sigmoid"), ([5, 3, 2], "tanh", "softmax"), ([784, 100, 10], "relu", "softmax"),
     ([17, 9, 33, 4], "relu", "identity"), ([31, 7, 6, 5, 4, 3], "sigmoid", "sigmoid"), ([65, 130, 2], "tanh", "exp")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("n", [1, 5, 7, 300, 777])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_forward_network_roads(dtype, n, sizes, hidden, output, road):
    """Both inference roads of the Cython build (the dot-product kernel on W as stored for few rows, the
    outer-product kernel on transposed copies from ``_FORWARD_GEMM_ROWS`` rows) against the reference, on one
    and two threads, with the finiteness test of ``forward_network_checked`` on each."""
    from fastmlp.backends import cython as cy

    rng = _rng("roads", dtype, n, sizes)
    weights, biases = _network(rng, sizes, dtype)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    want = REF.forward_network(X, weights, biases, hidden, output)
    old = cy._k.set_forward_gemm_rows(1 if road.startswith("outer") else 10**9)
    try:
        for nth in (1, 2):
            out = np.full((n, sizes[-1]), np.nan, dtype)
            assert cy._k.forward_network(X, weights, biases, ACT[hidden], ACT[output], out, nth, True)
            _assert_close(out, want, dtype, f"{road}, {nth} threads")
            for arrs in (weights, biases):
                for arr in (arrs[0], arrs[-1]):
                    keep = arr.flat[-1]
                    for bad in (np.nan, np.inf, -np.inf):
                        arr.flat[-1] = bad
                        assert not cy._k.forward_network(X, weights, biases, ACT[hidden], ACT[output], out, nth, True)
                    arr.flat[-1] = keep
    finally:
        cy._k.set_forward_gemm_rows(old)


def _sparse_rows_x(rng, n, n_in, dtype):
    """Rows of every kind for the sparse first layer: all zeros, one nonzero (first or last column), MNIST-like
    (about 19 % nonzero), just under and over the share thresholds, dense, with -0.0 entries."""
    X = rng.uniform(0.1, 1.0, size=(n, n_in)) * (rng.uniform(size=(n, n_in)) < rng.uniform(0, 0.6, size=(n, 1)))
    X[::11] = 0.0
    X[1::13] = 0.0
    X[1::13, 0] = 0.7
    X[2::13] = 0.0
    X[2::13, -1] = -0.3
    X[3::17] = rng.normal(size=(len(X[3::17]), n_in))
    X[4::19] = 0.0
    X[4::19, ::2] = -0.0
    return X.astype(dtype)


@pytest.mark.skipif("cython" not in fastmlp.available_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("share", [None, 1.0, 0.0], ids=["by width", "every row sparse", "never"])
@pytest.mark.parametrize(
    "sizes,hidden,output",
    [([784, 100, 10], "relu", "softmax"), ([5, 3, 2], "tanh", "softmax"), ([37, 300, 19, 3], "relu", "identity"),
     ([65, 130, 2], "sigmoid", "exp"), ([1, 17, 4], "relu", "sigmoid"), ([33, 1, 2], "tanh", "sigmoid"),
     ([1100, 1030, 3], "relu", "softmax")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("n", [512, 777])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_forward_network_sparse_first_layer(dtype, n, sizes, hidden, output, share):
    """The outer-product road's sparse first layer (rows with few nonzeros compressed to them): against the
    reference on rows of every density, one and two threads; with the share fixed, a row's result depends on
    that row alone (the same bits when the rows come in another order), and a NaN or infinity in X reaches
    that row's output as in the dense product."""
    from fastmlp.backends import cython as cy

    if not cy.SIMD_INFER:
        pytest.skip("this build predicts through SciPy's BLAS: no outer-product road, no sparse first layer")
    rng = _rng("sparse-first", dtype, n, sizes)
    weights, biases = _network(rng, sizes, dtype)
    X = _sparse_rows_x(rng, n, sizes[0], dtype)
    want = REF.forward_network(X, weights, biases, hidden, output)
    old_rows = cy._k.set_forward_gemm_rows(1)
    old_share = cy._k.set_sparse_row_density(share)
    try:
        outs = []
        for nth in (1, 2):
            out = np.full((n, sizes[-1]), np.nan, dtype)
            assert cy._k.forward_network(X, weights, biases, ACT[hidden], ACT[output], out, nth, True)
            _assert_close(out, want, dtype, f"share {share}, {nth} threads")
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        perm = rng.permutation(n)
        out_p = np.empty_like(outs[0])
        cy._k.forward_network(np.ascontiguousarray(X[perm]), weights, biases, ACT[hidden], ACT[output], out_p, 2, True)
        if share is None:  # whether rows are looked at follows an even sample of the call's rows
            _assert_close(out_p, outs[0][perm], dtype, "rows in another order")
        else:
            np.testing.assert_array_equal(out_p, outs[0][perm], err_msg="a row's result depends on its neighbours")
        Xb = X.copy()
        Xb[5, sizes[0] // 2] = np.nan
        Xb[6, -1] = np.inf
        Xb[7, 0] = -np.inf
        out_b = np.empty_like(outs[0])
        cy._k.forward_network(Xb, weights, biases, ACT[hidden], ACT[output], out_b, 1, True)
        # the public API refuses such X; the raw kernel must still carry them as the dense product does
        want_b = np.empty_like(outs[0])
        prev = cy._k.set_sparse_row_density(0.0)
        cy._k.forward_network(Xb, weights, biases, ACT[hidden], ACT[output], want_b, 1, True)
        cy._k.set_sparse_row_density(prev)
        for r in (5, 6, 7):
            np.testing.assert_array_equal(np.isnan(out_b[r]), np.isnan(want_b[r]), err_msg=f"row {r}")
        keep = [r for r in range(n) if r not in (5, 6, 7)]
        np.testing.assert_array_equal(out_b[keep], outs[0][keep])
    finally:
        cy._k.set_sparse_row_density(old_share)
        cy._k.set_forward_gemm_rows(old_rows)


@pytest.mark.skipif("cython" not in fastmlp.available_backends(), reason="the cython backend is not built")
def test_cython_sparse_row_share_setting():
    from fastmlp.backends import cython as cy

    old = cy._k.set_sparse_row_density(0.5)
    try:
        assert cy._k.set_sparse_row_density(None) == 0.5
        assert cy._k.set_sparse_row_density(None) is None
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="density"):
                cy._k.set_sparse_row_density(bad)
    finally:
        cy._k.set_sparse_row_density(old)


@pytest.mark.skipif("cython" not in fastmlp.available_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_sparse_first_layer_follows_a_sample_of_the_rows(dtype):
    """Rows are looked at (and the sparse ones compressed) only when one of eight rows spread evenly over the
    call is sparse: a lone sparse row among dense ones away from the sample takes the dense product, the same
    row on a sampled place the sparse one."""
    from fastmlp.backends import cython as cy

    if not cy.SIMD_INFER:
        pytest.skip("this build predicts through SciPy's BLAS: no outer-product road, no sparse first layer")
    rng = _rng("sparse-sample", dtype)
    sizes = [784, 100, 10]
    weights, biases = _network(rng, sizes, dtype)
    n = 800
    X = rng.uniform(0.1, 1.0, size=(n, 784)).astype(dtype)
    sparse_row = (rng.uniform(0.1, 1.0, 784) * (rng.uniform(size=784) < 0.1)).astype(dtype)

    def run(Xc, share):
        old = cy._k.set_sparse_row_density(share)
        try:
            out = np.empty((n, 10), dtype)
            assert cy._k.forward_network(Xc, weights, biases, ACT["relu"], ACT["softmax"], out, 2, True)
            return out
        finally:
            cy._k.set_sparse_row_density(old)

    old_rows = cy._k.set_forward_gemm_rows(1)
    try:
        for place, road in ((1, 0.0), (n // 8, 1.0)):  # row 1 is off the sample, row n/8 on it
            Xc = X.copy()
            Xc[place] = sparse_row
            got = run(Xc, None)
            np.testing.assert_array_equal(got[place], run(Xc, road)[place], err_msg=f"row {place}")
            _assert_close(got, REF.forward_network(Xc, weights, biases, "relu", "softmax"), dtype)
    finally:
        cy._k.set_forward_gemm_rows(old_rows)
