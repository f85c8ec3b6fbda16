"""Packaging: the sdist carries what the package and its own tests need, its unpacked tests collect and run,
and (where CI hands them over) the repaired wheel is manylinux_2_31 or older with libgomp bundled.

CI passes the artifacts it built (``FASTMLP_SDIST``, ``FASTMLP_WHEEL``); elsewhere the sdist is built here
with ``python -m build --sdist --no-isolation`` when the build tools are installed, else these tests skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
#: what the package's build and its tests read besides tests/*.py (docs checked by tests, the build files)
NEEDED = ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md", "docs/defaults.md",
          "docs/packaging.md", ".ci/run", ".ci/smoke.py", "fastmlp/py.typed", "fastmlp/backends/cython/_kernels.pxi",
          "fastmlp/backends/cython/_kernels.pyx", "fastmlp/backends/cython/_kernels_avx2.pyx",
          "fastmlp/backends/cython/_kernels_avx512.pyx", "fastmlp/backends/cython/_simd_gemm.h",
          "fastmlp/backends/cython/_simd_gemm_t.h"]  # fmt: skip
#: never shipped in an sdist: build outputs and caches
NEVER = re.compile(r"(\.so|\.pyd|\.o|\.pyc|\.nbi|\.nbc|NOT_BUILT\.txt|/_kernels(_avx2|_avx512)?\.c)$")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    given = os.environ.get("FASTMLP_SDIST")
    if given:
        return Path(given)
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not run from a source tree with setup.py")
    try:
        import build  # noqa: F401
        import Cython  # noqa: F401
        import setuptools
    except ImportError as exc:
        pytest.skip(f"set FASTMLP_SDIST or install the build tools (pip install build Cython): {exc}")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (>= 77); set FASTMLP_SDIST")
    out = tmp_path_factory.mktemp("sdist")
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (path,) = out.glob("fastmlp-*.tar.gz")
    return path


def _members(sdist: Path) -> tuple[str, set[str]]:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/", 1)[0]
    return top, {n.split("/", 1)[1] for n in names if "/" in n}


def test_sdist_carries_the_sources_docs_and_every_test_file(sdist):
    _, files = _members(sdist)
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    bench = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*.py")}
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastmlp").rglob("*.py")}
    missing = sorted((set(NEEDED) | tests | bench | package) - files)
    assert not missing, f"the sdist lacks {missing}"
    for helper in ("tests/conftest.py", "tests/naive.py", "tests/notebook.py", "tests/fuzz_cases.py"):
        assert helper in files
    shipped_builds = sorted(f for f in files if NEVER.search(f))
    assert not shipped_builds, f"build outputs in the sdist: {shipped_builds}"


def test_unpacked_sdist_collects_and_runs_its_own_tests(sdist, tmp_path):
    """The sdist's tests, from the unpacked tree, against the installed package: every module collects (no
    helper file missing), and one whole module runs."""
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    top, _ = _members(sdist)
    tree = tmp_path / top
    env = subprocess_env()
    # run from beside the tree, not in it: the tree's own fastmlp/ (sources, no compiled kernels) must not
    # shadow the installed package
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tree)]
    res = subprocess.run([*cmd, "--collect-only", str(tree / "tests")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    res = subprocess.run([*cmd, str(tree / "tests" / "test_reference.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"\d+ passed", res.stdout), res.stdout[-1000:]


def test_repaired_wheel_is_manylinux_2_31_with_libgomp_bundled():
    wheel = os.environ.get("FASTMLP_WHEEL")
    if not wheel:
        pytest.skip("FASTMLP_WHEEL is not set (.ci/run sets it to the repaired wheel it built)")
    m = re.search(r"manylinux_(\d+)_(\d+)_(\w+)\.whl$", wheel)
    assert m, f"not a manylinux wheel: {wheel}"
    assert (int(m.group(1)), int(m.group(2))) <= (2, 31), wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(re.search(r"fastmlp\.libs/libgomp[-.\w]*\.so", n) for n in names), names
    kernels = [n for n in names if re.search(r"backends/cython/_kernels[_\w]*\.cpython.*\.so$", n)]
    assert kernels and (m.group(3) != "x86_64" or len(kernels) == 3), kernels
    assert any(n.endswith("licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert "License-Expression: MIT" in meta and "Requires-Dist: scikit-learn>=1.6" in meta


def test_lbfgs_options_without_the_scikit_learn_1_8_helper(monkeypatch):
    """The floor is scikit-learn 1.6: before 1.8 it has no _get_additional_lbfgs_options_dict, and the
    estimators pass L-BFGS-B's iprint by the same rule themselves (SciPy >= 1.15 dropped it)."""
    import scipy
    import sklearn.utils.fixes

    from fastmlp.sklearn import _lbfgs_iprint

    monkeypatch.delattr(sklearn.utils.fixes, "_get_additional_lbfgs_options_dict", raising=False)
    monkeypatch.setattr(scipy, "__version__", "1.11.0")
    assert _lbfgs_iprint(-1) == {"iprint": -1}
    monkeypatch.setattr(scipy, "__version__", "1.15.0rc1")
    assert _lbfgs_iprint(1) == {}
