"""ONNX export: the exported networks and estimators, run in onnxruntime, give predict_proba / predict.

Tolerances are the issue's: 1e-5 for float32, 1e-9 for float64 (absolute and relative).
"""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

import fastmlp

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install 'fastmlp[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="running the exported models needs onnxruntime (pip install 'fastmlp[onnx]')")
from fastmlp.onnx import DEFAULT_OPSET, MIN_OPSET, export_main, to_onnx  # noqa: E402
from fastmlp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-9}
HIDDEN = ["sigmoid", "tanh", "relu", "identity"]
OUTPUTS = [("softmax", "ce"), ("sigmoid", "mse"), ("sigmoid", "ce"), ("identity", "squared_error"), ("exp", "poisson")]


def _session(model):
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _run(model, X):
    sess = _session(model)
    return sess.run(None, {sess.get_inputs()[0].name: X})


def _trained(hidden, output, loss, dtype, *, units=3, dropout=0.0, scaling="inverted", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(240, 6))
    if loss in ("ce", "mse"):
        y = rng.integers(0, max(units, 2), 240) if units > 1 else (X[:, 0] > 0).astype(np.int64)
    else:
        y = np.abs(X[:, :units] + rng.normal(scale=0.1, size=(240, units))).astype(dtype)
    net = fastmlp.Network([6, 9, 5, units], activation=hidden, output=output, loss=loss, dtype=dtype, seed=seed)
    net.fit(X, y, epochs=3, batch_size=40, lr=0.05, dropout=dropout, dropout_scaling=scaling, verbose=0, warn=False)
    return net, X.astype(dtype)


def _assert_close(got, want, dtype):
    tol = TOL[np.dtype(dtype).name]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


#: the largest |onnxruntime - predict_proba| of each case, for the report at the end
DIFFS: dict[str, float] = {}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden,output,loss", [(h, o, lo) for h, (o, lo) in itertools.product(HIDDEN, OUTPUTS)])
def test_network_round_trip_through_onnxruntime(hidden, output, loss, dtype):
    units = 1 if (output, loss) == ("sigmoid", "ce") else 3
    net, X = _trained(hidden, output, loss, dtype, units=units)
    model = to_onnx(net)
    got = _run(model, X)[0]
    want = net.predict_proba(X)
    _assert_close(got, want, dtype)
    DIFFS[f"{hidden}/{output}-{loss} {dtype}"] = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert model.graph.input[0].type.tensor_type.elem_type == (onnx.TensorProto.FLOAT if dtype == "float32"
                                                                else onnx.TensorProto.DOUBLE)  # fmt: skip
    props = {p.key: p.value for p in model.metadata_props}
    assert props["layers"] == "6-9-5-" + str(units) and props["activation"] == hidden and props["output"] == output


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_time_dropout_scaling_is_exported(dtype):
    """Classic dropout scales the weights by the keep probabilities at prediction: so must the model."""
    net, X = _trained("relu", "softmax", "ce", dtype, dropout=0.5, scaling="predict")
    assert net.predict_keep is not None and min(net.predict_keep) < 1
    got = _run(to_onnx(net), X)[0]
    _assert_close(got, net.predict_proba(X), dtype)
    unscaled = net.predict_keep
    net.predict_keep = None  # what an export that forgot the scaling would match
    assert not np.allclose(got, net.predict_proba(X), rtol=TOL[dtype], atol=TOL[dtype])
    net.predict_keep = unscaled


def test_exp_output_is_capped_like_the_kernels():
    net, X = _trained("identity", "exp", "poisson", "float32", units=2)
    net.biases[-1][...] = 200.0  # exp(200) overflows float32; the kernels cap the argument at EXP_CAP
    got = _run(to_onnx(net), X)[0]
    assert np.isfinite(got).all()
    _assert_close(got, net.predict_proba(X), "float32")


def test_network_to_onnx_writes_the_file(tmp_path):
    net, X = _trained("tanh", "softmax", "ce", "float64")
    path = tmp_path / "net.onnx"
    model = net.to_onnx(path, opset=MIN_OPSET)
    assert path.is_file() and onnx.load(str(path)) == model
    assert {o.domain: o.version for o in model.opset_import}[""] == MIN_OPSET
    _assert_close(_run(str(path), X)[0], net.predict_proba(X), "float64")
    assert net.to_onnx().opset_import[0].version == DEFAULT_OPSET


def test_to_onnx_validates_its_arguments(tmp_path):
    net, _ = _trained("tanh", "softmax", "ce", "float64")
    with pytest.raises(TypeError, match=r"fastmlp\.Network"):
        to_onnx("not a network")
    with pytest.raises(ValueError, match="opset"):
        to_onnx(net, opset=MIN_OPSET - 1)
    with pytest.raises(ValueError, match="opset"):
        to_onnx(net, opset=onnx.defs.onnx_opset_version() + 1)
    with pytest.raises(TypeError, match="opset"):
        to_onnx(net, opset="17")
    with pytest.raises(ValueError, match="differ"):
        to_onnx(net, input_name="x", output_name="x")
    with pytest.raises(TypeError, match="input_name"):
        to_onnx(net, input_name="")
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(net, tmp_path / "missing" / "net.onnx")
    net.weights[0][0, 0] = np.nan
    with pytest.raises(ValueError):
        to_onnx(net)


def test_export_main_writes_and_checks(tmp_path):
    net, X = _trained("relu", "softmax", "ce", "float32")
    src, out = net.save(tmp_path / "net.npz"), tmp_path / "net.onnx"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert export_main([str(src), str(out), "--opset", "15"]) == 0
    text = buf.getvalue()
    assert "Exported" in text and "opset 15" in text and "Checked with onnxruntime" in text
    _assert_close(_run(str(out), X)[0], net.predict_proba(X), "float32")
    err = io.StringIO()
    with redirect_stderr(err):
        assert export_main([str(tmp_path / "nope.npz"), str(out)]) == 2
    assert "does not exist" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1
    with redirect_stderr(io.StringIO()):
        assert export_main([str(src), str(out), "--opset", "3"]) == 2


# ------------------------------------------------------------------ skl2onnx
@pytest.fixture
def skl2onnx():
    return pytest.importorskip("skl2onnx", reason="the estimators' converters need skl2onnx (pip install 'fastmlp[onnx]')")


def _xy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, rng


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["multiclass", "binary", "strings", "multilabel"])
def test_skl2onnx_converts_the_classifier(kind, dtype, skl2onnx):
    X, rng = _xy()
    X = X.astype(dtype)
    y = {"multiclass": rng.integers(0, 3, 200) * 2 + 1, "binary": (X[:, 0] > 0).astype(np.int64),
         "strings": np.array(["ant", "bee", "cat"])[rng.integers(0, 3, 200)],
         "multilabel": (rng.normal(size=(200, 3)) > 0).astype(np.int64)}[kind]  # fmt: skip
    clf = MLPClassifier((8,), activation="tanh", max_iter=30, random_state=0).fit(X, y)
    model = skl2onnx.to_onnx(clf, X[:1])
    sess = _session(model)
    assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
    label, proba = sess.run(None, {sess.get_inputs()[0].name: X})
    _assert_close(proba, clf.predict_proba(X), dtype)
    want = clf.predict(X)
    assert label.shape == want.shape and (label == want).all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("loss", ["squared_error", "poisson"])
def test_skl2onnx_converts_the_regressor(loss, skl2onnx):
    X, rng = _xy()
    y = np.abs(np.c_[X[:, 0] * 2, X[:, 1] - X[:, 2]])
    reg = MLPRegressor(loss=loss, hidden_layer_sizes=(8,), max_iter=40, random_state=0).fit(X, y)
    (got,) = _run(skl2onnx.to_onnx(reg, X[:1]), X)
    _assert_close(got, reg.predict(X), "float64")
    reg1 = MLPRegressor(hidden_layer_sizes=(8,), max_iter=40, random_state=0).fit(X, y[:, 0])
    (got1,) = _run(skl2onnx.to_onnx(reg1, X[:1]), X)
    assert got1.shape == (200, 1)
    _assert_close(got1[:, 0], reg1.predict(X), "float64")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_skl2onnx_converts_a_pipeline_and_a_float32_network_on_double_input(skl2onnx):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, rng = _xy()
    y = rng.integers(0, 3, 200)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((8,), max_iter=30, random_state=0)).fit(X, y)
    label, proba = _run(skl2onnx.to_onnx(pipe, X[:1]), X)
    _assert_close(proba, pipe.predict_proba(X), "float64")
    assert (label == pipe.predict(X)).all()
    clf = MLPClassifier((8,), max_iter=30, random_state=0, dtype="float32").fit(X, y)  # a float32 network
    label, proba = _run(skl2onnx.to_onnx(clf, X[:1]), X)  # fed float64: cast in, computed in float32
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba, clf.predict_proba(X), rtol=TOL["float32"], atol=TOL["float32"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_register_skl2onnx_enters_the_estimators(skl2onnx):
    from fastmlp.onnx import register_skl2onnx

    register_skl2onnx()
    assert skl2onnx.get_model_alias(MLPClassifier) == "FastmlpMLPClassifier"
    assert skl2onnx.get_model_alias(MLPRegressor) == "FastmlpMLPRegressor"
    X, rng = _xy(60)
    clf = MLPClassifier((4,), max_iter=5, random_state=0).fit(X, rng.integers(0, 2, 60))
    label, proba = _run(skl2onnx.to_onnx(clf, X[:1], options={"zipmap": False}), X)
    _assert_close(proba, clf.predict_proba(X), "float64")


def test_zz_report_round_trip_differences(capsys):
    """Not a check: prints the largest difference per activation and dtype (run after the round trips)."""
    if not DIFFS:
        pytest.skip("the round-trip tests did not run in this session")
    with capsys.disabled():
        print("\nONNX round trip, largest |onnxruntime - predict_proba|:")
        for key, err in sorted(DIFFS.items()):
            print(f"  {key:28s} {err:.3g}")
    assert all(err <= TOL[key.rsplit(" ", 1)[1]] for key, err in DIFFS.items())


def test_readme_onnx_example_runs_as_written(tmp_path, skl2onnx):
    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S) if "to_onnx" in b]
    assert len(blocks) == 1
    res = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = res.stdout.split("\n")[:2]
    assert float(first) <= 1e-5 and second.startswith("True ") and float(second.split()[1]) <= 1e-5, res.stdout
