"""Numba-specific tests: the parallel epoch, threads, mask bit-identity, the vectorized exp, caching and config.

The shared suite (``tests/test_backends.py``) compares every public kernel of
every loaded backend with the reference; this file covers what only the Numba
backend has: the serial and parallel (``prange``) variants of the compiled
epoch with any number of row blocks, the thread count (never the result), the
polynomial ``exp`` behind the sigmoid, the softmax and the exp output, the
on-disk cache across processes, lazy compilation, and the flags of
:mod:`fastmlp.config`.
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
from fastmlp.backends.contract import (
    EXP_CAP,
    HIDDEN_ACTIVATIONS,
    VALID_OUTPUT_LOSS,
    OptimizerState,
    keep_threshold,
    mask_bits,
    plan_epoch,
)

pytest.importorskip("numba", reason="the numba backend needs the numba package")
if "numba" not in fastmlp.available_backends():  # pragma: no cover - numba importable but backend broken
    pytest.skip(f"numba backend unavailable: {fastmlp.backends.backend_errors().get('numba')}", allow_module_level=True)

import numba

from fastmlp import _threads, config
from fastmlp._threads import ThreadChoice
from fastmlp.backends import numba as NB
from fastmlp.backends import reference
from fastmlp.backends.numba import kernels as K

REF = get_backend("numpy")
NBE = get_backend("numba")
DTYPES = ("float32", "float64")
EPOCH_TOL = {"float32": 1e-4, "float64": 1e-9}
LOSS_RTOL = {"float32": 1e-5, "float64": 1e-12}
#: layer widths and batch that n_blocks cuts into 2 row blocks (160 x 128 x 100 multiply-adds >= 2e6)
TWO_BLOCKS = ([128, 160, 5], 100)

needs_two_threads = pytest.mark.skipif(config.pool_size() < 2, reason="Numba's thread pool has one thread here")


def _net(rng, sizes, dtype, scale=1.0):
    Ws = [(rng.normal(size=(o, i)) * scale / np.sqrt(i)).astype(dtype) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    bs = [(rng.normal(size=o) * 0.1).astype(dtype) for o in sizes[1:]]
    return Ws, bs


def _copy(ps):
    return [p.copy() for p in ps]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b, strict=True))


def _state(plan, rng, t0=0):
    """A state mid-run: velocities of both signs, positive second moments."""
    state = OptimizerState.zeros(plan.optimizer, plan.sizes, plan.dtype)
    for a in state.arrays():
        a[...] = rng.normal(size=a.shape) * 1e-2
    if plan.optimizer in ("adam", "adamw"):
        for v in (*state.weights[1], *state.biases[1]):
            np.abs(v, out=v)
    state.t = t0
    return state


def _targets(rng, plan, n):
    k = plan.sizes[-1]
    if plan.target == "labels":
        return rng.integers(0, max(k, 2), n).astype(np.int64)
    if plan.loss == "poisson":
        return rng.poisson(2.0, size=(n, k)).astype(plan.dtype)
    if plan.output == "sigmoid":
        return (rng.uniform(size=(n, k)) < 0.4).astype(plan.dtype)
    if plan.output == "softmax":
        p = rng.uniform(0.05, 1, size=(n, k))
        return (p / p.sum(1, keepdims=True)).astype(plan.dtype)
    return rng.normal(size=(n, k)).astype(plan.dtype)


def _opt_fields(opt):
    if opt in ("momentum", "nesterov"):
        return dict(momentum=0.9)
    if opt in ("adam", "adamw"):
        return dict(beta1=0.9, beta2=0.999, eps=1e-8, eps_mode="torch" if opt == "adamw" else "sklearn")
    return {}


class _Case:
    """One epoch's inputs (validated forms, as the raw kernels receive them) and a fresh copy on demand."""

    def __init__(self, dtype, sizes, n, n_used, batch, *, seed=0, lr=0.1, weights=False, t0=0, step0=11, **plan_kw):
        rng = np.random.default_rng([seed, len(sizes), n, batch])
        opt = plan_kw.pop("optimizer", "sgd")
        self.plan = plan_epoch(sizes, dtype, batch_size=batch, optimizer=opt, seed=2**64 - 3, **_opt_fields(opt),
                               **plan_kw)  # fmt: skip
        # small initial weights for the unbounded outputs (an exp output explodes fast)
        self.W, self.b = _net(rng, sizes, dtype, scale={"identity": 1.0, "exp": 0.3}.get(self.plan.output, 2.0))
        self.X = rng.normal(size=(n, sizes[0])).astype(dtype)
        self.Y = _targets(rng, self.plan, n)
        self.order = rng.permutation(n)[:n_used].astype(np.int64)
        self.lrs = np.linspace(lr, lr / 3, self.plan.n_steps(n_used))
        self.sw = rng.uniform(0.1, 3.0, n) if weights else None
        self.state = _state(self.plan, rng, t0)
        self.step0 = step0

    def fresh(self):
        return _copy(self.W), _copy(self.b), self.state.copy()

    def run_ref(self):
        W, b, st = self.fresh()
        r = reference.train_epoch(self.X, self.Y, self.order, W, b, st, self.lrs, self.plan, self.step0, self.sw)
        return W, b, st, r

    def run_numba(self, **how):
        W, b, st = self.fresh()
        r = NB._epoch(self.X, self.Y, self.order, W, b, st, self.lrs, self.plan, self.step0, self.sw, **how)
        return W, b, st, r


def _assert_epoch_close(got, want, dtype):
    W1, b1, s1, r1 = want
    W2, b2, s2, r2 = got
    tol = EPOCH_TOL[dtype]
    assert _max_diff(W1 + b1, W2 + b2) <= tol * max(1.0, max(float(np.abs(p).max()) for p in W1 + b1))
    assert s2.t == s1.t
    for a, ar in zip(s2.arrays(), s1.arrays(), strict=True):
        assert np.abs(a - ar).max() <= tol * max(1.0, np.abs(ar).max())
    assert r2[0] == pytest.approx(r1[0], rel=LOSS_RTOL[dtype])
    assert r2[1] == pytest.approx(r1[1], rel=LOSS_RTOL[dtype])
    assert r2[2] == r1[2]


def _assert_same_bits(a, b):
    W1, b1, s1, r1 = a
    W2, b2, s2, r2 = b
    for x, y in zip(W1 + b1 + s1.arrays(), W2 + b2 + s2.arrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert r1 == r2
    assert s1.t == s2.t


# ------------------------------------------------------------------------------------------- whole epoch
EPOCH_CASES = {
    # name: (sizes, n_samples, n_used, batch_size, plan and case options)
    "1x1": ([1, 1], 5, 5, 2, dict(hidden="sigmoid", output="sigmoid", loss="mse")),
    "batch1": ([6, 4, 3], 9, 9, 1, dict(hidden="tanh", output="softmax", loss="ce", l2=1e-3, keep=[0.8, 0.6])),
    "mnistish-drop-l1-l2-partial": ([784, 50, 10], 230, 230, 64, dict(hidden="sigmoid", output="sigmoid", loss="mse",
                                                                      l2=1e-2, l1=1e-3, keep=[0.8, 0.5])),
    "deep4-relu-nesterov": ([13, 11, 9, 7, 5], 101, 97, 40, dict(hidden="relu", output="softmax", loss="mse", l1=1e-3,
                                                                 keep=[0.9, 0.5, 0.7, 0.6], optimizer="nesterov")),
    "deep3-identity-momentum": ([9, 8, 7, 3], 70, 70, 33, dict(hidden="identity", output="identity", loss="mse",
                                                              l2=5e-3, optimizer="momentum", lr=0.01)),
    "sigmoid-ce-binary": ([17, 33, 1], 150, 150, 50, dict(hidden="tanh", output="sigmoid", loss="ce", keep=[1.0, 0.5],
                                                          alpha=1e-3)),
    "multilabel-weighted-adam": ([17, 12, 4], 150, 131, 50, dict(hidden="relu", output="sigmoid", loss="ce",
                                                                 target="dense", weights=True, optimizer="adam",
                                                                 lr=1e-3, t0=5, alpha=1e-2)),
    "regression-adamw": ([9, 8, 3], 70, 70, 16, dict(hidden="tanh", output="identity", loss="squared_error",
                                                     target="dense", optimizer="adamw", l2=1e-2, lr=1e-3)),
    "poisson-weighted": ([7, 6, 2], 60, 55, 8, dict(hidden="relu", output="exp", loss="poisson", target="dense",
                                                    weights=True, lr=0.01, keep=[0.9, 0.8])),
    "soft-labels-gradient": ([15, 10, 4], 70, 70, 70, dict(hidden="sigmoid", output="softmax", loss="ce",
                                                           target="dense", optimizer="gradient", alpha=1e-3)),
    "batch-larger-than-n": ([5, 3, 2], 20, 20, 64, dict(hidden="sigmoid", output="softmax", loss="ce")),
}


def _case(name, dtype, **extra):
    sizes, n, n_used, batch, kw = EPOCH_CASES[name]
    return _Case(dtype, sizes, n, n_used, batch, seed=len(name), **{**kw, **extra})


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", list(EPOCH_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_epoch_variants_match_reference(dtype, name, parallel, n_chunks):
    """Both compiled variants, with any block count (rows and W row-blocks split), equal the reference epoch."""
    case = _case(name, dtype)
    X0, Y0, o0 = case.X.copy(), case.Y.copy(), case.order.copy()
    want = case.run_ref()
    got = case.run_numba(n_chunks=n_chunks, parallel=parallel, n_threads=min(2, config.pool_size()))
    _assert_epoch_close(got, want, dtype)
    if case.plan.alpha:
        assert want[3][1] > 0
    np.testing.assert_array_equal(case.X, X0)
    np.testing.assert_array_equal(case.Y, Y0)
    np.testing.assert_array_equal(case.order, o0)


@pytest.mark.parametrize("target", ["labels", "dense"])
@pytest.mark.parametrize("pair", sorted(VALID_OUTPUT_LOSS), ids="-".join)
@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_epoch_every_activation_and_pair(dtype, hidden, pair, target):
    """Through the validating Backend (which picks the blocks): every hidden activation, output/loss pair and
    target kind, with dropout, L1 and L2."""
    output, loss = pair
    case = _Case(dtype, [12, 9, 6, 4], 131, 131, 40, seed=7, hidden=hidden, output=output, loss=loss, target=target,
                 l2=1e-3, l1=1e-4, keep=[0.7, 0.8, 0.5], lr={"identity": 0.01, "exp": 1e-3}.get(output, 0.2))  # fmt: skip
    results = []
    for be in (REF, NBE):
        W, b, st = case.fresh()
        r = be.train_epoch(case.X, case.Y, case.order, (W, b), st, case.lrs, case.plan, 3)
        results.append((W, b, st, tuple(r)))
    _assert_epoch_close(results[1], results[0], dtype)


def test_no_reference_fallback(monkeypatch):
    """Every entry point of the Numba backend runs compiled: with the reference's functions broken, the new
    features (dense targets, the exp output, Poisson, sample weights, alpha, Adam) still work."""

    def broken(*args, **kwargs):
        raise AssertionError("the numba backend called the reference")

    for name in ("train_epoch", "output_delta", "forward_network", "forward", "hidden_delta", "inplace_update",
                 "dropout_mask", "optimizer_update", "sample_losses", "target_matrix"):  # fmt: skip
        monkeypatch.setattr(reference, name, broken)
    case = _case("poisson-weighted", "float64", optimizer="adam", alpha=1e-3)
    W, b, st = case.fresh()
    NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, case.lrs, case.plan, 0, sample_weight=case.sw)
    assert st.t == case.plan.n_steps(len(case.order))
    A = NBE.forward_network(case.X, W, b, "relu", "exp")
    assert (A > 0).all()
    NBE.output_delta(A, case.Y, "exp", "poisson")
    NBE.output_delta(A[:, :1], (case.Y[:, 0] > 1).astype(np.int64), "sigmoid", "ce")


def test_gradient_optimizer_stores_the_gradient_and_keeps_t():
    case = _case("soft-labels-gradient", "float64")
    W, b, st, r = case.run_numba(n_chunks=1, parallel=False, n_threads=1)
    assert st.t == case.state.t
    for p, p0 in zip(W + b, case.W + case.b, strict=True):
        np.testing.assert_array_equal(p, p0)  # no step
    assert all(np.abs(g).max() > 0 for g in st.arrays())
    assert r[1] > 0  # the alpha penalty of the weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_and_numba_epochs_agree(dtype):
    """Cython and Numba whole epochs (784-50-10, dropout, L1, L2, partial last batch) agree with each other."""
    if "cython" not in fastmlp.available_backends():
        pytest.skip(f"cython backend not available: {fastmlp.backends.backend_errors().get('cython')}")
    cy = get_backend("cython")
    case = _Case(dtype, [784, 50, 10], 1050, 1050, 100, seed=5, hidden="sigmoid", output="sigmoid", loss="mse",
                 l2=1e-3, l1=1e-4, keep=[0.8, 0.5])  # fmt: skip
    results = []
    for be in (cy, NBE):
        W, b, st = case.fresh()
        r = be.train_epoch(case.X, case.Y, case.order, (W, b), st, case.lrs, case.plan, 550)
        results.append((W, b, st, tuple(r)))
    _assert_epoch_close(results[1], results[0], dtype)


# ------------------------------------------------------------------------------------------- threads
def test_n_chunks_follow_the_shape_only(monkeypatch):
    """The blocks are _threads.n_blocks of the layer sizes and the batch (capped by the rows used), whatever
    the thread budget; 1 when the parallel variant is switched off."""
    monkeypatch.setattr(config, "PARALLEL", True)
    sizes, batch = TWO_BLOCKS
    assert NB.n_chunks_for(sizes, batch, 10_000) == _threads.n_blocks(sizes, batch) == 2
    assert NB.n_chunks_for([784, 50, 10], 1000, 10_000) == _threads.n_blocks([784, 50, 10], 1000) == 8
    assert NB.n_chunks_for([784, 50, 10], 1000, 200) == _threads.n_blocks([784, 50, 10], 200)
    assert NB.n_chunks_for([4, 2], 1000, 10_000) == 1  # too little work a block
    assert NB.n_chunks_for(sizes, 63, 10_000) == 1  # too few rows a block
    with _threads.thread_limit(1):
        assert NB.n_chunks_for(sizes, batch, 10_000) == 2
    monkeypatch.setattr(config, "PARALLEL", False)
    assert NB.n_chunks_for([784, 50, 10], 1000, 10_000) == 1


class _Recorder:
    """Stands in for NB._on_threads and notes the thread counts of the parallel calls."""

    def __init__(self):
        self.n_threads = []
        self._real = NB._on_threads

    def __call__(self, kern, args, n_threads):
        self.n_threads.append(n_threads)
        return self._real(kern, args, n_threads)


@needs_two_threads
@pytest.mark.parametrize("n_chunks", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_never_changes_the_bits(dtype, n_chunks):
    """The parallel-compiled epoch on one thread and on two gives the same bits: the blocks follow the shape.
    With dropout, L1, alpha, sample weights, Adam and a partial last batch."""
    case = _Case(dtype, [37, 21, 9, 5], 203, 203, 64, seed=3, hidden="tanh", output="softmax", loss="ce", l2=1e-3,
                 l1=1e-4, alpha=1e-3, keep=[0.8, 0.5, 0.5], weights=True, optimizer="adam", lr=1e-2, t0=4)  # fmt: skip
    runs = []
    before = numba.get_num_threads()
    for n_threads in (1, 2):
        with _threads.blas_pinned():
            runs.append(case.run_numba(n_chunks=n_chunks, parallel=True, n_threads=n_threads))
    assert numba.get_num_threads() == before  # restored
    _assert_same_bits(runs[0], runs[1])
    _assert_epoch_close(runs[1], case.run_ref(), dtype)


@needs_two_threads
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_choice_never_changes_the_result(monkeypatch, dtype):
    """Through train_epoch: the measured thread choice picking one thread or two gives the same bits."""
    sizes, batch = TWO_BLOCKS
    case = _Case(dtype, sizes, 250, 250, batch, seed=9, hidden="relu", output="softmax", loss="ce", l2=1e-3, l1=1e-4,
                 keep=[0.8, 0.5], optimizer="momentum", weights=True)  # fmt: skip
    monkeypatch.setattr(_threads, "thread_budget", lambda: 2)
    results = []
    for n in (1, 2):
        rec = _Recorder()
        monkeypatch.setattr(NB, "_on_threads", rec)
        monkeypatch.setattr(NB, "_choice", _FixedChoice(n))
        W, b, st = case.fresh()
        r = NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, case.lrs, case.plan, 3, sample_weight=case.sw)
        assert rec.n_threads == [n]  # the parallel variant, on one thread too
        results.append((W, b, st, tuple(r)))
    _assert_same_bits(results[0], results[1])


class _FixedChoice(ThreadChoice):
    """Always the same thread count (capped by what may run)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def choose(self, key: tuple, n: int) -> int:
        return min(self.n, n)


@needs_two_threads
def test_parallel_epoch_restores_blas_threads(monkeypatch):
    """A multi-threaded epoch pins BLAS to one thread while it runs and restores the previous limits."""
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(_threads, "thread_budget", lambda: 2)
    monkeypatch.setattr(NB, "_choice", _FixedChoice(2))
    sizes, batch = TWO_BLOCKS
    case = _Case("float64", sizes, 250, 250, batch, hidden="sigmoid", output="softmax", loss="ce")
    seen = []
    real = NB._on_threads

    def spy(kern, args, n_threads):
        seen.append((n_threads, _threads.pinned()))
        return real(kern, args, n_threads)

    monkeypatch.setattr(NB, "_on_threads", spy)
    before = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    W, b, st = case.fresh()
    NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, 0.1, case.plan)
    assert seen == [(2, True)]
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    assert {k: after[k] for k in before} == before
    assert not _threads.pinned()


@needs_two_threads
def test_thread_choice_is_measured_and_capped(monkeypatch):
    """Left to itself the epoch times one and two threads (compiling is not timed); the budget and Numba's
    pool cap the count, and a budget of one thread runs the parallel variant on one thread."""
    sizes, batch = TWO_BLOCKS
    case = _Case("float64", sizes, 200, 200, batch, hidden="sigmoid", output="softmax", loss="ce")
    rec = _Recorder()
    monkeypatch.setattr(NB, "_on_threads", rec)
    monkeypatch.setattr(_threads, "thread_budget", lambda: 2)
    monkeypatch.setattr(NB, "_choice", ThreadChoice())
    for _ in range(4):
        W, b, st = case.fresh()
        NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, 0.1, case.plan)
    (speeds,) = NB._choice.speed.values()
    assert set(speeds) == {1, 2} and all(v > 0 for v in speeds.values())
    # two threads timed twice (the first epoch is cold), then one; once more when the first call compiled
    assert rec.n_threads[:4] == [2, 2, 2, 1] or rec.n_threads[:3] == [2, 2, 1]
    monkeypatch.setattr(_threads, "thread_budget", lambda: 10_000)
    rec.n_threads.clear()
    monkeypatch.setattr(NB, "_choice", _FixedChoice(10_000))
    NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, 0.1, case.plan)
    assert rec.n_threads == [min(2, config.pool_size())]  # the blocks (2) and the pool cap it
    monkeypatch.setattr(_threads, "thread_budget", lambda: 1)
    rec.n_threads.clear()
    NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, 0.1, case.plan)
    assert rec.n_threads == [1]


@needs_two_threads
def test_concurrent_parallel_epochs_from_python_threads(monkeypatch):
    """Parallel epochs launched from several Python threads at once (a threaded grid search) each give the
    bits of a lone epoch, and the last one out restores the BLAS."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(_threads, "thread_budget", lambda: 2)
    monkeypatch.setattr(NB, "_choice", _FixedChoice(2))
    sizes, batch = TWO_BLOCKS
    case = _Case("float64", sizes, 250, 250, batch, seed=4, hidden="tanh", output="softmax", loss="ce", keep=[0.8, 0.5],
                 optimizer="adam", lr=1e-3)  # fmt: skip

    def run(_=None):
        W, b, st = case.fresh()
        r = NBE.train_epoch(case.X, case.Y, case.order, (W, b), st, case.lrs, case.plan, 0)
        return W, b, st, tuple(r)

    want = run()
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(run, range(6)))
    for g in got:
        _assert_same_bits(g, want)
    assert not _threads.pinned()


def test_parallel_launches_serialized_only_on_workqueue(monkeypatch):
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    assert NB._serialize_parallel_calls()
    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")
    assert not NB._serialize_parallel_calls()

    def not_yet():
        raise ValueError("Threading layer is not initialized.")

    monkeypatch.setattr(numba, "threading_layer", not_yet)
    assert NB._serialize_parallel_calls()


def test_fit_context_pins_blas_only_for_split_epochs(monkeypatch):
    monkeypatch.setattr(config, "PARALLEL", True)
    monkeypatch.setattr(_threads, "thread_budget", lambda: 2)
    sizes, batch = TWO_BLOCKS
    with NB.fit_context([4, 3, 2], 10) as pinned:
        assert pinned is False and not _threads.pinned()
    if config.pool_size() >= 2:
        with NB.fit_context(sizes, batch):
            assert _threads.pinned()
        assert not _threads.pinned()
    monkeypatch.setattr(_threads, "thread_budget", lambda: 1)
    with NB.fit_context(sizes, batch) as pinned:
        assert pinned is False


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
    """The mask of row r uses its index in the whole minibatch, not in its block: 3 blocks = 1 block."""
    case = _Case("float64", [30, 20, 5], 90, 90, 45, seed=3, hidden="sigmoid", output="softmax", loss="ce",
                 keep=[0.5, 0.5], step0=0)  # fmt: skip
    one = case.run_numba(n_chunks=1, parallel=False, n_threads=1)
    three = case.run_numba(n_chunks=3, parallel=False, n_threads=1)
    assert _max_diff(one[0] + one[1], three[0] + three[1]) <= 1e-12
    assert one[3][2] == three[3][2]


# ----------------------------------------------------------------------------------------- register tiles
_TILE_JIT = {**config.jit_options(), "cache": False}


@numba.njit(**_TILE_JIT)
def _tile_nt_4x4(A, W, Z, r0, r1):
    K._nt_rows_4x4(A, W, Z, r0, r1)


@numba.njit(**_TILE_JIT)
def _tile_nt_4x3(A, W, Z, r0, r1):
    K._nt_rows_4x3(A, W, Z, r0, r1)


#: both forward tiles run on every CPU (the epoch takes the one that fits its registers: K._nt_rows)
_TILE_NT = {"4x4": _tile_nt_4x4, "4x3": _tile_nt_4x3}


@numba.njit(**_TILE_JIT)
def _tile_tn(P, R, C):
    """``C = P.T @ R`` through a panel of ``P`` packed 4 columns at a time (the weight gradient's use of
    _tn_rows)."""
    Q = P.shape[0]
    n = P.shape[1]
    Pn = np.empty(((n + 3) // 4 * max(Q, 1), 4), P.dtype)
    for p in range(0, n, 4):
        u = (p // 4) * Q
        for t in range(4):
            col = min(p + t, n - 1)
            for q in range(Q):
                Pn[u + q, t] = P[q, col]
    K._tn_rows(Pn, Q, R, C, 0, n)


def _product_bound(A, B, dtype):
    """Error bound of any summation order of ``A @ B`` in ``dtype``: ``K eps (|A| @ |B|)`` (plus the rounding
    of the result)."""
    eps = float(np.finfo(dtype).eps)
    k = A.shape[1]
    return (k + 2) * eps * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64)))


#: widths around the SIMD widths (8 and 16 lanes) and the TN tile widths (32 and 64 columns)
TILE_WIDTHS = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100)


@pytest.mark.parametrize("keep", [None, (0.8, 1.0, 0.5)], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_epoch_buffers_and_every_matrix_in_them_start_on_cache_lines(dtype, keep):
    """theta, the state slots and each work buffer start on 64-byte boundaries, and so does every layer's
    matrix in them (the tiles' vector loads then never split a line); packing theta round-trips."""
    sizes = [784, 50, 33, 10]
    thresholds = [keep_threshold(k) if keep else 1 << 24 for k in (keep or (1, 1, 1))]
    woff, n_params = NB._theta_layout(sizes, dtype)
    rng = np.random.default_rng(5)
    Ws = [rng.normal(size=(sizes[i + 1], sizes[i])).astype(dtype) for i in range(3)]
    bs = [rng.normal(size=sizes[i + 1]).astype(dtype) for i in range(3)]
    theta = NB._pack(Ws, bs, woff, n_params, dtype)
    item = np.dtype(dtype).itemsize
    assert theta.ctypes.data % 64 == 0 and all(int(o) * item % 64 == 0 for o in woff)
    W2, b2 = [np.zeros_like(w) for w in Ws], [np.zeros_like(b) for b in bs]
    NB._unpack(theta, woff, W2, b2)
    for a, a2 in zip(Ws + bs, W2 + b2):
        np.testing.assert_array_equal(a, a2)
    pan, bufs, offs, T, wts, grad, parts, part_corr = NB._workspace(sizes, thresholds, 100, 2, woff, n_params, False,
                                                                    np.dtype(dtype))  # fmt: skip
    assert grad.ctypes.data % 64 == 0 and pan % 4 == 0
    acts, ins, masks, deltas, panel = bufs
    for buf in bufs:
        assert buf.size == 0 or buf.ctypes.data % 64 == 0  # (no dropout: the mask buffers are empty)
    aoff, moff, doff = offs[1], offs[2], offs[3]
    assert len(aoff) == 4 and len(moff) == 3 and len(doff) == 3
    for o in (*aoff, *doff):
        assert int(o) * item % 64 == 0
    for i in range(3):  # the matrices fit their buffers and do not overlap
        assert aoff[i] + 100 * sizes[i] <= aoff[i + 1] and doff[i] + 100 * sizes[i + 1] <= deltas.size
        if thresholds[i] < 1 << 24:
            assert int(moff[i]) * item % 64 == 0 and moff[i] + 100 * sizes[i] <= masks.size
    assert aoff[3] + 100 * sizes[3] <= acts.size and panel.size >= 2 * pan


@pytest.mark.parametrize("tile", list(_TILE_NT))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_tile_matches_numpy_on_remainders(dtype, tile):
    """Z = A W^T by 4 x 4 (AVX-512) and 4 x 3 (AVX2 and narrower) register tiles: every row count 1..13,
    output counts around the tile and vector widths, reductions short and long; rows outside [r0, r1)
    untouched."""
    _tile_nt = _TILE_NT[tile]
    assert K._nt_rows is (K._nt_rows_4x4 if K.VECTOR_BITS >= 512 else K._nt_rows_4x3)
    rng = np.random.default_rng(3)
    for k in (1, 7, 16, 33, 784, 2000):
        for n_out in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 50):
            W = rng.normal(size=(n_out, k)).astype(dtype)
            for n in range(1, 14):
                A = rng.normal(size=(n, k)).astype(dtype)
                Z = np.full((n + 2, n_out), 7.0, dtype)
                _tile_nt(np.vstack([A[:1], A, A[:1]]), W, Z, 1, n + 1)
                ref = A.astype(np.float64) @ W.T.astype(np.float64)
                assert (np.abs(Z[1:-1] - ref) <= _product_bound(A, W.T, dtype)).all(), (k, n_out, n)
                assert (Z[0] == 7.0).all() and (Z[-1] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tn_tile_matches_numpy_on_remainders(dtype):
    """C = P^T R by row tiles of 4 and column blocks of the tile width: every row count 1..13, widths around
    the vector and tile widths (the narrow path and the shifted last block), reductions short and long."""
    rng = np.random.default_rng(4)
    for q in (1, 2, 13, 100, 1000):
        for width in TILE_WIDTHS:
            R = rng.normal(size=(q, width)).astype(dtype)
            for n in range(1, 14):
                P = rng.normal(size=(q, n)).astype(dtype)
                C = np.full((n, width), np.nan, dtype)
                _tile_tn(P, R, C)
                ref = P.T.astype(np.float64) @ R.astype(np.float64)
                assert (np.abs(C - ref) <= _product_bound(P.T, R, dtype)).all(), (q, width, n)


# --------------------------------------------------------------------------------------------------- exp
@pytest.mark.parametrize("dtype", DTYPES)
def test_polynomial_exp_accuracy(dtype):
    """The vectorizable exp is within 2 ulp of a correctly rounded exp over its whole range (up to the cap),
    called from code with the kernels' own flags (fastmath's "reassoc" must not reach its range reduction)."""

    @numba.njit(**{**config.jit_options(), "cache": False})
    def vexp(x, out):
        for j in range(x.shape[0]):
            out[j] = K._vexp(x[j])

    hi = EXP_CAP[dtype]
    lo = -708.0 if dtype == "float64" else -87.0  # below, exp(x) is subnormal and the kernel floors x
    x = np.concatenate([np.linspace(lo, hi, 200_001), np.linspace(-1, 1, 10_001), [0.0, -0.0, hi]]).astype(dtype)
    out = np.empty_like(x)
    vexp(x, out)
    ref = np.exp(x.astype(np.float64))
    if dtype == "float32":
        ref = ref.astype(np.float32)
    ulp = np.abs(out.astype(np.float64) - ref.astype(np.float64)) / np.spacing(ref).astype(np.float64)
    assert ulp.max() <= 2.0
    assert (out[x == 0] == 1.0).all()
    # beyond the contract's cap: exp(cap), finite
    big = np.array([hi + 0.5, 1e4, 1e30], dtype=dtype)
    vexp(big, out[:3])
    assert np.isfinite(out[:3]).all()
    np.testing.assert_allclose(out[:3], np.exp(np.asarray(hi, dtype)), rtol=3 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_output_capped_like_the_reference(dtype):
    """The exp activation takes exp(min(z, EXP_CAP)) as the reference does (88 for float32, 708 for float64)."""
    A = np.array([[1.0]], dtype=dtype)
    W = np.array([[1.0], [1.0], [1.0]], dtype=dtype)
    cap = EXP_CAP[dtype]
    b = np.array([cap - 0.25, cap + 0.25, 1e4], dtype=dtype) - 1
    got = NBE.forward(A, W, b, "exp")
    with np.errstate(over="ignore"):
        want = REF.forward(A, W, b, "exp")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps)
    assert got[0, 1] == got[0, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_nan(dtype):
    """Pre-activations far beyond exp's range give 0 and 1 (the reference's limits), never NaN."""
    A = np.array([[1.0]], dtype=dtype)
    W = np.array([[1.0]], dtype=dtype)
    for z, want in [(1e4, 1.0), (-1e4, 0.0), (1e30, 1.0), (-1e30, 0.0)]:
        out = NBE.forward(A, W, np.array([z], dtype=dtype), "sigmoid")
        assert np.isfinite(out).all()
        assert float(out[0, 0]) == pytest.approx(want, abs=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_clip_is_the_dtype_epsilon(dtype):
    """Cross-entropy of a saturated output: the probability is clipped to [eps, 1 - eps] of the dtype."""
    eps = float(np.finfo(dtype).eps)
    A = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    _, ls, _ = NBE.output_delta(A, np.array([0, 1]), "softmax", "ce")
    assert ls == pytest.approx(-2 * np.log(eps), rel=1e-12)
    _, ls, _ = NBE.output_delta(A, np.array([0, 1]), "sigmoid", "ce")
    p_hi = float(np.asarray(1 - eps, dtype=dtype))
    assert ls == pytest.approx(-2 * (np.log(eps) + np.log1p(-p_hi)), rel=1e-12)


# ------------------------------------------------------------------------------------------- compilation
def _run(code: str, env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=subprocess_env(**env), capture_output=True,
                         text=True, cwd=tempfile.gettempdir(), timeout=900, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_import_compiles_nothing():
    """Importing the backend (as available_backends() does) neither imports the kernels nor compiles."""
    out = _run(
        """
        import json, sys, fastmlp
        fastmlp.available_backends()
        import fastmlp.backends.numba as nb
        print(json.dumps({"kernels_imported": "fastmlp.backends.numba.kernels" in sys.modules,
                          "loaded": nb._kernels is not None}))
        """,
        {},
    )
    assert json.loads(out) == {"kernels_imported": False, "loaded": False}


def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    """A fresh process reuses what the first compiled: cache hits, no misses, index files on disk."""
    code = """
        import json, numpy as np, fastmlp
        from fastmlp.backends.contract import plan_epoch
        from fastmlp.backends.numba import kernels as K
        be = fastmlp.get_backend("numba")
        rng = np.random.default_rng(0)
        W = [rng.normal(size=(4, 6)), rng.normal(size=(3, 4))]
        b = [np.zeros(4), np.zeros(3)]
        X = rng.normal(size=(50, 6))
        plan = plan_epoch([6, 4, 3], "float64", batch_size=10, hidden="sigmoid", output="softmax", loss="ce")
        be.train_epoch(X, rng.integers(0, 3, 50), np.arange(50), (W, b), None, 0.1, plan)
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
    if config.PARALLEL:
        assert K.train_epoch["float64", True].py_func.__qualname__.startswith("train_epoch__par1_")
    assert K.train_epoch["float64", False].py_func.__qualname__.startswith("train_epoch__par0_")


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


@pytest.mark.parametrize("name", ["FASTMLP_NUMBA_PARALLEL", "FASTMLP_NUMBA_CACHE", "FASTMLP_NUMBA_BOUNDSCHECK"])
@pytest.mark.parametrize("raw, want", [("1", True), (" yes ", True), ("ON", True), ("0", False), ("off", False),
                                       ("", False), (None, "default")])  # fmt: skip
def test_bool_env(monkeypatch, name, raw, want):
    if raw is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, raw)
    for default in (True, False):
        assert config._env_bool(name, default) is (default if want == "default" else want)


def test_safe_fastmath_keeps_nan_semantics():
    assert not {"nnan", "ninf", "fast"} & config.SAFE_FASTMATH


@pytest.mark.parametrize(
    "name, raw",
    [("FASTMLP_NUMBA_FASTMATH", "maybe"), ("FASTMLP_NUMBA_PARALLEL", "2"), ("FASTMLP_NUMBA_CACHE", "yes please"),
     ("FASTMLP_NUMBA_BOUNDSCHECK", "-1"), ("FASTMLP_NUM_THREADS", "0"), ("FASTMLP_NUM_THREADS", "two")],
)  # fmt: skip
def test_bad_env_values_raise(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    parse = {"FASTMLP_NUMBA_FASTMATH": config._env_fastmath, "FASTMLP_NUM_THREADS": lambda n: _threads.env_threads()}.get(
        name, lambda n: config._env_bool(n, True)
    )
    with pytest.raises(ValueError, match=name):
        parse(name)


def test_pool_size_is_numbas_pool():
    assert config.pool_size() == numba.config.NUMBA_NUM_THREADS >= 1


def test_env_flags_reach_a_fresh_process(tmp_path):
    """Environment overrides are read at import; a serial, strict-IEEE build still matches the reference
    (Adam, dense targets, sample weights, alpha, dropout)."""
    out = _run(
        """
        import json, numpy as np, fastmlp
        from fastmlp import _threads, config
        from fastmlp.backends.contract import OptimizerState, plan_epoch
        from fastmlp.backends.numba import kernels as K
        ref, be = fastmlp.get_backend("numpy"), fastmlp.get_backend("numba")
        rng = np.random.default_rng(1)
        W = [rng.normal(size=(5, 7)), rng.normal(size=(3, 5))]
        b = [np.zeros(5), np.zeros(3)]
        W2, b2 = [w.copy() for w in W], [x.copy() for x in b]
        X = rng.normal(size=(64, 7)); Y = rng.normal(size=(64, 3)); o = rng.permutation(64); sw = rng.uniform(1, 2, 64)
        plan = plan_epoch([7, 5, 3], "float64", batch_size=32, hidden="tanh", output="identity", loss="squared_error",
                          target="dense", keep=[0.7, 0.5], alpha=1e-3, optimizer="adam", beta1=0.9, beta2=0.999,
                          eps=1e-8, seed=4)
        s1, s2 = OptimizerState.zeros("adam", plan.sizes, "float64"), OptimizerState.zeros("adam", plan.sizes, "float64")
        r1 = ref.train_epoch(X, Y, o, (W, b), s1, 0.01, plan, sample_weight=sw)
        r2 = be.train_epoch(X, Y, o, (W2, b2), s2, 0.01, plan, sample_weight=sw)
        d = max(float(np.abs(p - q).max()) for p, q in zip(W + b + s1.arrays(), W2 + b2 + s2.arrays()))
        print(json.dumps({"fm": config.FASTMATH, "par": config.PARALLEL, "thr": _threads.thread_budget(), "diff": d,
                          "loss": abs(r1.loss_sum - r2.loss_sum) / r1.loss_sum, "t": s2.t,
                          "qual": K.train_epoch["float64"].py_func.__qualname__}))
        """,
        {"FASTMLP_NUMBA_FASTMATH": "0", "FASTMLP_NUMBA_PARALLEL": "0", "FASTMLP_NUM_THREADS": "1",
         "NUMBA_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    got = json.loads(out)
    assert (got["fm"], got["par"], got["thr"]) == (False, False, 1)
    assert got["diff"] <= 1e-9
    assert got["loss"] <= 1e-12
    assert got["t"] == 2
    assert got["qual"] == "train_epoch__par0_fmoff_bc0"
