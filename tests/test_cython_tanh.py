"""The Cython kernels' own tanh (built from the vector exp, so that no libmvec symbol of glibc 2.35 is needed)
against a reference in extended precision, in ulp of the result, on every build this CPU can load.

A row of many units goes through the vectorized loop; a column of one unit through the scalar remainder.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from fastmlp.backends.contract import ACT_CODES

cy = pytest.importorskip("fastmlp.backends.cython", reason="the Cython kernels are not built")

#: the most ulp from the correctly rounded tanh; glibc documents up to 2 ulp for its own tanh/tanhf
MAX_ULP = 2.0

_HAS = {"baseline": lambda: True, "avx2": cy.cpu_has_avx2, "avx512": cy.cpu_has_avx512}


def _module(variant: str):
    if not _HAS[variant]():
        pytest.skip(f"this CPU cannot run the {variant} build")
    name = "_kernels" if variant == "baseline" else f"_kernels_{variant}"
    try:
        return importlib.import_module(f"fastmlp.backends.cython.{name}")
    except ImportError as exc:
        pytest.skip(f"the {variant} build is not here: {exc}")


def _inputs(dtype) -> np.ndarray:
    rng = np.random.default_rng(15)
    tiny = np.finfo(dtype).tiny
    parts = [
        rng.uniform(-1, 1, 40_000),
        np.linspace(-0.7, 0.7, 40_001),  # across the switch at |x| = 0.625
        rng.uniform(-25, 25, 20_000),  # into the capped range
        rng.standard_normal(20_000) * 1e-3,
        10.0 ** rng.uniform(-30, 1.5, 20_000) * rng.choice([-1.0, 1.0], 20_000),
        [0.0, 0.625, -0.625, np.nextafter(0.625, 0), 9.0, 9.02, 10.0, 19.0, 19.07, 20.0, 1e4, -1e4, tiny, -tiny],
    ]
    return np.concatenate(parts).astype(dtype)


def _ulp(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    ref = np.tanh(x.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref).astype(x.dtype)).astype(np.longdouble)
    return np.asarray(np.abs(got.astype(np.longdouble) - ref) / spacing, dtype=np.float64)


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps, reason="long double is no wider than double")
@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_within_two_ulp(variant, dtype):
    k = _module(variant)
    x = _inputs(dtype)
    tanh = ACT_CODES["tanh"]
    row = np.empty((1, x.size), dtype)  # one row of x.size units: the vectorized loop
    k.forward(np.ones((1, 1), dtype), x.reshape(-1, 1).copy(), np.zeros(x.size, dtype), tanh, row)
    col = np.empty((x.size, 1), dtype)  # x.size rows of one unit: the scalar remainder
    k.forward(x.reshape(-1, 1).copy(), np.ones((1, 1), dtype), np.zeros(1, dtype), tanh, col)
    for got in (row[0], col[:, 0]):
        ulp = _ulp(got, x)
        worst = int(np.argmax(ulp))
        assert ulp[worst] <= MAX_ULP, f"{ulp[worst]:.2f} ulp at x={x[worst]!r}: {got[worst]!r}"
        assert np.all(np.abs(got) <= 1)
        assert np.array_equal(np.sign(got), np.sign(x))


def test_no_libmvec_tanh_linked():
    """The portable-wheel reason for the own tanh: no build asks for a vector tanh (glibc 2.35)."""
    from pathlib import Path

    found = []
    for so in Path(cy.__file__).parent.glob("_kernels*.so"):
        data = so.read_bytes()
        found += [f"{so.name}: {sym}" for sym in (b"v_tanh", b"v_tanhf") if sym in data]
    assert not found, found
