"""Numba-specific tests: the parallel epoch, mask bit-identity, the vectorized exp, caching and config.

The shared suite (``tests/test_backends.py``) compares every public kernel of
every loaded backend with the reference; this file covers what only the Numba
backend has: the serial and parallel (``prange``) variants of the compiled
epoch with any number of row chunks, the polynomial ``exp`` behind the
sigmoid, the on-disk cache across processes, lazy compilation, and the flags
of :mod:`fastmlp.config`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from conftest import subprocess_env

import fastmlp
from fastmlp import get_backend
from fastmlp.backends.contract import ACT_CODES, KEEP_BITS, LOSS_CODES, VALID_OUTPUT_LOSS, keep_threshold, mask_bits

pytest.importorskip("numba", reason="the numba backend needs the numba package")
if "numba" not in fastmlp.available_backends():  # pragma: no cover - numba importable but backend broken
    pytest.skip(f"numba backend unavailable: {fastmlp.backends.backend_errors().get('numba')}", allow_module_level=True)

from fastmlp import config
from fastmlp.backends.numba import kernels as K
from fastmlp.backends import numba as NB
from fastmlp._threads import ThreadChoice

REF = get_backend("numpy")
NBE = get_backend("numba")
DTYPES = ("float32", "float64")
EPOCH_TOL = {"float32": 1e-4, "float64": 1e-9}
LOSS_RTOL = {"float32": 1e-5, "float64": 1e-12}


def _net(rng, sizes, dtype, scale=1.0):
    Ws = [(rng.normal(size=(sizes[i + 1], sizes[i])) * scale / np.sqrt(sizes[i])).astype(dtype) for i in range(len(sizes) - 1)]
    bs = [(rng.normal(size=sizes[i + 1]) * 0.1).astype(dtype) for i in range(len(sizes) - 1)]
    return Ws, bs


def _copy(ps):
    return [p.copy() for p in ps]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b, strict=True))


def _raw_epoch(dtype, parallel, n_chunks, X, y, order, Ws, bs, lrs, hidden, output, loss, batch_size, l2, l1, keep, seed,
               step0):  # fmt: skip
    """Call the compiled epoch directly with a chosen variant and chunk count (bypasses n_chunks_for)."""
    theta, sizes = NB._flat(Ws, bs)
    thr = np.array([min(keep_threshold(k), 1 << KEEP_BITS) for k in keep], dtype=np.int64)
    scales = np.array([1.0 / k for k in keep])
    n_steps = -(-order.shape[0] // batch_size)
    lrs = np.ascontiguousarray(np.broadcast_to(np.asarray(lrs, dtype=np.float64), (n_steps,)))
    out = K.train_epoch[dtype, parallel](
        X, y, order, theta, sizes, lrs, ACT_CODES[hidden], ACT_CODES[output], LOSS_CODES[loss], batch_size, l2, l1,
        thr, scales, np.uint64(seed), step0, n_chunks,
    )  # fmt: skip
    NB._unflat(theta, Ws, bs)
    return out


# ------------------------------------------------------------------------------------------- whole epoch
EPOCH_CASES = {
    # name: (sizes, n_samples, n_used, batch_size, hidden, output, loss, l2, l1, keep)
    "1x1": ([1, 1], 5, 5, 2, "sigmoid", "sigmoid", "mse", 0.0, 0.0, None),
    "batch1": ([6, 4, 3], 9, 9, 1, "tanh", "softmax", "ce", 1e-3, 0.0, [0.8, 0.6]),
    "mnistish-drop-l1-l2-partial": ([784, 50, 10], 230, 230, 64, "sigmoid", "sigmoid", "mse", 1e-2, 1e-3, [0.8, 0.5]),
    "deep4-relu": ([13, 11, 9, 7, 5], 101, 97, 40, "relu", "softmax", "mse", 0.0, 1e-3, [0.9, 0.5, 0.7, 0.6]),
    "deep3-identity": ([9, 8, 7, 3], 70, 70, 33, "identity", "identity", "mse", 5e-3, 0.0, None),
    "sigmoid-ce": ([17, 33, 4], 150, 150, 50, "tanh", "sigmoid", "ce", 0.0, 0.0, [1.0, 0.5]),
    "batch-larger-than-n": ([5, 3, 2], 20, 20, 64, "sigmoid", "softmax", "ce", 0.0, 0.0, None),
}


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", list(EPOCH_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_epoch_variants_match_reference(dtype, name, parallel, n_chunks):
    """Both compiled variants, with any chunk count (rows and W row-blocks split), equal the reference epoch."""
    sizes, n, n_used, bsz, hidden, output, loss, l2, l1, keep = EPOCH_CASES[name]
    rng = np.random.default_rng([len(name), n_chunks])
    Ws, bs = _net(rng, sizes, dtype, scale=1.0 if output == "identity" else 2.0)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], n)
    order = rng.permutation(n)[:n_used].astype(np.int64)
    n_steps = -(-n_used // bsz)
    lrs = np.linspace(0.3, 0.05, n_steps) * (0.05 if output == "identity" else 1.0)  # linear nets diverge fast
    keep = keep or [1.0] * (len(sizes) - 1)
    X0, y0, o0 = X.copy(), y.copy(), order.copy()
    W1, b1 = _copy(Ws), _copy(bs)
    ls1, nc1 = REF.train_epoch(X, y, order, W1, b1, lrs, hidden_act=hidden, output_act=output, loss=loss,
                               batch_size=bsz, l2=l2, l1=l1, keep=keep, seed=2**64 - 3, step0=11)  # fmt: skip
    W2, b2 = _copy(Ws), _copy(bs)
    ls2, nc2 = _raw_epoch(dtype, parallel, n_chunks, X, y, order, W2, b2, lrs, hidden, output, loss, bsz, l2, l1, keep,
                          2**64 - 3, 11)  # fmt: skip
    assert _max_diff(W1 + b1, W2 + b2) <= EPOCH_TOL[dtype]
    assert nc1 == nc2
    assert ls2 == pytest.approx(ls1, rel=LOSS_RTOL[dtype])
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(order, o0)


@pytest.mark.parametrize("pair", sorted(VALID_OUTPUT_LOSS), ids="-".join)
@pytest.mark.parametrize("hidden", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_epoch_every_activation_and_pair(dtype, hidden, pair):
    """Through the validating Backend (which picks the chunk count): every hidden activation and output/loss pair."""
    output, loss = pair
    rng = np.random.default_rng(7)
    sizes = [12, 9, 6, 4]
    Ws, bs = _net(rng, sizes, dtype, scale=1.5)
    X = rng.normal(size=(131, 12)).astype(dtype)
    y = rng.integers(0, 4, 131)
    order = rng.permutation(131)
    kw = dict(hidden_act=hidden, output_act=output, loss=loss, batch_size=40, l2=1e-3, l1=1e-4,
              keep=[0.7, 0.8, 0.5], seed=99, step0=3)  # fmt: skip
    W1, b1, W2, b2 = _copy(Ws), _copy(bs), _copy(Ws), _copy(bs)
    lr = 0.01 if output == "identity" else 0.2  # a linear output on unscaled data diverges at large lr
    r1 = REF.train_epoch(X, y, order, W1, b1, lr, **kw)
    r2 = NBE.train_epoch(X, y, order, W2, b2, lr, **kw)
    assert _max_diff(W1 + b1, W2 + b2) <= EPOCH_TOL[dtype]
    assert r2[1] == r1[1]
    assert r2[0] == pytest.approx(r1[0], rel=LOSS_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_and_numba_epochs_agree(dtype):
    """Cython and Numba whole epochs (784-50-10, dropout, L1, L2, partial last batch) agree with each other."""
    if "cython" not in fastmlp.available_backends():
        pytest.skip(f"cython backend not available: {fastmlp.backends.backend_errors().get('cython')}")
    cy = get_backend("cython")
    rng = np.random.default_rng(5)
    Ws, bs = _net(rng, [784, 50, 10], dtype)
    X = rng.random((1050, 784)).astype(dtype)
    y = rng.integers(0, 10, 1050)
    order = rng.permutation(1050)
    kw = dict(hidden_act="sigmoid", output_act="sigmoid", loss="mse", batch_size=100, l2=1e-3, l1=1e-4,
              keep=[0.8, 0.5], seed=42, step0=550)  # fmt: skip
    W1, b1, W2, b2 = _copy(Ws), _copy(bs), _copy(Ws), _copy(bs)
    r1 = cy.train_epoch(X, y, order, W1, b1, 0.1, **kw)
    r2 = NBE.train_epoch(X, y, order, W2, b2, 0.1, **kw)
    assert _max_diff(W1 + b1, W2 + b2) <= EPOCH_TOL[dtype]
    assert r1[1] == r2[1]
    assert r1[0] == pytest.approx(r2[0], rel=LOSS_RTOL[dtype])


def test_parallel_epoch_restores_blas_threads(monkeypatch):
    """A multi-threaded epoch pins BLAS to one thread while it runs and restores the previous limits."""
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "PARALLEL", True)
    if config.num_threads() < 2:
        pytest.skip("Numba's thread pool has one thread here")
    before = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    rng = np.random.default_rng(0)
    Ws, bs = _net(rng, [20, 8, 3], "float64")
    X = rng.normal(size=(200, 20))
    assert NB.n_chunks_for(100, [20, 8, 3]) == 2
    NBE.train_epoch(X, rng.integers(0, 3, 200), np.arange(200), Ws, bs, 0.1, batch_size=100)
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    assert {k: after[k] for k in before} == before


class _FixedChoice(ThreadChoice):
    """Always the same thread count (capped by the chunks)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def choose(self, key: tuple, n_blocks: int) -> int:
        return min(self.n, n_blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_choice_never_changes_the_result(monkeypatch, dtype):
    """The chunks follow the shape, so the serial variant (one thread) and the parallel one (two) compute the
    same bits, with dropout, L1, L2 and a partial last batch: choosing threads by speed is free."""
    monkeypatch.setattr(config, "NUM_THREADS", None)
    monkeypatch.setattr(config, "PARALLEL", True)
    if config.num_threads() < 2:
        pytest.skip("Numba's thread pool has one thread here")
    rng = np.random.default_rng(3)
    W0, b0 = _net(rng, [37, 21, 9, 5], dtype)
    X = rng.normal(size=(203, 37)).astype(dtype)
    y = rng.integers(0, 5, 203)
    order = rng.permutation(203)
    assert NB.n_chunks_for(64, [37, 21, 9, 5]) == 2
    results = []
    for n in (1, 2):
        monkeypatch.setattr(NB, "_choice", _FixedChoice(n))
        Ws, bs = _copy(W0), _copy(b0)
        r = NBE.train_epoch(X, y, order, Ws, bs, 0.2, hidden_act="tanh", output_act="softmax", loss="ce",
                            batch_size=64, l2=1e-3, l1=1e-4, keep=[0.8, 0.5, 0.5], seed=7, step0=3)  # fmt: skip
        results.append((Ws + bs, r))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results[0][1] == results[1][1]


def test_thread_choice_is_measured_and_env_wins(monkeypatch):
    """Left to itself the epoch times its thread counts; FASTMLP_NUM_THREADS bypasses the measurement."""
    monkeypatch.setattr(config, "PARALLEL", True)
    if config.num_threads() < 2:
        pytest.skip("Numba's thread pool has one thread here")
    rng = np.random.default_rng(4)
    Ws, bs = _net(rng, [20, 8, 3], "float64")
    X, y = rng.normal(size=(200, 20)), rng.integers(0, 3, 200)
    monkeypatch.setattr(config, "NUM_THREADS", None)
    monkeypatch.setattr(NB, "_choice", ThreadChoice())
    for _ in range(4):  # compile both variants, then one timed epoch with each
        NBE.train_epoch(X, y, np.arange(200), Ws, bs, 0.1, batch_size=100)
    (speeds,) = NB._choice.speed.values()
    assert set(speeds) == {1, 2} and all(v > 0 for v in speeds.values())
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(NB, "_choice", ThreadChoice())
    NBE.train_epoch(X, y, np.arange(200), Ws, bs, 0.1, batch_size=100)
    assert NB._choice.speed == {}


def test_n_chunks_for_small_batches(monkeypatch):
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "PARALLEL", True)
    if config.num_threads() < 2:
        pytest.skip("Numba's thread pool has one thread here")
    assert NB.n_chunks_for(1, [4, 2]) == 1
    assert NB.n_chunks_for(2 * NB.MIN_ROWS_PER_THREAD - 1, [4, 2]) == 1
    assert NB.n_chunks_for(2 * NB.MIN_ROWS_PER_THREAD, [4, 2]) == 2
    monkeypatch.setattr(config, "PARALLEL", False)
    assert NB.n_chunks_for(1000, [4, 2]) == 1


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (100, 784), (64, 50)], ids=str)
@pytest.mark.parametrize("keep", [0.5, 0.1, 0.999, 1.0 - 2.0**-24])
def test_mask_bits_identical_to_contract(seed, shape, keep):
    """The compiled splitmix64 draws the contract's mask bit for bit (uint64 wrap-around included)."""
    for step, layer in [(0, 0), (1, 2), (10**12, 0), (2**62, 5)]:
        want = mask_bits(seed, step, layer, *shape, keep).astype(np.float32) * np.float32(3.0)
        got = np.empty(shape, np.float32)
        NB.dropout_mask(seed, step, layer, keep_threshold(keep), 3.0, got)
        np.testing.assert_array_equal(got, want)


def test_epoch_mask_rows_continue_across_chunks():
    """The mask of row r uses its index in the whole minibatch, not in its chunk: 3 chunks = 1 chunk."""
    rng = np.random.default_rng(3)
    Ws, bs = _net(rng, [30, 20, 5], "float64")
    X = rng.normal(size=(90, 30))
    y = rng.integers(0, 5, 90)
    order = np.arange(90, dtype=np.int64)
    args = (X, y, order)
    W1, b1, W3, b3 = _copy(Ws), _copy(bs), _copy(Ws), _copy(bs)
    common = (0.1, "sigmoid", "softmax", "ce", 45, 0.0, 0.0, [0.5, 0.5], 17, 0)
    r1 = _raw_epoch("float64", True, 1, *args, W1, b1, *common)
    r3 = _raw_epoch("float64", True, 3, *args, W3, b3, *common)
    assert _max_diff(W1 + b1, W3 + b3) <= 1e-12
    assert r1[1] == r3[1]


# --------------------------------------------------------------------------------------------------- exp
@pytest.mark.parametrize("dtype", DTYPES)
def test_polynomial_exp_accuracy(dtype):
    """The vectorizable exp is within 2 ulp of a correctly rounded exp over its whole clamped range."""
    import numba

    @numba.njit
    def vexp(x, out):
        for j in range(x.shape[0]):
            out[j] = K._vexp(x[j])

    hi = 708.0 if dtype == "float64" else 87.0
    x = np.concatenate([np.linspace(-hi, hi, 200_001), np.linspace(-1, 1, 10_001), [0.0, -0.0]]).astype(dtype)
    out = np.empty_like(x)
    vexp(x, out)
    ref = np.exp(x.astype(np.float64))
    if dtype == "float32":
        ref = ref.astype(np.float32)
    ulp = np.abs(out.astype(np.float64) - ref.astype(np.float64)) / np.spacing(ref).astype(np.float64)
    assert ulp.max() <= 2.0
    assert (out[x == 0] == 1.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_nan(dtype):
    """Pre-activations far beyond exp's range give 0 and 1 (the reference's limits), never NaN."""
    A = np.array([[1.0]], dtype=dtype)
    W = np.array([[1.0]], dtype=dtype)
    for z, want in [(1e4, 1.0), (-1e4, 0.0), (1e30, 1.0), (-1e30, 0.0)]:
        out = NBE.forward(A, W, np.array([z], dtype=dtype), "sigmoid")
        assert np.isfinite(out).all()
        assert float(out[0, 0]) == pytest.approx(want, abs=1e-30)


# ------------------------------------------------------------------------------------------- compilation
def _run(code: str, env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=subprocess_env(**env), capture_output=True,
                         text=True, cwd=tempfile.gettempdir(), timeout=600, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_import_compiles_nothing():
    """Importing the backend (as available_backends() does) neither imports the kernels nor compiles."""
    out = _run(
        """
        import json, sys, fastmlp
        fastmlp.available_backends()
        import fastmlp.backends.numba as nb
        print(json.dumps({"kernels_imported": "fastmlp.backends.numba.kernels" in sys.modules, "loaded": nb._kernels is not None}))
        """,
        {},
    )
    assert json.loads(out) == {"kernels_imported": False, "loaded": False}


def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    """A fresh process reuses what the first compiled: cache hits, no misses, index files on disk."""
    code = """
        import json, numpy as np, fastmlp
        from fastmlp.backends.numba import kernels as K
        be = fastmlp.get_backend("numba")
        rng = np.random.default_rng(0)
        W = [rng.normal(size=(4, 6)), rng.normal(size=(3, 4))]
        b = [np.zeros(4), np.zeros(3)]
        X = rng.normal(size=(50, 6))
        be.train_epoch(X, rng.integers(0, 3, 50), np.arange(50), W, b, 0.1, batch_size=10)
        be.forward(X, W[0], b[0], "sigmoid")
        st = [K.train_epoch["float64"].stats, K.forward["float64"].stats]
        print(json.dumps({"hits": sum(sum(s.cache_hits.values()) for s in st),
                          "misses": sum(sum(s.cache_misses.values()) for s in st)}))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "FASTMLP_NUMBA_CACHE": "1"}
    first = json.loads(_run(code, env))
    second = json.loads(_run(code, env))
    assert first["misses"] == 2 and first["hits"] == 0
    assert second == {"hits": 2, "misses": 0}
    names = [p.name for p in tmp_path.rglob("*.nbi")]
    assert any(n.startswith("kernels.train_epoch__par0_") for n in names), names


def test_cache_variants_are_named_by_flags():
    """Numba's cache index ignores compiler flags, so each flag combination compiles under its own name."""
    disp = K.forward["float64"]
    qual = disp.py_func.__qualname__
    assert qual.startswith("forward__par0_fm")
    assert f"_bc{int(config.BOUNDSCHECK)}" in qual
    assert repr(K.forward).startswith("LazyKernel('forward'")


def test_compiled_kernel_rejects_other_types():
    """Explicit signatures: an argument of the wrong type raises instead of compiling a new specialization."""
    A = np.ones((2, 3), np.float32)
    W = np.ones((4, 3), np.float64)
    with pytest.raises(TypeError):
        K.forward["float64"](A, W, np.zeros(4), 1, np.empty((2, 4)))


# ------------------------------------------------------------------------------------------------ config
def test_jit_options_defaults():
    opts = config.jit_options()
    assert set(opts) == {"fastmath", "cache", "boundscheck", "nogil", "error_model", "parallel"}
    assert opts["parallel"] is False
    assert config.jit_options(parallel=True)["parallel"] is config.PARALLEL
    assert opts["error_model"] == "numpy"


@pytest.mark.parametrize(
    "raw, want",
    [(None, config.SAFE_FASTMATH), ("safe", config.SAFE_FASTMATH), ("1", True), ("full", True), ("0", False)],
)
def test_fastmath_env(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("FASTMLP_NUMBA_FASTMATH", raising=False)
    else:
        monkeypatch.setenv("FASTMLP_NUMBA_FASTMATH", raw)
    assert config._env_fastmath("FASTMLP_NUMBA_FASTMATH") == want


def test_safe_fastmath_keeps_nan_semantics():
    assert not {"nnan", "ninf", "fast"} & config.SAFE_FASTMATH


@pytest.mark.parametrize(
    "name, raw",
    [("FASTMLP_NUMBA_FASTMATH", "maybe"), ("FASTMLP_NUMBA_PARALLEL", "2"), ("FASTMLP_NUM_THREADS", "0"),
     ("FASTMLP_NUM_THREADS", "two")],
)  # fmt: skip
def test_bad_env_values_raise(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    parse = {"FASTMLP_NUMBA_FASTMATH": config._env_fastmath, "FASTMLP_NUM_THREADS": config._env_threads}.get(
        name, lambda n: config._env_bool(n, True)
    )
    with pytest.raises(ValueError, match=name):
        parse(name)


def test_num_threads_capped_by_numba_pool(monkeypatch):
    import numba

    monkeypatch.setattr(config, "NUM_THREADS", 10_000)
    assert config.num_threads() == numba.config.NUMBA_NUM_THREADS
    monkeypatch.setattr(config, "NUM_THREADS", 1)
    assert config.num_threads() == 1


def test_env_flags_reach_a_fresh_process(tmp_path):
    """Environment overrides are read at import; a serial, strict-IEEE build still matches the reference."""
    out = _run(
        """
        import json, numpy as np, fastmlp
        from fastmlp import config
        from fastmlp.backends.numba import kernels as K
        ref, be = fastmlp.get_backend("numpy"), fastmlp.get_backend("numba")
        rng = np.random.default_rng(1)
        W = [rng.normal(size=(5, 7)), rng.normal(size=(3, 5))]
        b = [np.zeros(5), np.zeros(3)]
        W2, b2 = [w.copy() for w in W], [x.copy() for x in b]
        X = rng.normal(size=(64, 7)); y = rng.integers(0, 3, 64); o = rng.permutation(64)
        kw = dict(batch_size=32, keep=[0.7, 0.5], l2=1e-3, seed=4)
        ref.train_epoch(X, y, o, W, b, 0.1, **kw); be.train_epoch(X, y, o, W2, b2, 0.1, **kw)
        d = max(float(np.abs(p - q).max()) for p, q in zip(W + b, W2 + b2))
        print(json.dumps({"fm": config.FASTMATH, "par": config.PARALLEL, "thr": config.NUM_THREADS, "diff": d,
                          "qual": K.train_epoch["float64"].py_func.__qualname__}))
        """,
        {"FASTMLP_NUMBA_FASTMATH": "0", "FASTMLP_NUMBA_PARALLEL": "0", "FASTMLP_NUM_THREADS": "1",
         "NUMBA_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    got = json.loads(out)
    assert (got["fm"], got["par"], got["thr"]) == (False, False, 1)
    assert got["diff"] <= 1e-9
    assert got["qual"] == "train_epoch__par0_fmoff_bc0"
