"""Smoke test of an installed fastmlp (a wheel, or an sdist built without a compiler): every backend that
loads trains a small network in both dtypes and agrees with the NumPy reference; the required backends
load, the unavailable ones say why.  Run from outside the checkout, so that the installed package imports.

    python .ci/smoke.py --require cython,numba,numpy [--no-compiler] [--unavailable cython] [--dtypes float64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", default="numpy", help="comma-separated backends that must load")
    ap.add_argument("--unavailable", default="", help="comma-separated backends that must NOT load (with a reason)")
    ap.add_argument("--no-compiler", action="store_true", help="check first that no C compiler is on PATH")
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated dtypes to train in")
    args = ap.parse_args(argv)

    if args.no_compiler:
        found = {cc: shutil.which(cc) for cc in ("gcc", "cc", "clang", "c++", "g++") if shutil.which(cc)}
        assert not found, f"a compiler is on PATH: {found}"
        print("no C compiler on PATH")

    import numpy as np

    import fastmlp

    here = os.path.dirname(os.path.abspath(__file__))
    assert not os.path.abspath(fastmlp.__file__).startswith(os.path.dirname(here) + os.sep), (
        f"imported fastmlp from the checkout ({fastmlp.__file__}), not the installed package"
    )
    avail = fastmlp.available_backends()
    errors = fastmlp.backends.backend_errors()
    print(f"fastmlp {fastmlp.__version__} from {fastmlp.__file__}; numpy {np.__version__}")
    print(f"backends: {avail}; unavailable: {errors}")
    missing = [b for b in filter(None, args.require.split(",")) if b not in avail]
    assert not missing, f"required backends did not load: { {b: errors.get(b) for b in missing} }"
    for b in filter(None, args.unavailable.split(",")):
        assert b not in avail and errors.get(b), f"{b} should be unavailable with a reason: {avail}, {errors}"

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    y = (X[:, :3].sum(axis=1) > 0).astype(np.int64) + (X[:, 3] > 1)
    tols = {"float64": 1e-9, "float32": 1e-4}
    for dtype in args.dtypes.split(","):
        tol = tols[dtype]
        ref = None
        for be in ["numpy", *[b for b in avail if b != "numpy"]]:
            t0 = time.perf_counter()
            net = fastmlp.Network([8, 16, 3], activation="tanh", output="softmax", loss="ce", dtype=dtype, seed=1,
                                  backend=be)  # fmt: skip
            net.fit(X, y, epochs=5, batch_size=32, lr=0.1, verbose=0)
            P = net.predict_proba(X)
            loss, acc = net.evaluate(X, y)
            assert np.isfinite(P).all() and np.allclose(P.sum(axis=1), 1, atol=1e-5), be
            if ref is None:
                ref = P
            else:
                err = float(np.abs(P - ref).max())
                assert err <= tol, f"{be} {dtype}: predictions differ from numpy by {err:.3g} > {tol}"
            print(f"  {be:7s} {dtype}: fit + predict in {time.perf_counter() - t0:.2f} s, loss {loss:.4f}, acc {acc:.3f}")
        with tempfile.TemporaryDirectory() as tmp:
            path = net.save(os.path.join(tmp, "m.npz"))
            np.testing.assert_array_equal(fastmlp.Network.load(path, backend=be).predict_proba(X), net.predict_proba(X))

    exe = shutil.which("fastmlp")
    if exe:
        out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        print("\n".join("  " + line for line in out.stdout.splitlines()[:6]))
    print("smoke OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
