"""Property-based fuzz cases over the public API (run by ``tests/test_fuzz.py`` in a subprocess).

Not collected by the normal run (the name does not start with ``test_``): a
crash in a compiled kernel would take the whole pytest process down, so
``test_fuzz.py`` runs this module in a child process and checks its exit code
and the number of cases it executed.

Every case builds random inputs (shapes including 0 and 1; dtypes int, uint8,
float16/32/64, complex, object, bool; C, Fortran, strided, read-only,
unaligned and byte-swapped layouts; NaN/Inf; wrong label ranges, lengths and
dimensions), runs them through the NumPy reference backend and through every
compiled backend, and requires that either all raise the same documented
exception (``ValueError``/``TypeError``; ``FloatingPointError`` for a diverging
fit) or all return results equal within the documented tolerance (float64
1e-9, float32 1e-4, relative + absolute).

``FASTMLP_FUZZ_COUNT_FILE``: where the number of executed cases is written.
``FASTMLP_FUZZ_SCALE``: multiplies every property's ``max_examples`` (default 1).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlp
from fastmlp import compat
from fastmlp.backends.contract import (
    ACT_CODES,
    HIDDEN_ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    VALID_OUTPUT_LOSS,
    OptimizerState,
    plan_epoch,
)
from fastmlp.network import Network

BACKENDS = fastmlp.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
REF = fastmlp.get_backend("numpy")
DOCUMENTED = (ValueError, TypeError)
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4}
SCALE = float(os.environ.get("FASTMLP_FUZZ_SCALE", "1"))
FLOAT_DTYPES = ("float32", "float64")
PAIRS = sorted(VALID_OUTPUT_LOSS)

_cases = [0]


def fuzz(n: int):
    """Reproducible settings: derandomized, no deadline, no example database."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@pytest.fixture(scope="module", autouse=True)
def _report_count():
    yield
    print(f"\nFUZZ CASES EXECUTED: {_cases[0]}")
    path = os.environ.get("FASTMLP_FUZZ_COUNT_FILE")
    if path:
        Path(path).write_text(str(_cases[0]))


# ------------------------------------------------------------------ helpers
def run(fn):
    """``("ok", result)`` or ``("raised", exception)``."""
    try:
        return "ok", fn()
    except Exception as exc:  # classified by the caller
        return "raised", exc


def assert_same(ref, got, tol: float, what: str) -> None:
    """Results equal within ``tol`` (arrays, scalars, tuples/lists of them)."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(ref), f"{what}: {got!r} vs {ref!r}"
        for i, (r, g) in enumerate(zip(ref, got)):
            assert_same(r, g, tol, f"{what}[{i}]")
    elif isinstance(ref, np.ndarray):
        assert isinstance(got, np.ndarray), what
        assert got.shape == ref.shape and got.dtype == ref.dtype, f"{what}: {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
        if ref.dtype.kind in "iub":
            np.testing.assert_array_equal(got, ref, err_msg=what)
        else:
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=what)
    elif isinstance(ref, float):
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=what)
    else:
        assert got == ref, f"{what}: {got!r} vs {ref!r}"


def differential(call, tol: float, allowed=DOCUMENTED, backends=COMPILED) -> str:
    """Run ``call(backend_name)`` on the reference, then on each compiled backend, and compare.

    ``call`` must build its inputs afresh on every call (same values each time).
    Returns ``"ok"`` or ``"raised"`` (the reference's outcome).
    """
    _cases[0] += 1
    kind, ref = run(lambda: call("numpy"))
    if kind == "raised" and not isinstance(ref, allowed):
        raise AssertionError(f"reference raised an undocumented {type(ref).__name__}: {ref}") from ref
    if kind == "ok":  # a float32 array anywhere in the result (a cast input) sets the float32 tolerance
        tol = max([tol] + [TOL.get(a.dtype, tol) for a in _arrays(ref)])
    for name in backends:
        gkind, got = run(lambda name=name: call(name))
        if kind == "raised":
            assert gkind == "raised", f"{name} returned {got!r} where the reference raised {ref!r}"
            assert type(got) is type(ref), f"{name} raised {type(got).__name__}: {got} / reference {type(ref).__name__}: {ref}"
        else:
            if gkind == "raised":
                raise AssertionError(f"{name} raised {type(got).__name__}: {got} where the reference succeeded") from got
            assert_same(ref, got, tol, name)
    return kind


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays(o)


FAULTS = ("none",) * 8 + (
    "int64", "uint8", "float16", "complex", "object", "bool", "otherfloat",
    "F", "strided", "readonly", "unaligned", "bigendian", "nan", "inf", "shape", "ndim", "list",
)  # fmt: skip


def apply_fault(a: np.ndarray, fault: str, pos: int) -> object:
    """``a`` damaged (or just laid out differently) as ``fault`` says; ``pos`` picks an element."""
    if fault == "none":
        return a
    if fault == "int64":
        return np.rint(a).astype(np.int64)
    if fault == "uint8":
        return (np.abs(a) * 50).astype(np.uint8)
    if fault == "float16":
        return a.astype(np.float16)
    if fault == "complex":
        return a.astype(np.complex128)
    if fault == "object":
        return a.astype(object)
    if fault == "bool":
        return a > 0
    if fault == "otherfloat":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    if fault == "F":
        return np.asfortranarray(a)
    if fault == "strided":
        big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]) if a.ndim else (2,), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if fault == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if fault == "unaligned":
        buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
        b = buf[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        return b
    if fault == "bigendian":
        return a.astype(a.dtype.newbyteorder(">"))
    if fault in ("nan", "inf"):
        b = a.copy()
        if b.size:
            b.flat[pos % b.size] = np.nan if fault == "nan" else -np.inf
        return b
    if fault == "shape":
        return np.zeros((*a.shape[:-1], a.shape[-1] + 1), dtype=a.dtype) if a.ndim else a
    if fault == "ndim":
        return a[..., None] if pos % 2 else a.reshape(-1)
    if fault == "list":
        return a.tolist()
    raise AssertionError(fault)


LABEL_FAULTS = ("none",) * 6 + ("oob", "neg", "float_int", "float_frac", "short", "col", "str", "bool", "object", "nan", "scalar")


def apply_label_fault(y: np.ndarray, fault: str, k: int) -> object:
    if fault == "none":
        return y
    if fault == "oob":
        return y + k
    if fault == "neg":
        return y - k
    if fault == "float_int":
        return y.astype(np.float64)
    if fault == "float_frac":
        return y + 0.5
    if fault == "short":
        return y[:-1]
    if fault == "col":
        return y[:, None]
    if fault == "str":
        return y.astype(str)
    if fault == "bool":
        return y > 0
    if fault == "object":
        return y.astype(object)
    if fault == "nan":
        return np.where(np.arange(y.size) == 0, np.nan, y.astype(float))
    if fault == "scalar":
        return np.int64(0)
    raise AssertionError(fault)


ACT_NAMES = st.sampled_from((*ACT_CODES, "gelu"))
HIDDEN = st.sampled_from(HIDDEN_ACTIVATIONS)
dims = st.integers(0, 6)
pos_dims = st.integers(1, 6)
seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------ kernels of every backend
@fuzz(700)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=dims, n_in=dims, n_out=dims, act=ACT_NAMES, seed=seeds,
       fault=st.sampled_from(FAULTS), which=st.integers(0, 2), pos=st.integers(0, 99),
       out_mode=st.sampled_from(["none", "none", "given", "alias", "bad"]))  # fmt: skip
def test_kernel_forward(dt, n, n_in, n_out, act, seed, fault, which, pos, out_mode):
    def call(name):
        rng = np.random.default_rng(seed)
        args = [rng.uniform(-2, 2, (n, n_in)).astype(dt), rng.normal(0, 0.5, (n_out, n_in)).astype(dt),
                rng.uniform(-1, 1, n_out).astype(dt)]  # fmt: skip
        args[which] = apply_fault(args[which], fault, pos)
        out = None
        if out_mode == "given":
            out = np.full((n, n_out), 7.0, dtype=dt)
        elif out_mode == "alias" and isinstance(args[0], np.ndarray) and args[0].shape == (n, n_out):
            out = args[0]  # the kernel's output is also its input: must act as if read first
        elif out_mode == "bad":
            out = np.empty((n, n_out + 1), dtype=dt)
        return fastmlp.get_backend(name).forward(*args, act, out=out)

    differential(call, TOL[np.dtype(dt)])


@fuzz(500)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=dims, k=dims, pair=st.sampled_from([*PAIRS, ("softmax", "hinge"), ("relu", "mse")]),
       seed=seeds, fault=st.sampled_from(FAULTS), label_fault=st.sampled_from(LABEL_FAULTS), pos=st.integers(0, 99))  # fmt: skip
def test_kernel_output_delta(dt, n, k, pair, seed, fault, label_fault, pos):
    def call(name):
        rng = np.random.default_rng(seed)
        A = apply_fault(rng.uniform(-0.2, 1.2, (n, k)).astype(dt), fault, pos)
        y = apply_label_fault(rng.integers(0, max(k, 1), n), label_fault, k)
        return fastmlp.get_backend(name).output_delta(A, y, *pair)

    differential(call, TOL[np.dtype(dt)])


@fuzz(500)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=dims, n_next=dims, n_units=dims, act=ACT_NAMES, seed=seeds,
       use_mask=st.booleans(), fault=st.sampled_from(FAULTS), which=st.integers(0, 3), pos=st.integers(0, 99),
       alias=st.booleans())  # fmt: skip
def test_kernel_hidden_delta(dt, n, n_next, n_units, act, seed, use_mask, fault, which, pos, alias):
    def call(name):
        rng = np.random.default_rng(seed)
        args = [rng.normal(0, 1, (n, n_next)).astype(dt), rng.normal(0, 0.5, (n_next, n_units)).astype(dt),
                rng.uniform(-1, 1, (n, n_units)).astype(dt),
                (rng.random((n, n_units)) < 0.5).astype(dt) * 2 if use_mask else None]  # fmt: skip
        if args[which] is not None:
            args[which] = apply_fault(args[which], fault, pos)
        out = args[2] if alias and isinstance(args[2], np.ndarray) and args[2].flags.writeable else None
        return fastmlp.get_backend(name).hidden_delta(args[0], args[1], args[2], act, mask=args[3], out=out)

    differential(call, TOL[np.dtype(dt)])


@fuzz(500)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=dims, n_in=dims, n_out=dims, seed=seeds,
       lr=st.sampled_from([0.0, 0.01, 0.1, 1.0, -0.1, float("nan"), float("inf"), "0.1", True]),
       l2=st.sampled_from([0.0, 0.0, 1e-3, 0.5, 20.0, -1.0]), l1=st.sampled_from([0.0, 0.0, 1e-3, 0.3, -1.0]),
       fault=st.sampled_from(FAULTS), which=st.integers(0, 3), pos=st.integers(0, 99),
       alias=st.sampled_from(["none", "A=W", "b in W"]))  # fmt: skip
def test_kernel_inplace_update(dt, n, n_in, n_out, seed, lr, l2, l1, fault, which, pos, alias):
    def call(name):
        rng = np.random.default_rng(seed)
        args = [rng.normal(0, 0.5, (n_out, n_in)).astype(dt), rng.uniform(-1, 1, n_out).astype(dt),
                rng.normal(0, 1, (n, n_out)).astype(dt), rng.uniform(-1, 1, (n, n_in)).astype(dt)]  # fmt: skip
        args[which] = apply_fault(args[which], fault, pos)
        W, b, D, A = args
        if alias == "A=W" and isinstance(W, np.ndarray) and isinstance(A, np.ndarray) and A.shape == W.shape:
            A = W
        elif alias == "b in W" and isinstance(W, np.ndarray) and W.ndim == 2 and W.shape[0] and W.shape[0] == W.shape[1]:
            b = W[0]
        fastmlp.get_backend(name).inplace_update(W, b, D, A, lr, l2, l1)
        return W, b

    differential(call, TOL[np.dtype(dt)])


@fuzz(400)
@given(seed=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64, None, 1.5])),
       step=st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**63, 2**64])),
       layer=st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**63 - 1, 2**63])),
       n_rows=st.integers(-1, 9), n_units=st.integers(0, 9),
       keep=st.sampled_from([1.0, 0.999, 0.5, 0.1, 1e-9, 0.0, 1.5, float("nan")]),
       scale=st.sampled_from([None, None, 1.0, 3.0, 0.0, -1.0]),
       dtype=st.sampled_from(["float32", "float64", "float16", "int64", "bogus"]))  # fmt: skip
def test_kernel_dropout_mask(seed, step, layer, n_rows, n_units, keep, scale, dtype):
    def call(name):
        return fastmlp.get_backend(name).dropout_mask(seed, step, layer, n_rows, n_units, keep, scale=scale, dtype=dtype)

    differential(call, 0.0)  # masks are bit-identical on every backend


def _params(rng, sizes, dt):
    Ws = [rng.normal(0, 0.5, (b, a)).astype(dt) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.uniform(-0.5, 0.5, b).astype(dt) for b in sizes[1:]]
    return Ws, bs


@fuzz(500)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=dims, sizes=st.lists(st.integers(0, 5), min_size=2, max_size=4),
       hidden=ACT_NAMES, output=ACT_NAMES, seed=seeds, fault=st.sampled_from(FAULTS), which=st.integers(0, 8),
       pos=st.integers(0, 99),
       structure=st.sampled_from(["ok"] * 6 + ["mismatch", "empty", "shared", "tuple", "ndarray"]))  # fmt: skip
def test_kernel_forward_network(dt, n, sizes, hidden, output, seed, fault, which, pos, structure):
    def call(name):
        rng = np.random.default_rng(seed)
        X = rng.uniform(-2, 2, (n, sizes[0])).astype(dt)
        Ws, bs = _params(rng, sizes, dt)
        arrays = [X, *Ws, *bs]
        i = which % len(arrays)
        arrays[i] = apply_fault(arrays[i], fault, pos)
        L = len(Ws)
        X, Ws, bs = arrays[0], arrays[1 : 1 + L], arrays[1 + L :]
        Ws, bs = _restructure(Ws, bs, structure)
        return fastmlp.get_backend(name).forward_network(X, Ws, bs, hidden, output)

    differential(call, TOL[np.dtype(dt)])


def _restructure(Ws, bs, structure):
    if structure == "mismatch":
        return Ws, bs[:-1]
    if structure == "empty":
        return [], []
    if structure == "shared" and len(Ws) > 1 and isinstance(Ws[0], np.ndarray):
        return [Ws[0], Ws[0], *Ws[2:]], bs
    if structure == "tuple":
        return tuple(Ws), tuple(bs)
    if structure == "ndarray" and isinstance(Ws[0], np.ndarray):
        return Ws[0], bs
    return Ws, bs


@fuzz(600)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=st.integers(0, 12),
       sizes=st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers(1, 5)).map(lambda t: [*t[0], t[1]]),
       hidden=HIDDEN, pair=st.sampled_from(PAIRS), seed=seeds, batch_size=st.sampled_from([1, 2, 3, 5, 100, 2**63, 0, -1]),
       lrs_mode=st.sampled_from(["scalar", "array", "array", "bad_len", "negative", "nan", "str"]),
       l2=st.sampled_from([0.0, 1e-3, 0.1]), l1=st.sampled_from([0.0, 1e-3]), alpha=st.sampled_from([0.0, 0.0, 1e-2]),
       keep_mode=st.sampled_from(["none", "none", "half", "mixed", "zero", "short", "scalar"]), inverted=st.booleans(),
       mask_seed=st.integers(0, 2**64 - 1), step0=st.sampled_from([0, 7, 2**40, 2**63 - 2, 2**63, -1]),
       order_mode=st.sampled_from(["perm", "perm", "partial", "repeat", "oob", "float", "empty"]),
       fault=st.sampled_from(FAULTS), which=st.integers(0, 8), pos=st.integers(0, 99),
       label_fault=st.sampled_from(LABEL_FAULTS), structure=st.sampled_from(["ok"] * 8 + ["mismatch", "shared"]),
       target=st.sampled_from(["labels", "labels", "dense"]),
       optimizer=st.sampled_from(["sgd", "sgd", "momentum", "nesterov", "adam", "adamw", "gradient", "no_state"]),
       weights=st.sampled_from(["none", "none", "random", "zeros", "negative"]))  # fmt: skip
def test_kernel_train_epoch(dt, n, sizes, hidden, pair, seed, batch_size, lrs_mode, l2, l1, alpha, keep_mode, inverted,
                            mask_seed, step0, order_mode, fault, which, pos, label_fault, structure, target, optimizer,
                            weights):  # fmt: skip
    output, loss = pair

    def call(name):
        rng = np.random.default_rng(seed)
        X = rng.uniform(-1, 1, (n, sizes[0])).astype(dt)
        if target == "dense":  # probabilities suit every pair (counts >= 0, indicators/soft labels in [0, 1])
            y = apply_fault(rng.uniform(0, 1, (n, sizes[-1])).astype(dt), fault if which == 0 else "none", pos)
        else:
            y = apply_label_fault(rng.integers(0, sizes[-1], n), label_fault, sizes[-1])
        Ws, bs = _params(rng, sizes, dt)
        arrays = [X, *Ws, *bs]
        i = which % len(arrays)
        arrays[i] = apply_fault(arrays[i], fault, pos)
        L = len(Ws)
        X, Ws, bs = arrays[0], arrays[1 : 1 + L], arrays[1 + L :]
        Ws, bs = _restructure(Ws, bs, structure)
        order = {"perm": rng.permutation(n), "partial": rng.permutation(n)[: n // 2], "repeat": np.zeros(n, np.int64),
                 "oob": np.arange(n) + 1, "float": np.arange(n, dtype=float),
                 "empty": np.empty(0, np.int64)}[order_mode]  # fmt: skip
        bsz = max(batch_size, 1) if batch_size != 2**63 else batch_size
        n_steps = -(-len(order) // bsz) if bsz > 0 else 0
        lrs = {"scalar": 0.3, "array": rng.uniform(0, 0.5, n_steps), "bad_len": np.ones(n_steps + 1),
               "negative": -0.1, "nan": np.full(n_steps, np.nan), "str": "0.1"}[lrs_mode]  # fmt: skip
        keep = {"none": None, "half": [0.5] * L, "mixed": [0.8] + [0.6] * (L - 1), "zero": [0.0] * L,
                "short": [0.5] * (L + 1), "scalar": 0.5}[keep_mode]  # fmt: skip
        sw = {"none": None, "random": rng.uniform(0.1, 2, n), "zeros": np.zeros(n), "negative": -np.ones(n)}[weights]
        kind = "adam" if optimizer == "no_state" else optimizer  # no_state: Adam without its state (an error)
        extra = {"momentum": 0.9} if kind in ("momentum", "nesterov") else {}
        if kind in ("adam", "adamw"):
            extra = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "eps_mode": "torch" if kind == "adamw" else "sklearn"}
        plan = plan_epoch(sizes, dt, batch_size=batch_size, hidden=hidden, output=output, loss=loss, target=target,
                          l2=l2, l1=l1, alpha=alpha, keep=keep, inverted=inverted, optimizer=kind, seed=mask_seed,
                          **extra)  # fmt: skip
        state = None if optimizer in ("sgd", "no_state") else OptimizerState.zeros(kind, sizes, dt)
        res = fastmlp.get_backend(name).train_epoch(X, y, order, (Ws, bs), state, lrs, plan, step0, sample_weight=sw)
        return tuple(res), list(Ws), list(bs), [] if state is None else [state.t, *state.arrays()]

    differential(call, TOL[np.dtype(dt)])


# ------------------------------------------------------------------ Network: constructor, inference, fit, persistence
LAYER_CHOICES = st.one_of(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),
    st.sampled_from([[], [3], [3, 0], [3, -1], [3, 2.0], [3, True], "3,2", None, (3, 2), np.array([3, 2]), [[3], [2]]]),
)


@fuzz(400)
@given(layers=LAYER_CHOICES, activation=st.sampled_from([*HIDDEN_ACTIVATIONS, "softmax", "gelu", None, 1]),
       output=st.sampled_from([*OUTPUT_ACTIVATIONS, "relu", "tanh", None]), loss=st.sampled_from(["mse", "ce", "hinge", None]),
       dtype=st.sampled_from(["float32", "float64", np.float32, ">f8", "float16", "int32", "complex128", "bogus", None, 3]),
       backend=st.sampled_from([*BACKENDS, "auto", "bogus", None, 3]),
       seed=st.one_of(st.none(), st.integers(-2, 2**64 + 1), st.sampled_from([1.5, "1", True])))  # fmt: skip
def test_network_constructor(layers, activation, output, loss, dtype, backend, seed):
    _cases[0] += 1
    kind, net = run(lambda: Network(layers, activation=activation, output=output, loss=loss, dtype=dtype,
                                    backend=backend, seed=seed))  # fmt: skip
    if kind == "raised":
        assert isinstance(net, DOCUMENTED), f"{type(net).__name__}: {net}"
        return
    sizes = list(layers)
    assert net.layers == sizes and len(net.weights) == len(sizes) - 1
    assert net.dtype.isnative and net.dtype.name in FLOAT_DTYPES
    for W, b, a, c in zip(net.weights, net.biases, sizes[:-1], sizes[1:]):
        assert W.shape == (c, a) and b.shape == (c,) and W.flags.c_contiguous and W.dtype == net.dtype
    repr(net)


X_DTYPES = ("float64", "float32", "float16", "int64", "uint8", "bool", "complex128", "object", "str")


def make_X(rng, n, f, xdtype, layout, poison, pos):
    X = rng.uniform(-1, 1, (n, f))
    if xdtype in ("int64", "uint8"):
        X = rng.integers(0, 3, (n, f))
    X = X.astype(xdtype) if xdtype != "str" else X.astype(str)
    if poison != "none" and X.size and X.dtype.kind in "fc":
        X = X.copy()
        with np.errstate(over="ignore"):
            X.flat[pos % X.size] = {"nan": np.nan, "inf": np.inf, "huge": 1e300}[poison]
    if layout == "F":
        X = np.asfortranarray(X)
    elif layout == "strided":
        X = np.repeat(X, 2, axis=1)[:, ::2]
    elif layout == "rows":
        X = np.repeat(X, 2, axis=0)[::2]
    elif layout == "1d":
        X = X.reshape(-1)
    elif layout == "3d":
        X = X[:, :, None]
    elif layout == "list":
        X = X.tolist()
    elif layout == "wrong_f":
        X = np.ones((n, f + 1))
    return X


net_cases = dict(
    dt=st.sampled_from(FLOAT_DTYPES), sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4), hidden=HIDDEN,
    pair=st.sampled_from(PAIRS), n=st.integers(0, 9), xdtype=st.sampled_from(X_DTYPES[:2] * 4 + X_DTYPES),
    layout=st.sampled_from(["C"] * 6 + ["F", "strided", "rows", "1d", "3d", "list", "wrong_f"]),
    poison=st.sampled_from(["none"] * 8 + ["nan", "inf", "huge"]), pos=st.integers(0, 99), seed=seeds,
    label_fault=st.sampled_from(LABEL_FAULTS),
)  # fmt: skip


def _net(name, sizes, hidden, pair, dt):
    return Network(sizes, activation=hidden, output=pair[0], loss=pair[1], dtype=dt, backend=name, seed=7)


@fuzz(600)
@given(**net_cases, method=st.sampled_from(["predict", "predict_proba", "evaluate", "forward"]))
def test_network_inference(dt, sizes, hidden, pair, n, xdtype, layout, poison, pos, seed, label_fault, method):
    def call(name):
        rng = np.random.default_rng(seed)
        net = _net(name, sizes, hidden, pair, dt)
        X = make_X(rng, n, sizes[0], xdtype, layout, poison, pos)
        if method == "evaluate":
            return net.evaluate(X, apply_label_fault(rng.integers(0, sizes[-1], n), label_fault, sizes[-1]))
        return getattr(net, method)(X)

    differential(call, TOL[np.dtype(dt)])


@fuzz(450)
@given(**net_cases, epochs=st.sampled_from([1, 1, 2, 0, 1.0]), batch_size=st.sampled_from([None, 1, 2, 4, 100, 0, 2**70]),
       lr=st.sampled_from([0.05, 0.3, 0.0, -1.0, float("nan"), "0.1"]), l2=st.sampled_from([0.0, 1e-3]),
       l1=st.sampled_from([0.0, 1e-3]), dropout=st.sampled_from([0.0, 0.0, 0.3, 1.0, -0.1]),
       input_dropout=st.sampled_from([0.0, 0.2]), scaling=st.sampled_from(["inverted", "inverted", "predict", "bogus"]),
       shuffle=st.booleans(), valid=st.sampled_from(["none", "none", "same", "only_X", "bad"]),
       optimizer=st.sampled_from([None, None, "nesterov", "adam", "bogus"]), alpha=st.sampled_from([0.0, 0.0, 1e-3]))  # fmt: skip
def test_network_fit(dt, sizes, hidden, pair, n, xdtype, layout, poison, pos, seed, label_fault, epochs, batch_size, lr, l2,
                     l1, dropout, input_dropout, scaling, shuffle, valid, optimizer, alpha):  # fmt: skip
    def call(name):
        rng = np.random.default_rng(seed)
        net = _net(name, sizes, hidden, pair, dt)
        X = make_X(rng, n, sizes[0], xdtype, layout, poison, pos)
        y = apply_label_fault(rng.integers(0, sizes[-1], n), label_fault, sizes[-1])
        kw = {}
        if valid == "same":
            kw = {"X_valid": X, "y_valid": y}
        elif valid == "only_X":
            kw = {"X_valid": X}
        elif valid == "bad":
            kw = {"X_valid": np.ones((2, sizes[0] + 1)), "y_valid": np.zeros(2, int)}
        hist = net.fit(X, y, epochs=epochs, batch_size=batch_size, lr=lr, l2=l2, l1=l1, dropout=dropout,
                       input_dropout=input_dropout, dropout_scaling=scaling, shuffle=shuffle, seed=seed,
                       optimizer=optimizer, alpha=alpha, verbose=False, **kw)  # fmt: skip
        d = hist.as_dict()
        curves = [np.array(d[k], dtype=float) for k in ("train_loss", "train_acc", "valid_score") if d.get(k) is not None]
        return net.weights, net.biases, curves

    differential(call, TOL[np.dtype(dt)], allowed=(*DOCUMENTED, FloatingPointError))


@fuzz(250)
@given(**net_cases, n_samples=st.sampled_from([1, 3, 0, 2**40]), dropout=st.sampled_from([0.3, 0.0, 1.0, None]),
       input_dropout=st.sampled_from([None, 0.1]), mc_seed=st.sampled_from([0, 5, -1, 2**64]))  # fmt: skip
def test_network_mc_predict(dt, sizes, hidden, pair, n, xdtype, layout, poison, pos, seed, label_fault, n_samples, dropout,
                            input_dropout, mc_seed):  # fmt: skip
    if not hasattr(Network, "mc_predict"):
        pytest.skip("Network.mc_predict is not there yet")

    def call(name):
        rng = np.random.default_rng(seed)
        net = _net(name, sizes, hidden, pair, dt)
        X = make_X(rng, n, sizes[0], xdtype, layout, poison, pos)
        res = net.mc_predict(X, n_samples=min(n_samples, 2**40), seed=mc_seed, dropout=dropout, input_dropout=input_dropout)
        return res.mean, res.std, res.entropy

    differential(call, TOL[np.dtype(dt)])


@fuzz(200)
@given(**net_cases, start=st.sampled_from([1e-4, 1e-2, 0.0, 5.0]), end=st.sampled_from([1.0, 10.0, 1e-3]),
       num_iter=st.sampled_from([2, 8, 1]), batch_size=st.sampled_from([None, 2, 100, 0]))  # fmt: skip
def test_lr_find(dt, sizes, hidden, pair, n, xdtype, layout, poison, pos, seed, label_fault, start, end, num_iter, batch_size):
    if not hasattr(fastmlp, "lr_find"):
        pytest.skip("fastmlp.lr_find is not there yet")

    def call(name):
        rng = np.random.default_rng(seed)
        net = _net(name, sizes, hidden, pair, dt)
        X = make_X(rng, n, sizes[0], xdtype, layout, poison, pos)
        y = apply_label_fault(rng.integers(0, sizes[-1], n), label_fault, sizes[-1])
        before = net.get_params()
        res = fastmlp.lr_find(net, X, y, start=start, end=end, num_iter=num_iter, batch_size=batch_size, seed=seed)
        for a, b in zip(before[0] + before[1], net.weights + net.biases):
            np.testing.assert_array_equal(a, b)  # the network is restored
        return np.asarray(res.lrs), np.asarray(res.raw_losses, dtype=float)

    differential(call, TOL[np.dtype(dt)])


@fuzz(250)
@given(dt=st.sampled_from(FLOAT_DTYPES), sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4), hidden=HIDDEN,
       pair=st.sampled_from(PAIRS), fit=st.booleans(), seed=seeds,
       damage=st.sampled_from(["flip", "flip", "flip", "truncate", "truncate", "garbage", "empty", "append", "none"]),
       n_flips=st.integers(1, 4), data=st.data())  # fmt: skip
def test_save_load(tmp_path_factory, dt, sizes, hidden, pair, fit, seed, damage, n_flips, data):
    _cases[0] += 1
    rng = np.random.default_rng(seed)
    if pair[0] == "softmax" and sizes[-1] < 2:  # a softmax needs two units (one unit: a sigmoid)
        sizes = [*sizes[:-1], 2]
    net = Network(sizes, activation=hidden, output=pair[0], loss=pair[1], dtype=dt, backend="numpy", seed=seed % 1000)
    X = rng.uniform(-1, 1, (6, sizes[0]))
    if fit:
        net.fit(X, rng.integers(0, sizes[-1], 6), epochs=1, batch_size=3, dropout=0.25, seed=1, verbose=False)
    path = net.save(tmp_path_factory.mktemp("m") / "model")
    raw = bytearray(path.read_bytes())
    if damage == "none":
        for name in BACKENDS:
            back = Network.load(path, backend=name)
            assert back.config() == net.config() and back.step_ == net.step_ and back.dropout_ == net.dropout_
            for a, b in zip(net.weights + net.biases, back.weights + back.biases):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(back.predict_proba(X), net.predict_proba(X), rtol=TOL[net.dtype], atol=TOL[net.dtype])
        return
    if damage == "flip":
        for _ in range(n_flips):
            i = data.draw(st.integers(0, len(raw) - 1), label="offset")
            raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    elif damage == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    elif damage == "garbage":
        raw = bytearray(rng.integers(0, 256, data.draw(st.integers(0, 2000), label="size"), dtype=np.uint8).tobytes())
    elif damage == "empty":
        raw = bytearray()
    elif damage == "append":
        raw += b"\x00junk" * 3
    path.write_bytes(bytes(raw))
    kind, back = run(lambda: Network.load(path, backend="numpy"))
    if kind == "raised":
        assert isinstance(back, ValueError), f"damaged model file: {type(back).__name__}: {back}"
    else:  # the damage hit bytes that do not matter: the model must still be valid and usable
        assert back.layers == net.layers
        assert back.predict_proba(X).shape == (6, sizes[-1])


def test_load_missing_file(tmp_path):
    _cases[0] += 1
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "nope.npz")


# ------------------------------------------------------------------ compat (the notebook's API)
@fuzz(200)
@given(num_features=st.sampled_from([1, 3, 784, 0, -1, 2.0, "3"]), num_hidden=st.sampled_from([1, 4, 0, None]),
       num_classes=st.sampled_from([1, 3, 10, 0, True]),
       random_seed=st.sampled_from([123, 0, 2**32 - 1, 2**32, -1, 1.5, None]))  # fmt: skip
def test_compat_constructor(num_features, num_hidden, num_classes, random_seed):
    _cases[0] += 1
    kind, m = run(lambda: compat.NeuralNetMLP(num_features, num_hidden, num_classes, random_seed=random_seed))
    if kind == "raised":
        assert isinstance(m, DOCUMENTED), f"{type(m).__name__}: {m}"
        return
    assert m.weight_h.shape == (num_hidden, num_features) and m.weight_out.shape == (num_classes, num_hidden)
    repr(m)


@fuzz(200)
@given(n=st.integers(0, 8), num_labels=st.sampled_from([1, 3, 10, 0, -1, 2.5, None]), seed=seeds,
       label_fault=st.sampled_from(LABEL_FAULTS))  # fmt: skip
def test_compat_int_to_onehot(n, num_labels, seed, label_fault):
    _cases[0] += 1
    rng = np.random.default_rng(seed)
    k = num_labels if isinstance(num_labels, int) and num_labels > 0 else 3
    y = apply_label_fault(rng.integers(0, k, n), label_fault, k)
    kind, out = run(lambda: compat.int_to_onehot(y, num_labels))
    if kind == "raised":
        assert isinstance(out, DOCUMENTED), f"{type(out).__name__}: {out}"
        return
    yy = np.asarray(y).reshape(-1).astype(np.int64)
    expected = np.zeros((yy.size, num_labels))
    expected[np.arange(yy.size), yy] = 1
    np.testing.assert_array_equal(out, expected)


@contextlib.contextmanager
def _compat_backend(name):
    old = compat.backend
    compat.backend = name
    try:
        yield
    finally:
        compat.backend = old


@fuzz(250)
@given(n=st.sampled_from([100, 150, 250, 99, 0]), f=st.integers(1, 5), h=st.integers(1, 4), k=st.integers(1, 4),
       xdtype=st.sampled_from(X_DTYPES[:2] * 4 + X_DTYPES), layout=st.sampled_from(["C"] * 6 + ["F", "strided", "1d", "wrong_f"]),
       poison=st.sampled_from(["none"] * 8 + ["nan", "inf"]), pos=st.integers(0, 99), seed=seeds,
       label_fault=st.sampled_from(LABEL_FAULTS), num_labels=st.sampled_from(["k", "k", 10, 0, 2.0]),
       mbs=st.sampled_from([100, 100, 7, 0, 1000]), nan_weights=st.sampled_from([False] * 5 + [True]))  # fmt: skip
def test_compat_compute_mse_and_acc(n, f, h, k, xdtype, layout, poison, pos, seed, label_fault, num_labels, mbs, nan_weights):
    def call(name):
        rng = np.random.default_rng(seed)
        model = compat.NeuralNetMLP(f, h, k, random_seed=seed % 1000)
        if nan_weights:
            model.weight_out[0, 0] = np.nan  # a diverged model: NaN propagates as in the notebook
        X = make_X(rng, n, f, xdtype, layout, poison, pos)
        y = apply_label_fault(rng.integers(0, k, n), label_fault, k)
        np.random.seed(seed)
        with _compat_backend(name):
            mse, acc = compat.compute_mse_and_acc(model, X, y, num_labels=k if num_labels == "k" else num_labels,
                                                  minibatch_size=mbs)  # fmt: skip
        return float(mse), float(acc)

    # NaN results compare equal to NaN (assert_allclose treats NaN == NaN)
    differential(call, 1e-9)


@fuzz(120)
@given(n=st.sampled_from([100, 200, 120, 50]), f=st.integers(1, 4), h=st.integers(1, 4), k=st.integers(1, 4),
       xdtype=st.sampled_from(["float64", "float64", "float32", "uint8", "complex128"]), seed=seeds,
       epochs=st.sampled_from([0, 1, 2, -1]), lr=st.sampled_from([0.1, 0.5, -0.1]), mbs=st.sampled_from([100, 30, 0]),
       valid=st.sampled_from(["ok", "ok", "ok", "wrong_f", "few", "labels"]))  # fmt: skip
def test_compat_train(n, f, h, k, xdtype, seed, epochs, lr, mbs, valid):
    def call(name):
        rng = np.random.default_rng(seed)
        model = compat.NeuralNetMLP(f, h, k, random_seed=seed % 1000)
        X = make_X(rng, n, f, xdtype, "C", "none", 0)
        y = rng.integers(0, k, n)
        Xv, yv = X[:100], y[:100]
        if valid == "wrong_f":
            Xv = np.ones((100, f + 1))
        elif valid == "few":
            Xv, yv = X[:10], y[:10]
        elif valid == "labels":
            yv = yv + k
        np.random.seed(seed)
        old = compat.minibatch_size
        compat.minibatch_size = mbs
        try:
            with _compat_backend(name), contextlib.redirect_stdout(io.StringIO()):
                curves = compat.train(model, X, y, Xv, yv, num_epochs=epochs, learning_rate=lr)
        finally:
            compat.minibatch_size = old
        return [np.array(c, dtype=float) for c in curves], [model.weight_h, model.bias_h, model.weight_out, model.bias_out]

    differential(call, 1e-9)

