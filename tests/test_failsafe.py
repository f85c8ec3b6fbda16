"""Backends that fail safe: 'auto' moves past a backend that fails at first use, a Numba cache that cannot be
written is turned off with one warning, and an uncompiled or library-less Cython build says how to fix it."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

import fastmlp
from fastmlp import backends as B
from fastmlp import config
from fastmlp.backends import reference


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry's state, so that a backend given up here stays available elsewhere."""
    monkeypatch.setattr(B, "_errors", dict(B._errors))
    monkeypatch.setattr(B, "_cache", dict(B._cache))
    return B


def _fake(name: str, fn: str, exc: Exception, *, fail_times: int | None = None) -> B.Backend:
    """The reference kernels under another backend's name, with ``fn`` raising ``exc`` (``fail_times`` calls,
    or always); a failing ``train_epoch`` scribbles on the weights first, as a half-run epoch would."""
    mod = types.ModuleType(f"fake_{name}")
    for attr in dir(reference):
        if not attr.startswith("__"):
            setattr(mod, attr, getattr(reference, attr))
    mod.NAME = name
    real = getattr(reference, fn)
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if fail_times is None or calls["n"] <= fail_times:
            if fn == "train_epoch":
                args[3][0][...] = 7.0
            raise exc
        return real(*args)

    setattr(mod, fn, failing)
    mod.calls = calls
    return B.Backend(mod)


def _data():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 5))
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _fit(backend):
    X, y = _data()
    net = fastmlp.Network([5, 6, 2], activation="tanh", output="softmax", loss="ce", seed=1, backend=backend)
    net.fit(X, y, epochs=3, batch_size=20, lr=0.2, verbose=0)
    return net


def test_auto_falls_back_past_a_backend_failing_at_its_first_epoch(registry, caplog):
    bad = _fake("cython", "train_epoch", RuntimeError("libfoo.so.1: cannot open shared object file"))
    registry._cache["cython"] = bad
    auto = B.AutoBackend(bad)
    with caplog.at_level(logging.WARNING, logger="fastmlp"):
        net = _fit(auto)
        net2 = _fit(auto)  # the second run neither retries the failed backend nor logs again
    nxt = auto.current
    assert nxt.name != "cython" and net.backend.name == nxt.name
    want = _fit(nxt.name)  # the same run on the backend 'auto' moved to: same bits, the scribble undone
    for a, b in zip([*net.weights, *net.biases], [*want.weights, *want.biases]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(net2.weights[0], want.weights[0])
    assert bad.raw.calls["n"] == 1
    msgs = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(msgs) == 1 and "libfoo.so.1" in msgs[0] and "train_epoch" in msgs[0], msgs
    errors = fastmlp.backends.backend_errors()
    assert "first train_epoch" in errors["cython"] and "libfoo.so.1" in errors["cython"]
    assert "cython" not in fastmlp.available_backends()
    with pytest.raises(ImportError, match="first train_epoch"):
        fastmlp.get_backend("cython")


def test_auto_falls_back_at_the_first_prediction(registry):
    trained = _fit("numpy")
    bad = _fake("cython", "forward_network", OSError("cannot allocate thread-local storage"))
    registry._cache["cython"] = bad
    auto = B.AutoBackend(bad)
    net = _fit("numpy")
    net.backend = auto
    X, _ = _data()
    np.testing.assert_allclose(net.predict_proba(X), trained.predict_proba(X), rtol=1e-9)  # backends agree to 1e-9
    assert auto.current.name != "cython" and "forward_network" in fastmlp.backends.backend_errors()["cython"]


def test_auto_does_not_fall_back_on_argument_errors_or_once_a_kernel_has_run(registry):
    bad = _fake("cython", "train_epoch", ValueError("bad argument"))
    registry._cache["cython"] = bad
    auto = B.AutoBackend(bad)
    with pytest.raises(ValueError, match="bad argument"):
        _fit(auto)
    assert auto.current is bad and "cython" not in fastmlp.backends.backend_errors()

    late = _fake("cython", "forward_network", RuntimeError("late failure"), fail_times=0)  # works at first ...
    auto = B.AutoBackend(late)
    net = _fit(auto)
    X, _ = _data()
    net.predict_proba(X)

    def broken(*args):
        raise RuntimeError("late failure")

    late.raw.forward_network = broken  # ... and fails later: that is a bug to see, not a backend to drop
    with pytest.raises(RuntimeError, match="late failure"):
        net.predict_proba(X)
    assert auto.current is late


def test_auto_never_gives_up_the_reference(registry):
    bad = _fake("numpy", "train_epoch", RuntimeError("broken reference"))
    auto = B.AutoBackend(bad)
    with pytest.raises(RuntimeError, match="broken reference"):
        _fit(auto)
    assert auto.current is bad


def test_auto_raw_proxies_attributes_of_the_backend_in_use(registry):
    auto = B.AutoBackend(B.get_backend("numpy"))
    assert auto.raw.NAME == "numpy" and auto.name == "numpy"
    auto.raw.some_flag = 3  # set on the module itself (monkeypatching through auto.raw works)
    try:
        assert reference.some_flag == 3
    finally:
        del auto.raw.some_flag
    assert not hasattr(reference, "some_flag")
    with pytest.raises(TypeError, match="Backend"):
        B.AutoBackend("numpy")


def test_get_backend_auto_is_one_watching_backend():
    auto = fastmlp.get_backend("auto")
    assert isinstance(auto, B.AutoBackend) and fastmlp.get_backend("auto") is auto
    assert auto.name == fastmlp.available_backends()[0]


# ------------------------------------------------------------------ Numba's cache
numba_only = pytest.mark.skipif("numba" not in fastmlp.available_backends(), reason="the numba backend is not available")


@numba_only
def test_unwritable_numba_cache_turns_caching_off_with_one_warning(monkeypatch):
    import numba.core.caching as caching

    import fastmlp.backends.numba as NB

    NB._k()
    monkeypatch.setattr(NB, "_kernels", None)  # as before the first use
    monkeypatch.setattr(config, "CACHE", True)
    monkeypatch.setattr(config, "CACHE_OFF_REASON", None)
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # public from numba 0.60
    monkeypatch.setattr(impl, "_locator_classes", [])  # what a read-only package and no writable HOME leave
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        NB._k()
        NB._k()
    msgs = [str(w.message) for w in seen if "on-disk cache" in str(w.message)]
    assert len(msgs) == 1 and "no locator available" in msgs[0] and "NUMBA_CACHE_DIR" in msgs[0]
    assert config.CACHE is False and config.jit_options()["cache"] is False
    assert "no locator available" in NB.describe() and "cache off" in NB.describe()


@numba_only
def test_cache_problem_is_none_where_numba_can_cache(tmp_path, monkeypatch):
    import numba

    from fastmlp.backends.numba import kernels

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    assert config.cache_problem(kernels.forward.py_func) is None
    with pytest.raises(TypeError, match="Python function"):
        config.cache_problem("forward")
    with pytest.raises(TypeError, match="reason"):
        config.disable_cache("")


@numba_only
def test_numba_without_a_writable_cache_in_a_fresh_process(tmp_path):
    """End to end, as in a read-only install without a writable home: the first kernel compiles and runs,
    with one warning, where it raised RuntimeError('cannot cache function ...') (one small kernel: without
    a cache every compilation is paid in full)."""
    code = textwrap.dedent("""
        import json, warnings
        import numba.core.caching as caching
        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
        impl._locator_classes = []      # no place to cache: Numba raises 'no locator available'
        import numpy as np, fastmlp
        from fastmlp import config
        rng = np.random.default_rng(0)
        A, W, b = rng.normal(size=(5, 3)), rng.normal(size=(2, 3)), rng.normal(size=2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = fastmlp.get_backend("numba").forward(A, W, b, "tanh")
        print(json.dumps({"warnings": [str(w.message) for w in seen if "on-disk cache" in str(w.message)],
                          "cache": config.CACHE, "err": float(np.abs(got - np.tanh(A @ W.T + b)).max())}))
    """)
    env = subprocess_env(FASTMLP_NUMBA_CACHE="1", FASTMLP_NUMBA_PARALLEL="0", FASTMLP_BACKEND="")
    env.pop("NUMBA_CACHE_DIR", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["cache"] is False and len(out["warnings"]) == 1 and out["err"] < 1e-12, out


# ------------------------------------------------------------------ Cython's load errors
def test_missing_libgomp_names_the_package_to_install():
    cy = pytest.importorskip("fastmlp.backends.cython", reason="the Cython kernels are not built")
    msg = cy._fix_for(["baseline: libgomp.so.1: cannot open shared object file: No such file or directory"])
    assert "apt-get install libgomp1" in msg and "rebuild" not in msg and "build_ext" not in msg
    assert "build_ext" in cy._fix_for(["baseline: No module named 'fastmlp.backends.cython._kernels'"])


def test_uncompiled_install_says_why_cython_is_unavailable(tmp_path):
    """A copy of the package without compiled kernels and with setup.py's NOT_BUILT note, as `pip install`
    leaves it without a compiler: the cython backend is unavailable and says why; numba or numpy trains."""
    pkg = Path(fastmlp.__file__).parent
    dest = tmp_path / "fastmlp"
    shutil.copytree(pkg, dest, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "NOT_BUILT.txt"))
    reason = "no working C compiler: CompileError: command 'gcc' failed: No such file or directory"
    (dest / "backends" / "cython" / "NOT_BUILT.txt").write_text(reason + "\n")
    code = textwrap.dedent("""
        import json, numpy as np, fastmlp
        X = np.random.default_rng(0).normal(size=(40, 3)); y = (X[:, 0] > 0).astype(int)
        net = fastmlp.Network([3, 4, 2], output="softmax", loss="ce", seed=0, backend="numpy")
        net.fit(X, y, epochs=1, batch_size=40, lr=0.1, verbose=0)
        print(json.dumps({"file": fastmlp.__file__, "available": fastmlp.available_backends(),
                          "errors": fastmlp.backends.backend_errors()}))
    """)
    env = subprocess_env(PYTHONPATH=str(tmp_path), FASTMLP_CYTHON_ISA="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path))
    assert "cython" not in out["available"] and "numpy" in out["available"]
    err = out["errors"]["cython"]
    assert "not compiled when fastmlp was installed" in err and "command 'gcc' failed" in err and "C compiler" in err


@pytest.mark.skipif("numba" not in fastmlp.available_backends(), reason="numba is not installed")
def test_numba_disable_jit_makes_the_backend_unavailable_with_the_reason(tmp_path):
    """``NUMBA_DISABLE_JIT=1`` (the kernels cannot run as Python): numba is unavailable and says why, 'auto'
    and the other backends still train; asking for numba names the variable."""
    code = textwrap.dedent("""
        import numpy as np, fastmlp
        from fastmlp import Network
        assert "numba" not in fastmlp.available_backends()
        print(fastmlp.backends.backend_errors()["numba"])
        Network([4, 3, 2]).fit(np.random.rand(8, 4), np.zeros(8, np.int64), epochs=1, verbose=False)
        try:
            Network([4, 3, 2], backend="numba")
        except ImportError as exc:
            print("refused:", exc)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=subprocess_env(NUMBA_DISABLE_JIT="1"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("NUMBA_DISABLE_JIT=1") == 2 and "refused:" in res.stdout, res.stdout
