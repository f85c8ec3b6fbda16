"""``fastmlp bench``: training throughput of every backend against the classic NumPy loop.

One run measures this machine's float32 and float64 GEMM peak (the best of
NumPy's BLAS and, in the avx512 build, fastmlp's own kernel), then for each
configuration × backend × dtype the time of one training epoch, interleaved
with the classic NumPy float64 loop (:mod:`fastmlp._classic`) over several
rounds; the speed-up is the median of the same-round ratios, printed beside
the classic loop's absolute time (this kind of machine is noisy).

Configurations:

* ``a``: 784-50-10 sigmoid/MSE, batch 100 — the classic notebook's;
* ``b``: 784-256-256-10 sigmoid/MSE, batch 256;
* ``c``: 784-1024-1024-10 relu/softmax-CE, batch 512.

FLOPs count only what training needs: ``2·n_in·n_out`` per layer and sample
for the forward pass, the same for the weight gradient, and the same again
for the delta of every layer but the first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fastmlp import _bench_extra as extra
from fastmlp import _classic, _threads
from fastmlp._bench_extra import build_label
from fastmlp.backends import available_backends, get_backend
from fastmlp.backends.contract import ACT_CODES, plan_epoch


@dataclass(frozen=True)
class Config:
    """One benchmark configuration."""

    key: str
    layers: tuple[int, ...]
    hidden: str
    output: str
    loss: str
    batch_size: int
    lr: float = 0.1

    @property
    def label(self) -> str:
        arch = "-".join(map(str, self.layers))
        return f"({self.key}) {arch} {self.hidden}/{self.output}-{self.loss} b{self.batch_size}"


CONFIGS: dict[str, Config] = {
    "a": Config("a", (784, 50, 10), "sigmoid", "sigmoid", "mse", 100),
    "b": Config("b", (784, 256, 256, 10), "sigmoid", "sigmoid", "mse", 256),
    "c": Config("c", (784, 1024, 1024, 10), "relu", "softmax", "ce", 512, lr=0.05),
}
#: pause after each timed epoch (see _Runner.run)
SETTLE_S = 0.25
#: rows per configuration: full run and --quick
ROWS = {"full": {"a": 55000, "b": 55000, "c": 55000}, "quick": {"a": 20000, "b": 8000, "c": 2048}}


def training_flops(layers: tuple[int, ...] | list[int]) -> int:
    """FLOPs one training sample needs: forward, weight gradients, and deltas of all layers but the first."""
    pairs = [a * b for a, b in zip(layers[:-1], layers[1:], strict=True)]
    return 4 * sum(pairs) + 2 * sum(pairs[1:])


def gemm_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n×n`` matrix product in NumPy's BLAS (all its threads)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n)).astype(dtype)
    b = rng.random((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.dot(a, b, out=c)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.dot(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def _simd_isa() -> str:
    """The loaded Cython build's instruction set as the GEMM-peak line names it ("AVX-512", "AVX2")."""
    try:
        from fastmlp.backends import cython as cy
    except ImportError:
        return "SIMD"
    return {"avx512": "AVX-512", "avx2": "AVX2"}.get(str(getattr(cy._k, "ISA", "")), "SIMD")


def simd_gemm_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float | None:
    """Best-of-``repeats`` GFLOP/s of fastmlp's own SIMD matrix kernels on products of ``n`` rows by
    1024 by 1024 over two threads (the forward kernel, and the kernel that computes hidden deltas and
    weight gradients), or None when the loaded Cython build has no such kernels (the baseline build).

    NumPy's BLAS alone understates a CPU whose vector units it does not use: SciPy's and NumPy's
    OpenBLAS builds run their AVX2 kernels on CPUs they do not know, AVX-512 ones included.
    """
    try:
        from fastmlp.backends import cython as cy
    except ImportError:
        return None
    if not cy.SIMD_GEMM:
        return None
    from concurrent.futures import ThreadPoolExecutor

    half = max(1, n // 2)
    n = 2 * half
    rng = np.random.default_rng(0)
    X = rng.random((n, 1024)).astype(dtype)
    W = (rng.random((1024, 1024)) * 1e-3).astype(dtype)
    b = np.zeros(1024, dtype=dtype)
    out = np.empty((n, 1024), dtype=dtype)
    ident = ACT_CODES["identity"]
    parts = [(X[:half], X[half:]), (out[:half], out[half:])]
    ones = np.ones((half, 1024), dtype=dtype)

    def forward() -> None:  # inside a pin, forward_network splits its rows over our threads
        cy.forward_network(X, [W], [b], ident, ident, out)

    def delta(i: int) -> None:  # (half, 1024) @ (1024, 1024), times identity' = 1
        cy.hidden_delta(parts[0][i], W, ones, ident, None, parts[1][i])

    best = np.inf
    with _threads.blas_pinned(), ThreadPoolExecutor(2) as pool:
        for fn in (forward, lambda: list(pool.map(delta, range(2)))):
            fn()
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
    return 2.0 * n * 1024 * 1024 / best / 1e9


def load_data(rows: int, path: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``rows`` MNIST training rows scaled to [0, 1] (float64), or synthetic data of that shape."""
    from fastmlp.datasets import DataNotFoundError, load_mnist

    try:
        X, y, _, _ = load_mnist(path, download=False)
        X, y = X[:rows] / 255.0, y[:rows]
        src = f"MNIST ({len(X)} rows)"
    except (DataNotFoundError, OSError, ValueError):
        rng = np.random.default_rng(0)
        X, y = rng.random((rows, 784)), rng.integers(0, 10, rows)
        src = f"synthetic uniform data ({rows} rows; MNIST not found)"
    if len(X) < rows:  # tile to the requested size
        reps = -(-rows // len(X))
        X, y = np.tile(X, (reps, 1))[:rows], np.tile(y, reps)[:rows]
    return np.ascontiguousarray(X), np.ascontiguousarray(y, dtype=np.int64), src


def _init(cfg: Config, dtype: str, seed: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.RandomState(seed)
    Ws = [np.ascontiguousarray(rng.normal(0, 0.1, (o, i)), dtype=dtype) for i, o in zip(cfg.layers[:-1], cfg.layers[1:])]
    bs = [np.zeros(o, dtype=dtype) for o in cfg.layers[1:]]
    return Ws, bs


class _Runner:
    """One timed contender: a callable running one epoch."""

    def __init__(self, name: str, dtype: str, fn: Any) -> None:
        self.name, self.dtype, self.fn = name, dtype, fn
        self.times: list[float] = []

    def run(self) -> float:
        t = time.perf_counter()
        self.fn()
        dt = time.perf_counter() - t
        self.times.append(dt)
        # BLAS and OpenMP worker threads spin for a while after a call returns; let them go to sleep
        # so that the next contender starts on quiet cores (measured: without this pause a Cython
        # float32 epoch right after the classic loop took 145 ms instead of 88 ms)
        time.sleep(SETTLE_S)
        return dt


def _fastmlp_runner(backend: str, dtype: str, cfg: Config, X: np.ndarray, y: np.ndarray) -> _Runner:
    """One backend's epoch: the configuration's plan (plain SGD, no dropout), the data prepared once."""
    be = get_backend(backend)
    Ws, bs = _init(cfg, dtype)
    plan = plan_epoch(cfg.layers, dtype, batch_size=cfg.batch_size, hidden=cfg.hidden, output=cfg.output, loss=cfg.loss)
    epochs = be.prepare(np.ascontiguousarray(X, dtype=dtype), y, plan)
    rng = np.random.default_rng(0)
    n = X.shape[0]

    def epoch() -> None:
        epochs(rng.permutation(n), (Ws, bs), None, cfg.lr)

    return _Runner(build_label(backend), dtype, epoch)


def _classic_runner(cfg: Config, X: np.ndarray, y: np.ndarray) -> _Runner:
    Ws, bs = _init(cfg, "float64")
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    rng = np.random.RandomState(0)

    def epoch() -> None:
        _classic.classic_epoch(X64, y, Ws, bs, hidden=cfg.hidden, output=cfg.output, loss=cfg.loss,
                               batch_size=cfg.batch_size, lr=cfg.lr, rng=rng)  # fmt: skip

    return _Runner("classic NumPy loop", "float64", epoch)


def _torch_runners(cfg: Config, X: np.ndarray, y: np.ndarray) -> list[_Runner]:
    try:
        import torch
    except ImportError:
        return []
    acts = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "identity": torch.nn.Identity}
    runners = []
    for dtype, tdt in (("float32", torch.float32), ("float64", torch.float64)):
        torch.manual_seed(0)
        mods: list[Any] = []
        for i, (a, b) in enumerate(zip(cfg.layers[:-1], cfg.layers[1:], strict=True)):
            mods.append(torch.nn.Linear(a, b))
            if i < len(cfg.layers) - 2:
                mods.append(acts[cfg.hidden]())
            elif cfg.output == "sigmoid":
                mods.append(torch.nn.Sigmoid())
        model = torch.nn.Sequential(*mods).to(tdt)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        Xt, yt = torch.from_numpy(np.ascontiguousarray(X, dtype=dtype)), torch.from_numpy(y)
        onehot = torch.nn.functional.one_hot(yt, cfg.layers[-1]).to(tdt)

        def epoch(model=model, opt=opt, Xt=Xt, yt=yt, onehot=onehot) -> None:
            perm = torch.randperm(Xt.shape[0])
            for s in range(0, Xt.shape[0], cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                out = model(Xt[idx])
                if cfg.loss == "mse":
                    lossv = ((out - onehot[idx]) ** 2).sum() / idx.shape[0]
                else:
                    lossv = torch.nn.functional.cross_entropy(out, yt[idx])
                opt.zero_grad(set_to_none=True)
                lossv.backward()
                opt.step()

        runners.append(_Runner(f"PyTorch {torch.__version__} eager", dtype, epoch))
    return runners


@dataclass
class Row:
    """One line of the results table."""

    config: str
    backend: str
    dtype: str
    rows: int
    ms_per_epoch: float
    samples_per_s: float
    gflops: float
    pct_peak: float
    speedup: float
    times_s: list[float] = field(default_factory=list)
    pct_fma: float | None = None


def bench_config(cfg: Config, rows: int, rounds: int, backends: list[str], dtypes: list[str],
                 peaks: dict[str, float], data_path: str | None = None, torch: bool = True,
                 log: Any = print, fma: dict[str, float | None] | None = None) -> tuple[list[Row], str]:  # fmt: skip
    """Time every contender on one configuration, interleaved over ``rounds`` rounds."""
    X, y, src = load_data(rows, data_path)
    classic = _classic_runner(cfg, X, y)
    runners = [_fastmlp_runner(b, d, cfg, X, y) for b in backends for d in dtypes]
    if torch:
        runners += _torch_runners(cfg, X, y)
    # warm-up, two epochs each: JIT compilation, buffers, caches, and the Cython backend's thread choice
    # (it times its first epochs with two threads and with one, then keeps the faster)
    for r in [classic, *runners]:
        r.run()
        r.run()
        r.times.clear()
    ratios: dict[int, list[float]] = {i: [] for i in range(len(runners))}
    for _ in range(rounds):
        tc = classic.run()
        for i, r in enumerate(runners):
            ratios[i].append(tc / r.run())
    flops = training_flops(cfg.layers) * rows
    out = []
    for i, r in enumerate([classic, *runners]):
        t = statistics.median(r.times)
        speed = 1.0 if i == 0 else statistics.median(ratios[i - 1])
        gf = flops / t / 1e9
        bound = (fma or {}).get(r.dtype)
        out.append(Row(cfg.key, r.name, r.dtype, rows, 1e3 * t, rows / t, gf, 100 * gf / peaks[r.dtype], speed, r.times,
                       None if not bound else 100 * gf / bound))  # fmt: skip
    return out, src


def memory_probe(rows: int = 55000, dtype: str = "float32", data_path: str | None = None) -> dict[str, float]:
    """Peak RSS growth of one ``Network.fit`` epoch, measured in a fresh process.

    The baseline is taken with the caller's float64 ``X`` already in memory;
    the budget is the bytes of ``X`` in the network's dtype (the one cast
    ``fit`` makes) plus 64 MiB.
    """
    code = f"""
import json, numpy as np, fastmlp
from fastmlp.benchmark import load_data
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
X, y, src = load_data({rows}, {data_path!r})
net = fastmlp.Network([784, 50, 10], dtype={dtype!r}, seed=1)
net.fit(X[:200], y[:200], epochs=1, verbose=False)  # load and compile everything first
try:
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
base = status('VmRSS')
net.fit(X, y, epochs=1, verbose=False)
peak = status('VmHWM')
print(json.dumps(dict(base=base, peak=peak, data=X.shape[0] * X.shape[1] * np.dtype({dtype!r}).itemsize)))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr.strip()[-500:]}")
    d = json.loads(res.stdout.strip().splitlines()[-1])
    growth = d["peak"] - d["base"]
    return {"rows": rows, "dtype": dtype, "baseline_mib": d["base"] / 2**20, "peak_mib": d["peak"] / 2**20,
            "growth_mib": growth / 2**20, "data_mib": d["data"] / 2**20,
            "budget_mib": d["data"] / 2**20 + 64, "within_budget": growth <= d["data"] + 64 * 2**20}  # fmt: skip


def format_table(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    head = "| config | backend (build) | dtype | samples/s | ms/epoch | GFLOP/s | % GEMM peak | % FMA bound | vs classic |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fma = "-" if r.pct_fma is None else f"{r.pct_fma:.1f}"
        lines.append(
            f"| {CONFIGS[r.config].label} | {r.backend} | {r.dtype} | {r.samples_per_s:,.0f} | {r.ms_per_epoch:,.1f} | "
            f"{r.gflops:.1f} | {r.pct_peak:.1f} | {fma} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)


#: the sections after the training table, in order (``sections=`` of :func:`run`)
SECTIONS = ("avx2", "optimizers", "fit", "predict", "sklearn")


def run(quick: bool = False, configs: str = "abc", backends: list[str] | None = None,
        dtypes: tuple[str, ...] = ("float32", "float64"), rounds: int | None = None, rows: int | None = None,
        json_path: str | None = None, data_path: str | None = None, torch: bool = True, memory: bool = True,
        sections: tuple[str, ...] = SECTIONS, log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark, print the tables, and return (and optionally write) the results.

    Parameters
    ----------
    quick : bool
        Small data and few rounds (about a minute without the extra sections).
    configs : str
        Letters of :data:`CONFIGS` for the training table.
    backends : list of str, optional
        Backends of the training table (default: every available one).
    dtypes, rounds, rows, json_path, data_path, torch, memory
        The training table's dtypes, interleaved rounds, rows per configuration, a JSON file to write, the
        MNIST directory, PyTorch rows (when importable), the peak-memory probe.
    sections : tuple of str
        Further sections, from :data:`SECTIONS`: the avx2 build's rows (on an AVX-512 CPU), optimizers
        against SGD, ``Network.fit`` against the raw epoch, inference, scikit-learn against fastmlp.sklearn.
    log : callable
        Where lines go.
    """
    t_start = time.perf_counter()
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {SECTIONS}")
    backends = backends or available_backends()
    rounds = rounds or (3 if quick else 5)
    mode = "quick" if quick else "full"
    peak_sources: dict[str, dict[str, float | None]] = {}
    for d in ("float32", "float64"):
        peak_sources[d] = {"numpy_blas": gemm_peak(d, n=1024 if quick else 2048),
                           "fastmlp_simd": simd_gemm_peak(d, n=1024 if quick else 2048)}  # fmt: skip
    peaks = {d: max(v for v in src.values() if v is not None) for d, src in peak_sources.items()}
    fma = {d: extra.fma_bound(d) for d in ("float32", "float64")}
    for d, src in peak_sources.items():
        own = f", fastmlp's own {_simd_isa()} kernel {src['fastmlp_simd']:.1f}" if src["fastmlp_simd"] else ""
        bound = f"; FMA bound {fma[d]:.1f} GFLOP/s (a compiled FMA loop on every CPU)" if fma[d] else \
            "; FMA bound not measured (needs the Cython build)"  # fmt: skip
        log(f"GEMM peak {d}: {peaks[d]:.1f} GFLOP/s, the best of NumPy's BLAS {src['numpy_blas']:.1f}{own} "
            f"(all threads){bound}")  # fmt: skip
    all_rows: list[Row] = []
    sources = {}
    for key in configs:
        cfg = CONFIGS[key]
        n = rows or ROWS[mode][key]
        log(f"{cfg.label}: {n} rows, {rounds} interleaved rounds ...")
        res, src = bench_config(cfg, n, rounds, backends, list(dtypes), peaks, data_path, torch, log, fma)
        sources[key] = src
        base = res[0]
        log(f"  classic NumPy loop: {base.ms_per_epoch:,.1f} ms/epoch ({base.samples_per_s:,.0f} samples/s)")
        all_rows += res
    result: dict[str, Any] = {"mode": mode, "peaks_gflops": peaks, "peak_sources_gflops": peak_sources,
                              "fma_bound_gflops": fma, "cpu_count": os.cpu_count()}  # fmt: skip
    if "avx2" in sections and "cython" in backends:
        log("avx2 build of the Cython kernels (a child process with FASTMLP_CYTHON_ISA=avx2) ...")
        for r in extra.avx2_child_rows(configs, rows, rounds, quick, data_path):
            r = dict(r, backend="cython (avx2)")
            bound = fma.get(r["dtype"])
            r["pct_fma"] = None if not bound else 100 * r["gflops"] / bound
            all_rows.append(Row(**r))
    table = format_table(all_rows)
    log("")
    log(table)
    compiled = extra.compiled_backends(backends)
    if {"optimizers", "fit", "predict", "sklearn"} & set(sections):
        Xa, ya, _ = load_data(ROWS[mode]["a"], data_path)
    if "optimizers" in sections:
        log("\nOptimizers, one raw epoch of (a) 784-50-10, against plain SGD:")
        result["optimizers"] = extra.optimizer_rows(Xa, ya, CONFIGS["a"].layers, 100, rounds, compiled)
    if "fit" in sections:
        log("Network.fit against the raw epoch, (a) 784-50-10:")
        result["fit"] = extra.fit_rows(Xa, ya, CONFIGS["a"].layers, 100, rounds, 3 if quick else 5, compiled)
    if "predict" in sections:
        log("Inference, 784-100-10 relu/softmax float32:")
        result["predict"] = extra.predict_rows(rounds, compiled, quick, data_path)
    if "sklearn" in sections:
        n_sk = 5000 if quick else 20000
        Xs, ys, _ = load_data(n_sk, data_path)
        log(f"scikit-learn's MLPClassifier defaults against fastmlp.sklearn's, {n_sk} rows, "
            f"{2 if quick else 5} epochs ...")  # fmt: skip
        result["sklearn"] = extra.sklearn_rows(Xs, ys, 2 if quick else 5, 1 if quick else 3)
    more = extra.format_sections(result)
    if more:
        log("")
        log(more)
    mem = None
    if memory:
        mem = memory_probe(rows=ROWS[mode]["a"], dtype="float32", data_path=data_path)
        log(f"\nMemory: float32 fit on {mem['rows']} rows: peak RSS grew {mem['growth_mib']:.1f} MiB; budget "
            f"{mem['budget_mib']:.1f} MiB (data {mem['data_mib']:.1f} MiB + 64) -> "
            f"{'within' if mem['within_budget'] else 'OVER'} budget")  # fmt: skip
    elapsed = time.perf_counter() - t_start
    log(f"\n({mode} run, {elapsed:.0f} s; data: {', '.join(f'{k}: {v}' for k, v in sources.items())})")
    result.update(rows=[asdict(r) for r in all_rows], memory=mem, data=sources, seconds=elapsed)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return result
