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

Cases are counted per class (kernels, Network ..., integer aliasing, tampered
parameters, file limits, interrupts) with the outcomes the helpers classify
(wrong results, unclear errors, hangs, data lost); a failing case also fails
its test.

``FASTMLP_FUZZ_COUNT_FILE``: where the number of executed cases is written;
``<that>.json`` gets the per-class table, ``<that>.current`` the class running
(so that the parent can name the class of a crash).
``FASTMLP_FUZZ_SCALE``: multiplies every property's ``max_examples`` (default 1).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import os
import signal
import struct
import zipfile
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
from fastmlp.callbacks import Callback
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
#: the class of the running test (set per test function) and the per-class table
CLASSES = {"test_kernel_": "kernels", "test_network_constructor": "Network constructor",
           "test_network_inference": "Network inference", "test_network_fit": "Network fit",
           "test_network_mc_predict": "mc_predict", "test_lr_find": "lr_find", "test_save_load": "save/load",
           "test_load_missing": "save/load", "test_compat": "compat", "test_int_alias": "integer aliasing",
           "test_tampered": "tampered parameters", "test_file_": "file limits", "test_idx_": "file limits",
           "test_interrupt": "interrupts"}  # fmt: skip
OUTCOMES = ("cases", "crashes", "hangs", "wrong results", "unclear errors", "data lost")
STATS: dict[str, dict[str, int]] = {}
_current = ["?"]


def _count_file(suffix: str = "") -> Path | None:
    path = os.environ.get("FASTMLP_FUZZ_COUNT_FILE")
    return Path(path + suffix) if path else None


def count() -> None:
    """One more case of the running class."""
    _cases[0] += 1
    STATS.setdefault(_current[0], dict.fromkeys(OUTCOMES, 0))["cases"] += 1


def bad(outcome: str, message: str) -> AssertionError:
    """Record a failed case of the running class; the caller raises what this returns."""
    STATS.setdefault(_current[0], dict.fromkeys(OUTCOMES, 0))[outcome] += 1
    return AssertionError(f"[{outcome}] {message}")


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail the case as a hang when it takes longer than ``seconds`` (SIGALRM, main thread)."""

    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    except Hang as exc:
        raise bad("hangs", str(exc)) from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _class_of_test(request):
    name = request.node.name
    _current[0] = next((c for prefix, c in CLASSES.items() if name.startswith(prefix)), "other")
    STATS.setdefault(_current[0], dict.fromkeys(OUTCOMES, 0))
    path = _count_file(".current")
    if path:
        path.write_text(_current[0])
    yield


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
    for name, row in STATS.items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    path = _count_file()
    if path:
        path.write_text(str(_cases[0]))
        _count_file(".json").write_text(json.dumps(STATS))


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
    count()
    kind, ref = run(lambda: call("numpy"))
    if kind == "raised" and not isinstance(ref, allowed):
        raise bad("unclear errors", f"reference raised an undocumented {type(ref).__name__}: {ref}") from ref
    try:
        _compare(call, kind, ref, tol, backends)
    except AssertionError as exc:
        raise bad("unclear errors" if "raised" in str(exc) else "wrong results", str(exc)) from exc
    return kind


def _compare(call, kind, ref, tol, backends) -> None:
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
    count()
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
    count()
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
    count()
    with pytest.raises(FileNotFoundError):
        Network.load(tmp_path / "nope.npz")


# ------------------------------------------------------------------ compat (the notebook's API)
@fuzz(200)
@given(num_features=st.sampled_from([1, 3, 784, 0, -1, 2.0, "3"]), num_hidden=st.sampled_from([1, 4, 0, None]),
       num_classes=st.sampled_from([1, 3, 10, 0, True]),
       random_seed=st.sampled_from([123, 0, 2**32 - 1, 2**32, -1, 1.5, None]))  # fmt: skip
def test_compat_constructor(num_features, num_hidden, num_classes, random_seed):
    count()
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
    count()
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


# ------------------------------------------------------------------ integer aliasing
def documented_or(fn, what: str, allowed=DOCUMENTED):
    """``fn()``'s result, or None after a documented exception; anything else is an unclear error."""
    try:
        return fn()
    except allowed:
        return None
    except Exception as exc:
        raise bad("unclear errors", f"{what}: {type(exc).__name__}: {exc}") from exc


def _same_or_raise(aliased, clean, what: str) -> None:
    """The aliased call gave a documented error (None) or exactly the result of the same call on copies."""
    if aliased is None:
        return
    if clean is None:
        raise bad("wrong results", f"{what}: succeeded with aliased integers where copies raise")
    try:
        assert_same(clean, aliased, 0.0, what)
    except AssertionError as exc:
        raise bad("wrong results", f"{what}: aliased integers changed the result: {exc}") from None


def _int_view(a: np.ndarray) -> np.ndarray:
    """The 1-D integer view of ``a``'s memory (int64 for float64, int32 for float32)."""
    return a.reshape(-1).view(np.int64 if a.dtype == np.float64 else np.int32)


@fuzz(160)
@given(dt=st.sampled_from(FLOAT_DTYPES), n=st.integers(1, 6), f=st.integers(1, 4), k=st.integers(1, 4), seed=seeds,
       where=st.sampled_from(["order=bias", "order=weight", "order=state", "y=out", "y=bias (kernel)", "fit y=bias",
                              "fit y=weight", "fit sample_weight=bias", "fit X=weight"]),
       backend=st.sampled_from(BACKENDS))  # fmt: skip
def test_int_aliasing(dt, n, f, k, seed, where, backend):
    """Integer arrays (labels, order) or inputs that are views of buffers the call writes."""
    count()
    be = fastmlp.get_backend(backend)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    perm = rng.permutation(n)
    X = rng.uniform(-1, 1, (n, f)).astype(dt)
    per = 2 if dt == "float32" else 1  # int32 views of float32: one label per element

    if where.startswith("order=") or where == "y=bias (kernel)":
        sizes = [f, n * per, k] if where != "order=weight" else [f, k]

        def call(alias: bool):
            r = np.random.default_rng(seed)
            Ws, bs = _params(r, sizes, dt)
            state = OptimizerState.zeros("momentum", sizes, dt) if where == "order=state" else None
            host = {"order=bias": bs[0], "order=weight": Ws[0], "order=state": None, "y=bias (kernel)": bs[0]}[where]
            if where == "order=state":
                host = state.weights[0][0]
            view = _int_view(host)
            values = perm if where.startswith("order=") else labels
            if view.size < n:
                return "skip"
            view[:n] = values
            host_copy = view[:n].copy()
            order = view[:n] if alias and where.startswith("order=") else (host_copy if where.startswith("order=") else perm)
            y = view[:n] if alias and where == "y=bias (kernel)" else (host_copy if where == "y=bias (kernel)" else labels)
            extra = {"momentum": 0.9} if state is not None else {}
            plan = plan_epoch(sizes, dt, batch_size=2, hidden="sigmoid", output="softmax", loss="ce",
                              optimizer="momentum" if state is not None else "sgd", **extra)  # fmt: skip
            res = be.train_epoch(X, y, order, (Ws, bs), state, 0.3, plan, 0)
            return tuple(res), Ws, bs, [] if state is None else state.arrays()

        clean = documented_or(lambda: call(False), where)
        if clean == "skip":
            return
        _same_or_raise(documented_or(lambda: call(True), where), clean, f"{where} ({backend}, {dt})")
        return

    if where == "y=out":

        def call(alias: bool):
            A = np.random.default_rng(seed).uniform(0.05, 0.95, (n, k)).astype(dt)
            out = np.zeros((n, k), dtype=dt)
            view = _int_view(out)
            if view.size < n:
                return "skip"
            view[:n] = labels
            y = view[:n] if alias else view[:n].copy()
            if not alias:
                out = np.zeros((n, k), dtype=dt)
            d, loss, nc = be.output_delta(A, y, "softmax" if k > 1 else "sigmoid", "ce", out=out)
            return d.copy(), loss, nc

        clean = documented_or(lambda: call(False), where)
        if clean == "skip":
            return
        _same_or_raise(documented_or(lambda: call(True), where), clean, f"{where} ({backend}, {dt})")
        return

    # fit on a Network: y, sample_weight or X share memory with the network's parameters
    hidden = n * per if where in ("fit y=bias", "fit sample_weight=bias") else n

    def call(alias: bool):
        net = Network([f, hidden, max(k, 2)], dtype=dt, backend=backend, seed=seed % 1000)
        kw: dict = {}
        Xa, ya = X, labels
        if where == "fit y=bias":
            view = _int_view(net.biases[0])
            view[:n] = labels
            ya = view[:n] if alias else view[:n].copy()
        elif where == "fit y=weight":
            view = _int_view(net.weights[0])
            if view.size < n:
                return "skip"
            view[:n] = labels
            ya = view[:n] if alias else view[:n].copy()
        elif where == "fit sample_weight=bias":
            net.biases[0][:] = np.abs(net.biases[0]) + 0.1
            sw = net.biases[0][::per] if per == 2 else net.biases[0]
            kw["sample_weight"] = sw if alias else sw.copy()
        elif where == "fit X=weight":  # W0 is (n, f): the data is the first layer's weights
            Xa = net.weights[0] if alias else net.weights[0].copy()
        hist = net.fit(Xa, ya, epochs=2, batch_size=2, lr=0.3, seed=1, verbose=False, warn=False, **kw)
        return net.weights, net.biases, np.array(hist.train_loss)

    clean = documented_or(lambda: call(False), where)
    if clean == "skip":
        return
    _same_or_raise(documented_or(lambda: call(True), where), clean, f"{where} ({backend}, {dt})")


# ------------------------------------------------------------------ tampered parameters
TAMPER = ("shape", "ndim", "other_float", "int", "F", "strided", "nan", "inf", "shared", "shared_col", "readonly",
          "list", "zero_d", "bigendian", "object")  # fmt: skip


def _tamper(a: np.ndarray, fault: str, other: np.ndarray):
    if fault == "shared":  # the same array as another parameter of that shape, else a view of it
        return other if other.shape == a.shape else a
    if fault == "shared_col":  # a view into another parameter
        return other.reshape(-1)[: a.size].reshape(a.shape) if other.size >= a.size else a
    if fault == "zero_d":
        return np.float64(a.reshape(-1)[0]) if a.size else np.float64(0)
    if fault == "int":
        return np.rint(a * 3).astype(np.int64)
    return apply_fault(a, {"other_float": "otherfloat"}.get(fault, fault), 0)


@fuzz(180)
@given(dt=st.sampled_from(FLOAT_DTYPES), sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3), seed=seeds,
       which=st.integers(0, 3), fault=st.sampled_from(TAMPER), backend=st.sampled_from(BACKENDS),
       method=st.sampled_from(["fit", "predict", "predict_proba", "mc_predict", "evaluate", "set_params", "save",
                               "forward", "get_params"]))  # fmt: skip
def test_tampered_parameters(tmp_path_factory, dt, sizes, seed, which, fault, backend, method):
    """A weight or bias replaced on the network (wrong shape, dtype, layout, non-finite, shared, read-only)."""
    count()
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (5, sizes[0]))
    y = rng.integers(0, sizes[-1], 5)
    out_dir = tmp_path_factory.mktemp("tamper")

    def make():
        return Network(sizes, activation="tanh", output="softmax" if sizes[-1] > 1 else "sigmoid", loss="ce",
                       dtype=dt, backend=backend, seed=seed % 997)  # fmt: skip

    def act(net, path):
        if method == "fit":
            h = net.fit(X, y, epochs=1, batch_size=2, lr=0.2, seed=3, dropout=0.2, verbose=False, warn=False)
            return [*net.weights, *net.biases, np.array(h.train_loss)]
        if method == "mc_predict":
            r = net.mc_predict(X, n_samples=3, seed=2, dropout=0.3)
            return [r.mean, r.std]
        if method == "evaluate":
            return list(net.evaluate(X, y))
        if method == "set_params":
            clean = make()
            net.set_params(clean.weights, clean.biases)
            return [*net.weights, *net.biases, net.predict_proba(X)]
        if method == "save":
            net.save(path)
            back = Network.load(path, backend=backend)
            return [*back.weights, *back.biases]
        if method == "get_params":
            W, b = net.get_params()
            return [np.asarray(a, dtype=float) for a in (*W, *b)]
        res = getattr(net, method)(X)
        return list(_arrays(res)) if isinstance(res, (list, tuple)) else [res]

    net = make()
    params = [*net.weights, *net.biases]
    i = which % len(params)
    other = params[(i + 1) % len(params)]
    bad_value = _tamper(params[i], fault, other)
    values_ok = fault in ("F", "strided", "readonly", "list", "bigendian")  # the values are untouched
    if i < len(net.weights):
        net.weights[i] = bad_value
    else:
        net.biases[i - len(net.weights)] = bad_value
    snapshot = copy.deepcopy(bad_value)  # the values as they were before the call (which may write them)
    path = out_dir / "model.npz"
    make().save(path)  # a model already there: a refused save must leave it intact
    before = path.read_bytes()
    got = documented_or(lambda: act(net, path), f"{method} after {fault} (parameter {i}, {backend})")
    if method == "save" and got is None and path.read_bytes() != before:
        raise bad("data lost", f"a refused save ({fault}) changed the file already at {path}")
    if got is None or method in ("get_params",):
        return
    if not values_ok and method not in ("set_params",):
        # accepted although the values or the structure are not the network's: must at least give what the
        # same network with these values would give (set_params casts them), or have refused
        ref_net = make()
        vals = [*ref_net.weights, *ref_net.biases]
        vals[i] = snapshot
        L = len(ref_net.weights)
        try:
            ref_net.set_params(vals[:L], vals[L:])
        except DOCUMENTED:
            raise bad("wrong results", f"{method} accepted a parameter set_params refuses ({fault}, parameter {i})") from None
        if fault in ("shared", "shared_col") and method == "fit":
            raise bad("wrong results", f"fit trained parameters sharing memory ({fault}, parameter {i})")
        ref = act(ref_net, out_dir / "ref.npz")
    else:
        ref = act(make(), out_dir / "ref.npz")
    try:
        assert_same([np.asarray(a) for a in ref], [np.asarray(a) for a in got], TOL[np.dtype(dt)], method)
    except AssertionError as exc:
        raise bad("wrong results", f"{method} after {fault} (parameter {i}, {backend}): {exc}") from None


# ------------------------------------------------------------------ file limits
def _npy_bytes(header: dict, payload: bytes) -> bytes:
    """A ``.npy`` member with a forged header."""
    h = repr(header).encode()
    h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + payload


def _rewrite_zip(raw: bytes, change) -> bytes:
    """The zip ``raw`` with its members passed through ``change(name, data) -> [(name, data), ...]``."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            for name, data in change(info.filename, src.read(info)):
                dst.writestr(name, data)
    return buf.getvalue()


FILE_DAMAGE = ("fifo", "dir", "devzero", "symlink_devzero", "huge_shape", "negative_shape", "extra_member",
               "traversal_member", "pickle_member", "flip", "truncate", "claimed_size", "missing_meta", "empty")  # fmt: skip


def _damage_file(path: Path, damage: str, raw: bytes, pos: int, member: str) -> None:
    """Replace the file at ``path`` as ``damage`` says (its valid bytes: ``raw``)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if damage == "fifo":
        os.mkfifo(path)
    elif damage == "dir":
        path.mkdir()
    elif damage == "symlink_devzero":
        path.symlink_to("/dev/zero")
    elif damage == "devzero":  # a path that is the device itself
        path.symlink_to("/dev/zero")
    else:
        if damage in ("huge_shape", "negative_shape"):
            shape = (2**40, 3) if damage == "huge_shape" else (-1, 3)
            forged = _npy_bytes({"descr": "<f8", "fortran_order": False, "shape": shape}, b"\0" * 48)
            raw = _rewrite_zip(raw, lambda n, d: [(n, forged if n.startswith(member) else d)])
        elif damage == "extra_member":
            raw = _rewrite_zip(raw, lambda n, d: [(n, d), ("extra.npy", d)] if n.startswith("meta") else [(n, d)])
        elif damage == "traversal_member":
            raw = _rewrite_zip(raw, lambda n, d: [("../" + n if n.startswith(member) else n, d)])
        elif damage == "pickle_member":
            obj = _npy_bytes({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x80\x04N.")
            raw = _rewrite_zip(raw, lambda n, d: [(n, obj if n.startswith(member) else d)])
        elif damage == "flip":
            b = bytearray(raw)
            b[pos % len(b)] ^= 1 << (pos % 8)
            raw = bytes(b)
        elif damage == "truncate":
            raw = raw[: pos % len(raw)]
        elif damage == "claimed_size":  # a local header claiming 4 GiB uncompressed
            b = bytearray(raw)
            off = raw.find(b"PK\x03\x04")
            struct.pack_into("<I", b, off + 22, 2**32 - 1)
            raw = bytes(b)
        elif damage == "missing_meta":
            raw = _rewrite_zip(raw, lambda n, d: [] if n.startswith("meta") else [(n, d)])
        elif damage == "empty":
            raw = b""
        path.write_bytes(raw)


@fuzz(200)
@given(damage=st.sampled_from(FILE_DAMAGE), target=st.sampled_from(["model", "checkpoint"]), pos=st.integers(0, 10**6),
       member=st.sampled_from(["W0", "b0", "meta"]), optimizer=st.sampled_from(["sgd", "adam"]))  # fmt: skip
def test_file_limits(tmp_path_factory, damage, target, pos, member, optimizer):
    """Model files and checkpoints that are FIFOs, directories, /dev/zero, forged, extended or flipped."""
    count()
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(pos)
    X, y = rng.uniform(-1, 1, (12, 3)), rng.integers(0, 2, 12)
    net = Network([3, 4, 2], backend="numpy", seed=1)
    kw = dict(epochs=3, batch_size=4, lr=0.2, seed=5, optimizer=optimizer, verbose=False, warn=False)
    path = d / ("model.npz" if target == "model" else "ckpt.npz")
    if target == "model":
        net.fit(X, y, **{**kw, "epochs": 1})
        net.save(path)
    else:
        net.fit(X, y, checkpoint=path, **{**kw, "epochs": 2})  # a checkpoint after 2 of 3 epochs: resume goes on
        kw["epochs"] = 3
    raw = path.read_bytes()
    _damage_file(path, damage, raw, pos, member)
    damaged = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    with no_hang(20):
        if target == "model":
            got = documented_or(lambda: Network.load(path, backend="numpy"), f"load of a {damage} model file",
                                allowed=(ValueError,))  # fmt: skip
            if got is not None and damage not in ("flip", "claimed_size"):
                raise bad("wrong results", f"a {damage} model file was loaded")
            if got is not None:  # a flip in bytes that do not matter (or a local header unread): the same model
                for a, b in zip(net.weights + net.biases, got.weights + got.biases):
                    if not np.array_equal(a, b):
                        raise bad("wrong results", "a flipped model file loaded with other weights")
            return
        fresh = Network([3, 4, 2], backend="numpy", seed=1)
        hist = documented_or(lambda: fresh.fit(X, y, checkpoint=path, resume=True, **kw),
                             f"resume from a {damage} checkpoint", allowed=(ValueError,))  # fmt: skip
    if hist is None:
        if damaged is not None and path.read_bytes() != damaged:
            raise bad("data lost", "a refused resume changed the checkpoint")
        return
    if damage not in ("flip", "claimed_size"):
        raise bad("wrong results", f"resumed from a {damage} checkpoint")
    whole = Network([3, 4, 2], backend="numpy", seed=1)
    whole.fit(X, y, **kw)
    for a, b in zip(whole.weights + whole.biases, fresh.weights + fresh.biases):
        if not np.array_equal(a, b):
            raise bad("wrong results", "resumed from a flipped checkpoint with other weights than a whole run")


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


@fuzz(200)
@given(n=st.integers(0, 5), rows=st.integers(0, 4), cols=st.integers(0, 4), gz=st.booleans(), which=st.integers(0, 1),
       forge=st.sampled_from(["none", "none", "magic", "magic_swapped", "dims_huge", "dims_more", "dims_fewer",
                              "count_mismatch", "trailing", "trailing_big", "truncated", "header_only", "empty",
                              "fifo", "dir", "devzero", "gzip_garbage", "gzip_truncated"]),
       pos=st.integers(0, 999))  # fmt: skip
def test_idx_files(tmp_path_factory, n, rows, cols, gz, which, forge, pos):
    """IDX image/label files with forged headers, trailing data, truncation, or not regular files at all."""
    from fastmlp.datasets import load_idx

    count()
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(pos)
    pix = rng.integers(0, 256, n * rows * cols, dtype=np.uint8).tobytes()
    lab = rng.integers(0, 10, n, dtype=np.uint8).tobytes()
    files = [(2051, [n, rows, cols], pix), (2049, [n], lab)]
    magic, dims, payload = files[which]
    valid = forge == "none"
    if forge == "magic":
        magic = 2049 if magic == 2051 else 2051
    elif forge == "magic_swapped":
        magic = int.from_bytes(struct.pack("<I", magic), "big")
    elif forge == "dims_huge":
        dims = [2**32 - 1] * len(dims)
    elif forge == "count_mismatch":
        dims = [dims[0] + 1, *dims[1:]]
        payload += b"\0" * (len(payload) // max(dims[0] - 1, 1) if dims[0] > 1 else max(1, len(payload)))
    elif forge == "trailing":
        payload += b"\0"
    elif forge == "trailing_big":
        payload += b"\0" * 100_000
    elif forge == "truncated":
        if not payload:
            valid = True  # nothing to cut
        payload = payload[: max(0, len(payload) - 1)]
    raw = _idx(magic, tuple(dims), payload)
    if forge == "dims_more":
        raw = _idx(magic, (*dims, 3), payload)
    elif forge == "dims_fewer":
        raw = raw[: 4 + 4 * (len(dims) - 1)] if len(dims) > 1 else raw[:4]
    elif forge == "header_only":
        raw = raw[: 4 + 4 * len(dims)]
        valid = not payload
    elif forge == "empty":
        raw = b""
    paths = [d / "images", d / "labels"]
    for (m, dd, pl), p in zip(files, paths):
        p.write_bytes(_idx(m, tuple(dd), pl))
    target = paths[which]
    target.write_bytes(raw)
    if gz or forge.startswith("gzip"):
        target.unlink()
        target = target.with_suffix(".gz")
        paths[which] = target
        blob = gzip.compress(raw)
        if forge == "gzip_garbage":
            blob += b"garbage!"
        elif forge == "gzip_truncated":
            blob = blob[: max(1, len(blob) - 5)]
        target.write_bytes(blob)
    if forge == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif forge == "dir":
        target.unlink()
        target.mkdir()
    elif forge == "devzero":
        target.unlink()
        target.symlink_to("/dev/zero")
    with no_hang(20):
        got = documented_or(lambda: load_idx(*paths), f"load_idx ({forge})", allowed=(ValueError,))
    if got is None:
        if valid:
            raise bad("wrong results", f"a valid IDX file ({n} x {rows} x {cols}, gz={gz}) was refused")
        return
    if not valid:
        raise bad("wrong results", f"a {forge} IDX file was read")
    Xl, yl = got
    if Xl.shape != (n, rows * cols) or not np.array_equal(Xl.reshape(-1), np.frombuffer(pix, np.uint8)) \
            or not np.array_equal(yl, np.frombuffer(lab, np.uint8)):  # fmt: skip
        raise bad("wrong results", "load_idx returned other pixels or labels than the file holds")


# ------------------------------------------------------------------ interrupts
class _Raiser:
    """KeyboardInterrupt from one hook at one epoch (a callback, the schedule, or the validation score)."""

    def __init__(self, hook: str, at: int) -> None:
        self.hook, self.at, self.fired = hook, at, False

    def maybe(self, hook: str, epoch: int) -> None:
        if hook == self.hook and epoch == self.at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


class _RaisingCallback(Callback):
    def __init__(self, raiser: _Raiser) -> None:
        self.r = raiser

    def on_train_begin(self, net, history):
        self.r.maybe("on_train_begin", 0)

    def on_epoch_end(self, net, history):
        self.r.maybe("on_epoch_end", len(history.epoch))
        return False

    def on_train_end(self, net, history):
        self.r.maybe("on_train_end", 0)


class _RaisingSchedule:
    def __init__(self, raiser: _Raiser, lr: float) -> None:
        self.r, self.lr, self.seen = raiser, lr, 0

    def on_train_begin(self, history):
        self.r.maybe("schedule.on_train_begin", 0)

    def epoch_lrs(self, epoch, n_steps):
        self.r.maybe("schedule.epoch_lrs", epoch + 1)
        return np.full(n_steps, self.lr / (1 + 0.1 * epoch))

    def step_epoch(self, history):
        self.r.maybe("schedule.step_epoch", len(history.epoch))


HOOKS = ("on_train_begin", "on_epoch_end", "on_train_end", "score", "schedule.on_train_begin", "schedule.epoch_lrs",
         "schedule.step_epoch")  # fmt: skip


@fuzz(70)
@given(backend=st.sampled_from(BACKENDS), hook=st.sampled_from(HOOKS), at=st.integers(1, 4),
       optimizer=st.sampled_from(["sgd", "momentum", "adam"]), first=st.booleans(), es=st.booleans(),
       dropout=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 1000))  # fmt: skip
def test_interrupts(tmp_path_factory, backend, hook, at, optimizer, first, es, dropout, seed):
    """KeyboardInterrupt from each hook: history, weights, optimizer state and checkpoint show one epoch."""
    from fastmlp.callbacks import EarlyStopping

    count()
    d = tmp_path_factory.mktemp("intr")
    rng = np.random.default_rng(seed)
    X, y = rng.uniform(-1, 1, (24, 4)), rng.integers(0, 3, 24)
    raiser = _Raiser(hook, 0 if hook.endswith("train_begin") or hook == "on_train_end" else at)
    epochs = 4

    def score_fn(y_true, proba, **kw):
        raiser.maybe("score", score_fn.calls + 1)
        score_fn.calls += 1
        return float(np.mean(np.argmax(proba, 1) == y_true))

    def setup(epochs_, with_raiser):
        net = Network([4, 5, 3], backend=backend, seed=seed)
        cbs = [EarlyStopping(patience=10)] if es else []
        this = raiser if with_raiser else _Raiser("none", -1)  # the reference has the same callbacks, never raising
        cbs.insert(0 if first else len(cbs), _RaisingCallback(this))
        sched = _RaisingSchedule(this, 0.3)
        kw = dict(epochs=epochs_, batch_size=5, lr=sched, optimizer=optimizer, dropout=dropout, seed=7, X_valid=X,
                  y_valid=y, callbacks=cbs, verbose=False, warn=False)  # fmt: skip
        return net, kw

    score_fn.calls = 0
    net, kw = setup(epochs, True)
    ckpt = d / "ckpt.npz"
    scorer = None
    if hook == "score":
        scorer = score_fn
    with no_hang(60), contextlib.redirect_stderr(io.StringIO()):
        try:
            hist = net.fit(X, y, checkpoint=ckpt, score=scorer, **kw)
        except KeyboardInterrupt:
            hist = None  # raised after the run (on_train_end): the network is still the last complete epoch
        except Exception as exc:
            raise bad("unclear errors", f"an interrupt from {hook} became {type(exc).__name__}: {exc}") from exc
    done = net.epochs_
    if hist is not None and len(hist.epoch) != done:
        raise bad("data lost", f"{hook}: history has {len(hist.epoch)} epochs, the network says {done}")
    if hist is not None and raiser.fired and hook != "on_train_end" and not hist.interrupted:
        raise bad("data lost", f"{hook}: an interrupted fit's history is not marked interrupted")
    if done:
        score_fn.calls = 10**9  # the reference never raises
        ref, rkw = setup(done, False)
        rhist = ref.fit(X, y, score=score_fn if hook == "score" else None, **rkw)
        checks = [("weights", ref.weights + ref.biases, net.weights + net.biases),
                  ("optimizer state", ref.optimizer_state_.arrays(), net.optimizer_state_.arrays())]  # fmt: skip
        for what, a, b in checks:
            if len(a) != len(b) or not all(np.array_equal(p, q) for p, q in zip(a, b)):
                raise bad("data lost", f"{hook} at epoch {at}: {what} differ from a whole run of {done} epochs")
        if ref.optimizer_state_.t != net.optimizer_state_.t or ref.step_ != net.step_:
            raise bad("data lost", f"{hook}: the step counters differ from a whole run of {done} epochs")
        if hist is not None and list(hist.train_loss) != list(rhist.train_loss):
            raise bad("data lost", f"{hook}: the loss history differs from a whole run of {done} epochs")
    else:
        fresh = Network([4, 5, 3], backend=backend, seed=seed)
        if not all(np.array_equal(p, q) for p, q in zip(fresh.weights + fresh.biases, net.weights + net.biases)):
            raise bad("data lost", f"{hook}: no epoch completed but the weights changed")
    if done and not ckpt.exists():
        raise bad("data lost", f"{hook}: {done} epochs completed but no checkpoint was written")
    if done:  # the checkpoint describes the same completed epoch as a whole run's final checkpoint
        ref_ckpt = d / "ref.npz"
        score_fn.calls = 10**9
        ref2, rkw2 = setup(done, False)
        ref2.fit(X, y, checkpoint=ref_ckpt, score=score_fn if hook == "score" else None, **rkw2)
        (m1, a1), (m2, a2) = _read_ckpt(ckpt), _read_ckpt(ref_ckpt)
        for key in ("epochs_done", "step", "epochs_total", "rng", "optimizer", "callbacks", "mask_seed"):
            if m1[key] != m2[key]:
                raise bad("data lost", f"{hook} at epoch {at}: checkpoint {key} {m1[key]!r}, a whole run's {m2[key]!r}")
        if m1["history"]["train_loss"] != m2["history"]["train_loss"]:
            raise bad("data lost", f"{hook}: the checkpoint's history is not a whole run's")
        if sorted(a1) != sorted(a2) or not all(np.array_equal(a1[k], a2[k]) for k in a1):
            raise bad("data lost", f"{hook} at epoch {at}: the checkpoint's arrays are not a whole run's")


def _read_ckpt(path: Path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in ("meta", "checksum")}
        return json.loads(z["meta"].tobytes()), arrays
