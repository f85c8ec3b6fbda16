"""Load: one epoch on 1,000,000 rows x 784 float32 with memory bounded (slow; run with ``-m slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastmlp

N_ROWS, N_FEATURES = 1_000_000, 784
#: the fit may allocate this much beyond the dataset itself
SLACK = 64 * 2**20

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
            f.write("5")

    import fastmlp
    from fastmlp import _validation as V

    n, d = int(sys.argv[1]), int(sys.argv[2])
    backend = fastmlp.available_backends()[0]  # the fastest that loads
    net = fastmlp.Network([d, 16, 10], dtype="float32", backend=backend, seed=0)
    rss0 = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    X = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(0)
    for start in range(0, n, 50_000):  # in chunks: no float64 temporary of the whole matrix
        rng.random(out=X[start : start + 50_000], dtype=np.float32)
    y = rng.integers(0, 10, n)
    t_data = time.perf_counter() - t0
    no_copy = V.as_features(X, np.dtype(np.float32), n_features=d) is X
    rss_data = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    hist = net.fit(X, y, epochs=1, batch_size=1000, lr=0.1, verbose=False, seed=0)
    t_fit = time.perf_counter() - t0
    print(json.dumps({"backend": backend, "rss0": rss0, "rss_data": rss_data, "hwm_fit": status("VmHWM"),
                      "dataset_bytes": X.nbytes + y.nbytes, "no_copy": no_copy, "t_data": t_data, "t_fit": t_fit,
                      "train_acc": hist.train_acc[-1]}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_fit_on_a_million_rows_has_bounded_memory(tmp_path):
    pkg_parent = Path(fastmlp.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg_parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(N_ROWS), str(N_FEATURES)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["hwm_fit"] - r["rss0"]  # from before the data existed to the fit's peak
    fit_growth = r["hwm_fit"] - r["rss_data"]
    print(f"\n{r['backend']}: dataset {r['dataset_bytes'] / 2**20:.0f} MiB made in {r['t_data']:.1f} s; "
          f"fit {r['t_fit']:.1f} s; peak RSS growth {growth / 2**20:.0f} MiB "
          f"(fit alone {fit_growth / 2**20:.1f} MiB); train acc {r['train_acc']:.3f}")  # fmt: skip
    assert r["no_copy"], "as_features copied a float32 C-contiguous X of the network's dtype"
    assert growth <= r["dataset_bytes"] + SLACK, f"peak RSS grew {growth / 2**20:.0f} MiB"
    assert fit_growth <= SLACK, f"the fit itself allocated {fit_growth / 2**20:.0f} MiB at its peak"
    assert r["t_fit"] < 90
