"""Export trained networks to ONNX, for onnxruntime and every other ONNX runtime.

::

    from fastmlp.onnx import to_onnx
    model = to_onnx(net, "mlp.onnx")                 # or net.to_onnx("mlp.onnx")

    import onnxruntime as ort
    sess = ort.InferenceSession("mlp.onnx")
    proba = sess.run(None, {"X": X.astype(net.dtype)})[0]   # == net.predict_proba(X)

The graph is one ``Gemm`` (``X @ W.T + b``) and one activation per layer, in the
network's dtype (float32: ``tensor(float)``, float64: ``tensor(double)``): hidden
``Sigmoid``/``Tanh``/``Relu``/identity, output ``Sigmoid``/``Softmax``/identity/``Exp``
(its argument capped as the kernels cap it).  A network trained with classic dropout
(``dropout_scaling='predict'``) has its weights scaled by the keep probabilities, as
:meth:`fastmlp.Network.predict_proba` scales them.  Input ``X`` is ``(N, n_features)``
with a symbolic ``N``; output ``output`` is ``(N, n_outputs)``: the class probabilities
of a classifier (its ``predict`` is their arg-max, or ``> 0.5`` for one unit), the
values of a regressor.  Model metadata records the architecture.

scikit-learn: :class:`fastmlp.sklearn.MLPClassifier` and :class:`~fastmlp.sklearn.MLPRegressor`
carry skl2onnx's converter protocol (``onnx_shape_calculator``/``onnx_converter``), so
``skl2onnx.to_onnx(clf, X[:1])`` converts them -- alone or inside a ``Pipeline`` -- without
a registration step: a classifier gives ``label`` (the classes, as ``predict``) and
``probabilities`` (a ``(N, n_classes)`` tensor, as ``predict_proba``; skl2onnx's ZipMap is
not added), a regressor ``variable`` ``(N, n_outputs)``.  :func:`register_skl2onnx` also
enters them in skl2onnx's registry (for code that looks converters up by type).

The command line: :func:`export_main` (``fastmlp export MODEL OUT.onnx``).

Needs the optional extra ``pip install "fastmlp[onnx]"`` (onnx; onnxruntime to run the
models and check an export; skl2onnx for the estimators).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastmlp.backends.contract import EXP_CAP

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "add_export_arguments", "export_command", "export_main", "register_skl2onnx",
           "to_onnx"]  # fmt: skip

#: the default ``ai.onnx`` opset of exported models (onnxruntime >= 1.12 runs it)
DEFAULT_OPSET = 17
#: the oldest opset the graphs can be written in (``Softmax`` over one axis)
MIN_OPSET = 13

_HIDDEN_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "identity": None}
_OUTPUT_OPS = {"sigmoid": "Sigmoid", "softmax": "Softmax", "identity": None, "exp": "Exp"}


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the 'onnx' package: pip install \"fastmlp[onnx]\" ({exc})") from exc
    return onnx


def _check_opset(opset: object) -> int:
    onnx = _import_onnx()
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset must be an integer, got {type(opset).__name__}")
    if not MIN_OPSET <= int(opset) <= newest:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {newest}] (the installed onnx {onnx.__version__} "
                         f"knows up to {newest}), got {opset}")  # fmt: skip
    return int(opset)


def _check_network(net: object):
    from fastmlp.network import Network

    if not isinstance(net, Network):
        raise TypeError(f"net must be a fastmlp.Network, got {type(net).__name__} (for the scikit-learn estimators "
                        "use skl2onnx.to_onnx(estimator, X[:1]))")  # fmt: skip
    return net


# ---------------------------------------------------------------------------------------------- the graph
class _Builder:
    """Collects nodes and initializers under unique names (``unique(base) -> name``)."""

    def __init__(self, unique: Callable[[str], str]) -> None:
        self.unique = unique
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, *, domain: str = "", output: str | None = None,
             **attrs: Any) -> str:  # fmt: skip
        from onnx import helper

        out = output or self.unique(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.unique(op), domain=domain, **attrs))
        return out


class _ContainerBuilder(_Builder):
    """The same, written into a skl2onnx ``ModelComponentContainer``."""

    def __init__(self, scope: Any, container: Any) -> None:
        super().__init__(scope.get_unique_variable_name)
        self.scope, self.container = scope, container

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import helper

        name = self.unique(base)
        arr = np.ascontiguousarray(value)
        proto = helper.np_dtype_to_tensor_dtype(arr.dtype) if arr.dtype.kind != "U" else helper.TensorProto.STRING
        content = [s.encode("utf-8") for s in arr.ravel()] if arr.dtype.kind == "U" else arr.ravel()
        self.container.add_initializer(name, proto, list(arr.shape), content)
        return name

    def node(self, op: str, inputs: list[str], base: str, *, domain: str = "", output: str | None = None,
             **attrs: Any) -> str:  # fmt: skip
        out = output or self.unique(base)
        self.container.add_node(op, inputs, [out], op_domain=domain, name=self.scope.get_unique_operator_name(op),
                                **attrs)  # fmt: skip
        return out


def _proto(dtype: np.dtype) -> int:
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[np.dtype(dtype).name]


def _network_graph(g: _Builder, net: Any, x: str, output: str | None = None) -> str:
    """Append ``net``'s forward pass on ``x`` (already in the network's dtype) to ``g``; the output's name."""
    Ws, bs = net._inference_params()  # classic dropout: weights scaled by the keep probabilities
    last = len(Ws) - 1
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        act = net.output if i == last else net.activation
        op = (_OUTPUT_OPS if i == last else _HIDDEN_OPS)[act]
        name = output if i == last and op is None else None
        z = g.node("Gemm", [x, g.const(f"W{i}", W), g.const(f"b{i}", b)], f"z{i}", output=name, transB=1)
        if act == "exp":  # the kernels cap the argument so that exp stays finite
            cap = g.const("exp_cap", np.array(EXP_CAP[net.dtype.name], dtype=net.dtype))
            z = g.node("Min", [z, cap], f"z{i}_capped")
        if op == "Softmax":
            x = g.node(op, [z], f"a{i}", output=output if i == last else None, axis=1)
        elif op is not None:
            x = g.node(op, [z], f"a{i}", output=output if i == last else None)
        else:
            x = z
    return x


def to_onnx(net: Any, path: str | os.PathLike[str] | None = None, *, opset: int = DEFAULT_OPSET,
            input_name: str = "X", output_name: str = "output") -> Any:  # fmt: skip
    """The ONNX model of a trained network (and, with ``path``, that model written to a file).

    Parameters
    ----------
    net : fastmlp.Network
        Any hidden activation and output, float32 or float64, dropout scaling included.
    path : str or path-like, optional
        Where to write the model (atomically); None writes nothing.
    opset : int, default DEFAULT_OPSET
        The ``ai.onnx`` opset, ``MIN_OPSET`` to the newest the installed onnx knows.
    input_name, output_name : str, default 'X', 'output'
        Names of the graph's input ``(N, n_features)`` and output ``(N, n_outputs)``.

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker.check_model``.

    Raises
    ------
    ImportError
        Without the ``onnx`` package.
    TypeError, ValueError
        For a non-network, bad parameters (non-finite weights), a bad opset or names, an unwritable path.
    """
    onnx = _import_onnx()
    from onnx import helper

    import fastmlp

    net = _check_network(net)
    opset = _check_opset(opset)
    for what, name in (("input_name", input_name), ("output_name", output_name)):
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} must be a non-empty string, got {name!r}")
    if input_name == output_name:
        raise ValueError(f"input_name and output_name must differ, both are {input_name!r}")
    if path is not None:
        from fastmlp._io import check_output_path

        check_output_path(path, "ONNX model")
    used: dict[str, int] = {}

    def unique(base: str) -> str:
        used[base] = used.get(base, 0) + 1
        cand = base if used[base] == 1 else f"{base}_{used[base] - 1}"
        return unique(base + "_") if cand in (input_name, output_name) else cand

    g = _Builder(unique)
    _network_graph(g, net, input_name, output=output_name)
    elem = _proto(net.dtype)
    graph = helper.make_graph(
        g.nodes,
        "fastmlp_network",
        [helper.make_tensor_value_info(input_name, elem, ["N", net.n_features])],
        [helper.make_tensor_value_info(output_name, elem, ["N", net.n_outputs])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fastmlp",
                              producer_version=fastmlp.__version__,
                              doc_string=f"{net!r}: {output_name} = predict_proba({input_name})")  # fmt: skip
    model.ir_version = min(model.ir_version, _ir_version_for(opset))
    meta = {"layers": "-".join(map(str, net.layers)), "activation": net.activation, "output": net.output,
            "loss": net.loss, "dtype": net.dtype.name,
            "predict_keep": "" if net.predict_keep is None else ",".join(f"{k:.17g}" for k in net.predict_keep)}  # fmt: skip
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        from fastmlp._io import atomic_write

        data = model.SerializeToString()
        atomic_write(path, lambda fh: fh.write(data))
    return model


def _ir_version_for(opset: int) -> int:
    """The IR version a runtime of that opset's era reads (onnx writes its newest, which older runtimes refuse)."""
    from onnx import helper

    try:
        table = helper.VERSION_TABLE  # (release, ir_version, ai.onnx opset, ai.onnx.ml opset[, ...])
        return min(row[1] for row in table if row[2] >= opset)
    except (AttributeError, ValueError, IndexError):
        return helper.make_model(helper.make_graph([], "g", [], [])).ir_version


# ---------------------------------------------------------------------------------------------- skl2onnx
def _skl_types():
    try:
        from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType, StringTensorType
    except ImportError as exc:  # pragma: no cover - skl2onnx calls us, so it is there
        raise ImportError(f"the scikit-learn converters need skl2onnx: pip install \"fastmlp[onnx]\" ({exc})") from exc
    return DoubleTensorType, FloatTensorType, Int64TensorType, StringTensorType


def _is_multilabel(est: Any) -> bool:
    return getattr(getattr(est, "_label_binarizer", None), "y_type_", "") == "multilabel-indicator"


def _classes(est: Any) -> np.ndarray:
    """The classes as the label output carries them: strings, or int64 (skl2onnx's rule for numbers and bools)."""
    cl = np.asarray(est.classes_)
    if cl.dtype.kind in "OUS":
        return np.array([str(c) for c in cl])
    return cl.astype(np.int64)


def _float_type(var_type: Any):
    Double, Float, _, _ = _skl_types()
    return Double if isinstance(var_type, Double) else Float


def classifier_shape_calculator(operator: Any) -> None:
    """skl2onnx shape calculator of :class:`fastmlp.sklearn.MLPClassifier`: ``label`` and ``probabilities``."""
    _, _, Int64, String = _skl_types()
    est = operator.raw_operator
    if len(operator.inputs) != 1 or len(operator.outputs) != 2:
        raise RuntimeError(f"MLPClassifier converts one input to two outputs, got {len(operator.inputs)} and "
                           f"{len(operator.outputs)}")  # fmt: skip
    N = operator.inputs[0].get_first_dimension()
    k = len(est.classes_)
    if _is_multilabel(est):
        operator.outputs[0].type = Int64([N, k])
    elif _classes(est).dtype.kind == "U":
        operator.outputs[0].type = String([N])
    else:
        operator.outputs[0].type = Int64([N])
    operator.outputs[1].type = _float_type(operator.inputs[0].type)([N, k])


def regressor_shape_calculator(operator: Any) -> None:
    """skl2onnx shape calculator of :class:`fastmlp.sklearn.MLPRegressor`: ``variable`` ``(N, n_outputs)``."""
    est = operator.raw_operator
    if len(operator.inputs) != 1 or len(operator.outputs) != 1:
        raise RuntimeError("MLPRegressor converts one input to one output")
    N = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = _float_type(operator.inputs[0].type)([N, est.n_outputs_])


def _estimator_graph(scope: Any, operator: Any, container: Any) -> tuple[_ContainerBuilder, str, int]:
    """The fitted estimator's network on the operator's input (cast to the network's dtype): builder, output,
    and the proto type of the float outputs."""
    est = operator.raw_operator
    net = est.network_
    g = _ContainerBuilder(scope, container)
    x = g.node("Cast", [operator.inputs[0].full_name], "X_cast", to=_proto(net.dtype))
    Double = _skl_types()[0]
    out_dtype = np.float64 if _float_type(operator.inputs[0].type) is Double else np.float32
    return g, _network_graph(g, net, x), _proto(np.dtype(out_dtype))


def classifier_converter(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter of :class:`fastmlp.sklearn.MLPClassifier` (``label`` as ``predict``, ``probabilities``
    as ``predict_proba``)."""
    from onnx import TensorProto

    est = operator.raw_operator
    g, P, out_proto = _estimator_graph(scope, operator, container)
    label, proba = operator.outputs[0].full_name, operator.outputs[1].full_name
    if _is_multilabel(est):
        g.node("Cast", [P], "proba", output=proba, to=out_proto)
        half = g.const("half", np.array(0.5, dtype=est.network_.dtype))
        hit = g.node("Greater", [P, half], "above_half")
        g.node("Cast", [hit], "label", output=label, to=TensorProto.INT64)
        return
    if est.network_.n_outputs == 1:  # binary with one sigmoid unit: [1 - p, p]
        one = g.const("one", np.array(1.0, dtype=est.network_.dtype))
        P = g.node("Concat", [g.node("Sub", [one, P], "neg_proba"), P], "proba2", axis=1)
    g.node("Cast", [P], "proba", output=proba, to=out_proto)
    idx = g.node("ArgMax", [P], "argmax", axis=1, keepdims=0)
    g.node("Gather", [g.const("classes", _classes(est)), idx], "label", output=label, axis=0)


def regressor_converter(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter of :class:`fastmlp.sklearn.MLPRegressor` (``variable`` as ``predict``, 2-D)."""
    g, P, out_proto = _estimator_graph(scope, operator, container)
    g.node("Cast", [P], "variable", output=operator.outputs[0].full_name, to=out_proto)


def register_skl2onnx() -> None:
    """Enter the estimators' converters in skl2onnx's registry (``update_registered_converter``).

    Not needed for ``skl2onnx.to_onnx(est, X[:1])``, which finds them on the estimators themselves; this is
    for code that looks converters up by type (``skl2onnx.get_model_alias``).

    Raises
    ------
    ImportError
        Without skl2onnx.
    """
    try:
        from skl2onnx import update_registered_converter
    except ImportError as exc:
        raise ImportError(f"register_skl2onnx needs skl2onnx: pip install \"fastmlp[onnx]\" ({exc})") from exc
    from fastmlp.sklearn import MLPClassifier, MLPRegressor

    # zipmap=False is the one choice (probabilities stay a tensor); accepting it lets code that passes it run
    update_registered_converter(MLPClassifier, "FastmlpMLPClassifier", classifier_shape_calculator,
                                classifier_converter, options={"zipmap": [False]})  # fmt: skip
    update_registered_converter(MLPRegressor, "FastmlpMLPRegressor", regressor_shape_calculator, regressor_converter)


# ---------------------------------------------------------------------------------------------- command line
def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``fastmlp export`` to ``parser`` (for the CLI's subcommand); returns it.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"parser must be an argparse.ArgumentParser, got {type(parser).__name__}")
    parser.add_argument("model", help="a network saved by Network.save / `fastmlp train --out` (.npz)")
    parser.add_argument("out", help="the ONNX file to write (.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ai.onnx opset of the model ({MIN_OPSET} or newer; default {DEFAULT_OPSET})")  # fmt: skip
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not run the exported model in onnxruntime against the network")  # fmt: skip
    return parser


def export_command(args: argparse.Namespace) -> int:
    """Run ``fastmlp export`` with parsed arguments (see :func:`add_export_arguments`); returns 0.

    Loads the network, writes its ONNX model and, when onnxruntime is installed (and ``args.check``), runs
    the model on 64 random rows and prints the largest difference from ``predict_proba``.  Prints one line
    per step.

    Raises
    ------
    FileNotFoundError, ValueError, TypeError, ImportError
        A missing or unreadable model, a bad output path or opset, onnx not installed; the CLI prints them as
        one line and exits with 2.
    """
    from fastmlp.network import Network

    src, out = Path(args.model), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"model file {src} does not exist")
    net = Network.load(src, backend="auto")
    model = to_onnx(net, out, opset=args.opset)
    size = out.stat().st_size
    print(f"Exported {net!r} to {out} ({size:,} bytes, opset {args.opset}, ir_version {model.ir_version})")
    if getattr(args, "check", True):
        try:
            import onnxruntime as ort
        except ImportError:
            print("Not checked: onnxruntime is not installed (pip install onnxruntime)")
            return 0
        X = np.random.default_rng(0).normal(size=(64, net.n_features)).astype(net.dtype)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"X": X})[0]
        err = float(np.max(np.abs(got - net.predict_proba(X))))
        tol = 1e-5 if net.dtype == np.float32 else 1e-9
        if not err <= tol:
            raise ValueError(f"the exported model differs from the network by {err:.3g} (more than {tol:g})")
        print(f"Checked with onnxruntime {ort.__version__}: largest difference from predict_proba {err:.3g}")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """``fastmlp export MODEL OUT.onnx [--opset N] [--no-check]`` on its own; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``export`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; 2 (after one line on stderr) for a missing model, a bad path or opset, onnx missing.
    """
    parser = add_export_arguments(argparse.ArgumentParser(prog="fastmlp export",
                                                          description="Export a saved network to ONNX."))  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return export_command(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastmlp export: error: {msg}", file=sys.stderr)
        return 2
