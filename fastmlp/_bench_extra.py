"""The sections of ``fastmlp bench`` beyond the raw training epoch (see :mod:`fastmlp.benchmark`).

* the FMA bound: a small compiled FMA loop over all threads (the Cython build's
  ``fma_peak``), the physical limit beside the measured GEMM peak;
* the avx2 build's rows on a CPU that loads the avx512 build (a child process
  with ``FASTMLP_CYTHON_ISA=avx2``);
* optimizers: Adam and Nesterov epochs against plain SGD on the same network;
* speed as users see it: ``Network.fit`` over several epochs and one
  ``fit(epochs=1)`` call at a time, against the raw epoch;
* inference: ``predict_proba`` at batch 1 and 10,000, against onnxruntime when
  it is importable;
* scikit-learn: its ``MLPClassifier`` defaults against ``fastmlp.sklearn``'s,
  fitted side by side.

Every figure is a median of interleaved rounds; ratios are medians of
same-round ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from fastmlp.backends import available_backends, get_backend
from fastmlp.backends.contract import OptimizerState, plan_epoch

__all__ = ["build_label", "fit_rows", "fma_bound", "optimizer_rows", "predict_rows", "sklearn_rows"]


def build_label(backend: str) -> str:
    """The backend and the build that ran: ``cython (avx512)``, ``numba``, ``numpy``."""
    if backend == "cython":
        try:
            from fastmlp.backends import cython as cy

            return f"cython ({cy.VARIANT})"
        except ImportError:
            return "cython"
    return backend


def fma_bound(dtype: str) -> float | None:
    """GFLOP/s of a compiled FMA loop on every CPU (the physical limit), or None without the Cython build's loop."""
    try:
        from fastmlp.backends import cython as cy
    except ImportError:
        return None
    fn = getattr(cy._k, "fma_peak", None)
    if fn is None:
        return None
    from fastmlp import _threads

    try:
        return float(fn(dtype, _threads.cpu_count()))
    except TypeError:
        return float(fn(np.dtype(dtype).char, _threads.cpu_count()))


def _median_time(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, settle: float = 0.1) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: compilation, buffers, the thread choice
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            time.sleep(settle)
    return times


def avx2_child_rows(configs: str, rows: int | None, rounds: int, quick: bool, data_path: str | None) -> list[dict]:
    """The cython rows of the avx2 build, from a child process with ``FASTMLP_CYTHON_ISA=avx2``."""
    try:
        from fastmlp.backends import cython as cy
    except ImportError:
        return []
    if cy.VARIANT != "avx512" or not cy.cpu_has_avx2():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "avx2.json")
        code = (f"from fastmlp import benchmark; benchmark.run(quick={quick}, configs={configs!r}, backends=['cython'], "
                f"rounds={rounds}, rows={rows}, json_path={out!r}, data_path={data_path!r}, torch=False, memory=False, "
                "sections=(), log=lambda *a: None)")  # fmt: skip
        env = dict(os.environ, FASTMLP_CYTHON_ISA="avx2")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            warnings.warn(f"the avx2 rows failed: {res.stderr.strip()[-300:]}", RuntimeWarning, stacklevel=2)
            return []
        with open(out) as fh:
            data = json.load(fh)
    return [r for r in data["rows"] if r["backend"].startswith("cython")]


def optimizer_rows(X: np.ndarray, y: np.ndarray, layers: tuple[int, ...], batch: int, rounds: int,
                   backends: list[str]) -> list[dict]:  # fmt: skip
    """Seconds of one raw epoch with SGD, Nesterov momentum and Adam, and their ratios to SGD."""
    rows = []
    for be_name in backends:
        be = get_backend(be_name)
        for dtype in ("float32", "float64"):
            Xc = np.ascontiguousarray(X, dtype=dtype)
            fns = {}
            for opt, extra in (("sgd", {}), ("nesterov", {"momentum": 0.9}),
                               ("adam", {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8})):  # fmt: skip
                plan = plan_epoch(layers, dtype, batch_size=batch, hidden="sigmoid", output="sigmoid", loss="mse",
                                  optimizer=opt, **extra)  # fmt: skip
                rng = np.random.RandomState(1)
                Ws = [np.ascontiguousarray(rng.normal(0, 0.1, (o, i)), dtype=dtype) for i, o in zip(layers[:-1], layers[1:])]
                bs = [np.zeros(o, dtype=dtype) for o in layers[1:]]
                state = OptimizerState.zeros(opt, layers, dtype)
                epochs = be.prepare(Xc, y, plan)
                order = np.random.default_rng(0).permutation(len(Xc))
                fns[opt] = (lambda e=epochs, W=Ws, b=bs, s=state, o=order, lr=0.1 if opt != "adam" else 1e-3:
                            e(o, (W, b), s, lr))  # fmt: skip
            t = _interleaved(fns, rounds)
            sgd = statistics.median(t["sgd"])
            for opt in fns:
                med = statistics.median(t[opt])
                ratio = statistics.median(a / b for a, b in zip(t[opt], t["sgd"], strict=True))
                rows.append({"backend": build_label(be_name), "dtype": dtype, "optimizer": opt, "ms_per_epoch": 1e3 * med,
                             "vs_sgd": ratio, "sgd_ms": 1e3 * sgd})  # fmt: skip
    return rows


def fit_rows(X: np.ndarray, y: np.ndarray, layers: tuple[int, ...], batch: int, rounds: int, epochs: int,
             backends: list[str]) -> list[dict]:  # fmt: skip
    """Per-epoch seconds of ``Network.fit(epochs=k)``, of ``fit(epochs=1)`` calls, and of the raw epoch."""
    import fastmlp

    rows = []
    for be_name in backends:
        be = get_backend(be_name)
        for dtype in ("float32", "float64"):
            Xc = np.ascontiguousarray(X, dtype=dtype)
            net = fastmlp.Network(list(layers), dtype=dtype, backend=be_name, seed=1)
            plan = plan_epoch(layers, dtype, batch_size=batch, hidden="sigmoid", output="sigmoid", loss="mse")
            ep = be.prepare(Xc, y, plan)
            Wr, br = net.get_params()
            rng = np.random.default_rng(0)

            def raw(ep=ep, W=Wr, b=br, rng=rng, Xc=Xc) -> None:
                ep(rng.permutation(Xc.shape[0]), (W, b), None, 0.1)

            def fit_k(net=net, Xc=Xc) -> None:
                net.fit(Xc, y, epochs=epochs, batch_size=batch, lr=0.1, verbose=False, warn=False)

            def fit_1(net=net, Xc=Xc) -> None:
                for _ in range(epochs):
                    net.fit(Xc, y, epochs=1, batch_size=batch, lr=0.1, verbose=False, warn=False)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = _interleaved({"raw": raw, "fit": fit_k, "fit1": fit_1}, rounds)
            r = statistics.median(t["raw"])
            f = statistics.median(t["fit"]) / epochs
            f1 = statistics.median(t["fit1"]) / epochs
            rows.append({"backend": build_label(be_name), "dtype": dtype, "raw_ms": 1e3 * r, "fit_ms": 1e3 * f,
                         "fit1_ms": 1e3 * f1, "fit_overhead_pct": 100 * (f / r - 1),
                         "fit1_overhead_pct": 100 * (f1 / r - 1), "epochs": epochs})  # fmt: skip
    return rows


#: calls of the many-rows batch per timed round (one call of 10,000 rows is a few ms: too short alone)
REPS_MANY = 5


def predict_rows(rounds: int, backends: list[str], quick: bool = False, data_path: str | None = None) -> list[dict]:
    """``predict_proba`` of a 784-100-10 float32 network at batch 1 and on a batch of 10,000 rows:
    fastmlp and onnxruntime.  The batch is timed on uniform data (every entry nonzero) and, when MNIST is found,
    on MNIST rows (about 19 % nonzero: the Cython build's sparse first layer takes most of them)."""
    import fastmlp
    from fastmlp.benchmark import load_data

    rng = np.random.default_rng(0)
    X1 = rng.random((1, 784)).astype(np.float32)
    nb = 10000  # the target batch, quick or not (a few calls: well under a second)
    Xb = rng.random((nb, 784)).astype(np.float32)
    Xm, _, src = load_data(nb, data_path)
    Xm = None if src.startswith("synthetic") else np.ascontiguousarray(Xm, dtype=np.float32)
    rows = []
    reps1 = 200 if quick else 2000
    net = None
    for be_name in backends:
        net = fastmlp.Network([784, 100, 10], activation="relu", loss="ce", dtype="float32", backend=be_name, seed=0)
        net.predict_proba(X1)
        t1 = _median_time(lambda net=net: [net.predict_proba(X1) for _ in range(reps1)], rounds) / reps1
        tb = _median_time(lambda net=net: [net.predict_proba(Xb) for _ in range(REPS_MANY)], rounds) / REPS_MANY
        tm = None if Xm is None else _median_time(lambda net=net: [net.predict_proba(Xm) for _ in range(REPS_MANY)],
                                                  rounds) / REPS_MANY  # fmt: skip
        rows.append({"who": build_label(be_name), "batch1_us": 1e6 * t1, "batch_rows": len(Xb),
                     "rows_per_s": len(Xb) / tb, "mnist_rows_per_s": None if tm is None else nb / tm})  # fmt: skip
    if net is not None:
        try:
            import onnxruntime as ort

            from fastmlp.onnx import to_onnx
        except ImportError:
            ort = None
        if ort is not None:
            model = to_onnx(net)
            opts = ort.SessionOptions()
            sess = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else model,
                                        opts, providers=["CPUExecutionProvider"])  # fmt: skip
            name = sess.get_inputs()[0].name
            sess.run(None, {name: X1})
            t1 = _median_time(lambda: [sess.run(None, {name: X1}) for _ in range(reps1)], rounds) / reps1
            tb = _median_time(lambda: [sess.run(None, {name: Xb}) for _ in range(REPS_MANY)], rounds) / REPS_MANY
            tm = None if Xm is None else _median_time(lambda: [sess.run(None, {name: Xm}) for _ in range(REPS_MANY)],
                                                      rounds) / REPS_MANY  # fmt: skip
            rows.append({"who": f"onnxruntime {ort.__version__}", "batch1_us": 1e6 * t1, "batch_rows": len(Xb),
                         "rows_per_s": len(Xb) / tb, "mnist_rows_per_s": None if tm is None else nb / tm})  # fmt: skip
    try:
        from fastmlp.sklearn import MLPClassifier
    except ImportError:
        return rows
    ys = rng.integers(0, 10, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(max_iter=1, dtype="float32", random_state=0).fit(rng.random((300, 784)).astype(np.float32), ys)
    t1 = _median_time(lambda: [clf.predict_proba(X1) for _ in range(reps1)], rounds) / reps1
    rows.append({"who": f"fastmlp.sklearn.MLPClassifier ({build_label(clf.network_.backend.name)})",
                 "batch1_us": 1e6 * t1, "batch_rows": None, "rows_per_s": None, "mnist_rows_per_s": None})  # fmt: skip
    return rows


def sklearn_rows(X: np.ndarray, y: np.ndarray, epochs: int, rounds: int) -> list[dict]:
    """scikit-learn's ``MLPClassifier`` defaults (784-100-10 relu, adam, batch 200) against fastmlp.sklearn's."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier as Sk

        from fastmlp.sklearn import MLPClassifier as Fm
    except ImportError:
        return []
    rows = []
    for dtype in ("float64", "float32"):
        Xc = np.ascontiguousarray(X, dtype=dtype)
        fns = {"scikit-learn": lambda Xc=Xc: Sk(max_iter=epochs, random_state=0).fit(Xc, y),
               "fastmlp": lambda Xc=Xc: Fm(max_iter=epochs, random_state=0).fit(Xc, y)}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t = _interleaved(fns, rounds, settle=0.25)
        ratio = statistics.median(a / b for a, b in zip(t["scikit-learn"], t["fastmlp"], strict=True))
        rows.append({"dtype": dtype, "rows": len(Xc), "epochs": epochs, "sklearn_s": statistics.median(t["scikit-learn"]),
                     "fastmlp_s": statistics.median(t["fastmlp"]), "speedup": ratio,
                     "backend": build_label(get_backend("auto").name)})  # fmt: skip
    return rows


def compiled_backends(backends: list[str] | None) -> list[str]:
    names = backends or available_backends()
    return [b for b in names if b != "numpy"] or names


def format_sections(res: dict[str, Any]) -> str:
    """Markdown tables of the extra sections present in ``res``."""
    out = []
    if res.get("optimizers"):
        out.append("| optimizer | backend | dtype | ms/epoch | vs SGD |\n|---|---|---|---:|---:|")
        out += [f"| {r['optimizer']} | {r['backend']} | {r['dtype']} | {r['ms_per_epoch']:.1f} | {r['vs_sgd']:.2f}x |"
                for r in res["optimizers"]]  # fmt: skip
        out.append("")
    if res.get("fit"):
        out.append("| backend | dtype | raw epoch ms | fit(epochs=k) ms/epoch | overhead | fit(epochs=1) calls ms | overhead |"
                   "\n|---|---|---:|---:|---:|---:|---:|")  # fmt: skip
        out += [f"| {r['backend']} | {r['dtype']} | {r['raw_ms']:.1f} | {r['fit_ms']:.1f} | {r['fit_overhead_pct']:+.1f}% | "
                f"{r['fit1_ms']:.1f} | {r['fit1_overhead_pct']:+.1f}% |" for r in res["fit"]]  # fmt: skip
        out.append("")
    if res.get("predict"):
        out.append("| predict_proba 784-100-10 float32 | batch 1 (µs) | batch of many, uniform data (rows/s) |"
                   " same batch, MNIST rows (rows/s) |\n|---|---:|---:|---:|")  # fmt: skip
        for r in res["predict"]:
            many = f"{r['rows_per_s']:,.0f} ({r['batch_rows']} rows)" if r["rows_per_s"] else "-"
            mn = f"{r['mnist_rows_per_s']:,.0f}" if r.get("mnist_rows_per_s") else "-"
            out.append(f"| {r['who']} | {r['batch1_us']:.1f} | {many} | {mn} |")
        out.append("")
    if res.get("sklearn"):
        out.append("| scikit-learn defaults (784-100-10 relu, adam, batch 200) | dtype | rows × epochs | scikit-learn s |"
                   " fastmlp s | speed-up |\n|---|---|---|---:|---:|---:|")  # fmt: skip
        out += [f"| fastmlp.sklearn.MLPClassifier ({r['backend']}) | {r['dtype']} | {r['rows']} × {r['epochs']} | "
                f"{r['sklearn_s']:.2f} | {r['fastmlp_s']:.2f} | {r['speedup']:.2f}x |" for r in res["sklearn"]]  # fmt: skip
    return "\n".join(out)
