"""The ``fastmlp`` command: train, lr-find, predict, bench, info.

Every user error (a wrong path, a corrupt file, an unknown backend, a bad
hyper-parameter) ends with one line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- argument types
def _arg_type(convert: type, ok: Any, requirement: str) -> Any:
    """An argparse ``type=``: ``convert`` the string, then check it, with a one-line message either way."""

    def parse(s: str) -> Any:
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if convert is int else 'a number'}") from None
        if (convert is float and not np.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f"{requirement}, got {s}")
        return v

    parse.__name__ = requirement
    return parse


_positive_float = _arg_type(float, lambda v: v > 0, "must be a positive number")
_nonneg_float = _arg_type(float, lambda v: v >= 0, "must be >= 0")
_probability = _arg_type(float, lambda v: 0 <= v < 1, "a drop probability must be in [0, 1)")
_positive_int = _arg_type(int, lambda v: v >= 1, "must be a positive integer")
_nonneg_int = _arg_type(int, lambda v: v >= 0, "must be >= 0")


# ---------------------------------------------------------------------- data
def load_data(spec: str, quiet: bool = False) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resolve ``--data``: 'mnist' (search and download, falling back to digits), 'digits', or a directory.

    Returns ``(name, X_train, y_train, X_test, y_test)`` with pixel values scaled to [-1, 1] (float32), as the
    classic notebook scales MNIST.
    """
    from fastmlp import datasets

    if spec == "digits":
        name, (Xtr, ytr, Xte, yte) = "digits (scikit-learn's 8x8)", datasets.load_digits()
    elif spec == "mnist":
        try:
            Xtr, ytr, Xte, yte = datasets.load_mnist()
            name = "MNIST"
        except datasets.DataNotFoundError as exc:
            print(f"fastmlp: MNIST unavailable ({exc}); training on scikit-learn's bundled 8x8 digits instead",
                  file=sys.stderr, flush=True)  # fmt: skip
            name, (Xtr, ytr, Xte, yte) = "digits (scikit-learn's 8x8, MNIST fallback)", datasets.load_digits()
    else:
        if not os.path.isdir(spec):
            raise CLIError(f"--data {spec}: no such directory (use 'mnist', 'digits' or a directory of four IDX files)")
        Xtr, ytr, Xte, yte = datasets.load_mnist(spec, download=False)
        name = f"IDX files in {spec}"
    return name, _scale(Xtr), ytr, _scale(Xte), yte


def _scale(X: np.ndarray) -> np.ndarray:
    """Pixels 0..255 to [-1, 1] as the classic notebook scales them: ``((X / 255) - 0.5) * 2``."""
    return ((X.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) * np.float32(2.0)


def _split_valid(X: np.ndarray, y: np.ndarray, n_valid: int, seed: int, quiet: bool):
    if n_valid == 0:
        return X, y, None, None
    if n_valid >= len(X) // 2:
        new = max(1, len(X) // 10)
        if not quiet:
            print(f"note: --valid {n_valid} is too large for {len(X)} training rows; using {new}", flush=True)
        n_valid = new
    from sklearn.model_selection import train_test_split

    try:
        Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=n_valid, random_state=seed, stratify=y)
    except ValueError:  # too few rows of some class to stratify
        Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=n_valid, random_state=seed)
    return Xtr, ytr, Xva, yva


# ---------------------------------------------------------------------- progress
def _progress_callback(epochs: int, quiet: bool) -> Any:
    """A callback that prints the classic epoch line and drives a tqdm bar on a terminal."""
    from fastmlp.callbacks import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.bar = None
            if not quiet and sys.stderr.isatty():
                try:
                    from tqdm import tqdm

                    self.bar = tqdm(total=epochs, unit="epoch", leave=False, dynamic_ncols=True)
                except ImportError:
                    self.bar = None

        def on_epoch_end(self, net: Any, history: Any) -> bool:
            if quiet:
                return False
            e = history.epoch[-1]
            line = (f"Epoch: {e:03d}/{epochs:03d} | Train loss: {history.train_loss[-1]:.4f} "
                    f"| Train Acc: {100 * history.train_acc[-1]:.2f}%")  # fmt: skip
            if history.valid_acc:
                line += f" | Valid Acc: {100 * history.valid_acc[-1]:.2f}%"
            line += f" | {history.seconds[-1]:.2f}s"
            if self.bar is not None:
                self.bar.write(line)
                self.bar.update(1)
            else:
                print(line, flush=True)
            return False

        def on_train_end(self, net: Any, history: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


# ---------------------------------------------------------------------- network options
def _add_network_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and network")
    g.add_argument("--data", default="mnist", metavar="mnist|digits|DIR",
                   help="'mnist' (default; $FASTMLP_DATA, the user cache, then a download; falls back to digits), "
                        "'digits', or a directory of four MNIST-layout IDX files (Fashion-MNIST, KMNIST)")  # fmt: skip
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=[50], metavar="N", help="hidden layer sizes (default 50)")
    g.add_argument("--activation", default="sigmoid", choices=["sigmoid", "tanh", "relu", "identity"])
    g.add_argument("--output", default=None, choices=["sigmoid", "softmax", "identity"],
                   help="output activation (default: sigmoid for mse, softmax for ce)")  # fmt: skip
    g.add_argument("--init", default="normal", choices=["normal", "glorot", "he"],
                   help="weight initialisation (default normal: N(0, 0.1), the notebook's)")  # fmt: skip
    g.add_argument("--loss", default="mse", choices=["mse", "ce"])
    g.add_argument("--backend", default="auto", help="auto, cython, numba or numpy (default auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--seed", type=_nonneg_int, default=123)
    g.add_argument("--batch-size", type=_positive_int, default=100)
    g.add_argument("--valid", type=_nonneg_int, default=5000, help="validation rows split off the training set (default 5000)")


def _build_network(args: argparse.Namespace, n_features: int, n_classes: int) -> Any:
    from fastmlp import Network

    # output=None: the network's default for the loss (sigmoid for mse, softmax for ce)
    return Network([n_features, *args.hidden, n_classes], activation=args.activation, output=args.output, loss=args.loss,
                   dtype=args.dtype, backend=args.backend, seed=args.seed, init=args.init)  # fmt: skip


def _n_classes(*ys: np.ndarray) -> int:
    return int(max(int(y.max()) for y in ys)) + 1


def _make_schedule(args: argparse.Namespace) -> Any:
    if args.schedule in (None, "constant"):
        return args.lr
    from fastmlp import schedules

    makers = {
        "linear": lambda: schedules.LinearLR(args.lr, start_factor=1.0, end_factor=0.1, total_iters=args.epochs),
        "step": lambda: schedules.StepLR(args.lr, step_size=max(1, args.epochs // 3), gamma=0.1),
        "exp": lambda: schedules.ExponentialLR(args.lr, gamma=0.95),
        "cosine": lambda: schedules.CosineAnnealingLR(args.lr, T_max=args.epochs),
        "plateau": lambda: schedules.ReduceLROnPlateau(args.lr),
    }
    return makers[args.schedule]()


# ---------------------------------------------------------------------- commands
def _check_backend(name: str) -> None:
    from fastmlp.backends import get_backend

    get_backend(name)  # fail before any data is loaded


def cmd_train(args: argparse.Namespace) -> int:
    _check_backend(args.backend)
    name, Xtr, ytr, Xte, yte = load_data(args.data, args.quiet)
    Xtr, ytr, Xva, yva = _split_valid(Xtr, ytr, args.valid, args.seed, args.quiet)
    net = _build_network(args, Xtr.shape[1], _n_classes(ytr, yte))
    if args.patience and Xva is None:
        raise CLIError("--patience needs validation data: use --valid N with N > 0")
    lr = _make_schedule(args)
    if not args.quiet:
        print(f"Data: {name}: {len(Xtr)} train, {0 if Xva is None else len(Xva)} valid, {len(Xte)} test rows")
        print(f"Model: {net!r}", flush=True)
    t0 = time.perf_counter()
    hist = net.fit(Xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                   X_valid=Xva, y_valid=yva, seed=args.seed, verbose=False, l1=args.l1, l2=args.l2, dropout=args.dropout,
                   input_dropout=args.input_dropout, early_stopping=args.patience or None,
                   callbacks=[_progress_callback(args.epochs, args.quiet)])  # fmt: skip
    wall = time.perf_counter() - t0
    train_time = sum(hist.seconds)
    _, test_acc = net.evaluate(Xte, yte)
    if hist.best_epoch is not None and not args.quiet:
        stop = f", stopped after epoch {hist.stopped_epoch}" if hist.stopped_epoch else ""
        print(f"Best epoch: {hist.best_epoch} (weights restored){stop}")
    print(f"Test accuracy: {100 * test_acc:.2f}%")
    n_seen = len(hist.epoch) * len(Xtr)
    print(f"Wall time: {wall:.1f} s | throughput: {n_seen / max(train_time, 1e-9):,.0f} samples/s "
          f"({len(hist.epoch)} epochs, backend {net.backend.name}, {net.dtype.name})")  # fmt: skip
    if args.out:
        path = net.save(args.out)
        print(f"Model saved to {path}")
    if args.plot:
        from fastmlp.plotting import plot_history

        plot_history(hist, args.plot)
        print(f"Trace plot saved to {args.plot}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    import fastmlp

    _check_backend(args.backend)
    name, Xtr, ytr, _, yte = load_data(args.data, args.quiet)
    net = _build_network(args, Xtr.shape[1], _n_classes(ytr, yte))
    res = fastmlp.lr_find(net, Xtr, ytr, start=args.start, end=args.end, num_iter=args.num_iter,
                          batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    print(f"Data: {name}; model: {net!r}")
    print(f"Suggested learning rate: {res.suggestion:.4g} (half the rate at the loss minimum); "
          f"steepest descent at {res.steepest:.4g}")  # fmt: skip
    if args.plot:
        res.plot(args.plot)
        print(f"LR finder plot saved to {args.plot}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fastmlp import Network

    try:
        net = Network.load(args.model, backend=args.backend)
    except FileNotFoundError as exc:
        raise CLIError(f"--model {args.model}: {exc}") from None
    if net.is_regressor:
        raise CLIError(f"--model {args.model}: a regression network ({net.output} output, {net.loss} loss); "
                       "fastmlp predict reports the accuracy of classifiers")  # fmt: skip
    name, _, _, Xte, yte = load_data(args.data, quiet=True)
    if Xte.shape[1] != net.n_features:
        raise CLIError(f"the model expects {net.n_features} features but {name} has {Xte.shape[1]}")
    if yte.max() >= net.n_classes:
        raise CLIError(f"the model has {net.n_classes} classes but {name} has labels up to {yte.max()}")
    if args.mc_samples:
        mc = net.mc_predict(Xte, n_samples=args.mc_samples, seed=args.seed)
        pred = np.argmax(mc.mean, axis=1)
    else:
        pred = net.predict(Xte)
    acc = float(np.mean(pred == yte))
    print(f"Model: {net!r}")
    print(f"Data: {name} test split, {len(yte)} rows")
    print(f"Test accuracy: {100 * acc:.2f}%")
    k = net.n_classes
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (yte, pred), 1)
    width = max(5, len(str(cm.max())) + 1)
    print("Confusion matrix (rows: true class, columns: predicted):")
    print("true\\pred" + "".join(f"{j:>{width}}" for j in range(k)))
    for i in range(k):
        print(f"{i:>9}" + "".join(f"{v:>{width}}" for v in cm[i]))
    if args.mc_samples:
        wrong = pred != yte
        ent_wrong = mc.entropy[wrong].mean() if wrong.any() else float("nan")
        print(f"MC dropout ({args.mc_samples} samples): mean predictive entropy {mc.entropy.mean():.4f} nats; "
              f"correct {mc.entropy[~wrong].mean():.4f}, wrong {ent_wrong:.4f}")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fastmlp import benchmark

    backends = args.backends.split(",") if args.backends else None
    if backends:
        from fastmlp.backends import get_backend

        for b in backends:
            get_backend(b)
    configs = args.configs
    if any(c not in benchmark.CONFIGS for c in configs):
        raise CLIError(f"--configs takes letters from {''.join(benchmark.CONFIGS)}, got {configs!r}")
    data = None if args.data in (None, "mnist") else args.data
    benchmark.run(quick=args.quick, configs=configs, backends=backends, rounds=args.rounds, rows=args.rows,
                  json_path=args.json, data_path=data, torch=not args.no_torch, memory=not args.no_memory)  # fmt: skip
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import fastmlp
    from fastmlp import datasets
    from fastmlp.backends import _AUTO_ORDER, backend_errors, get_backend

    print(f"fastmlp {fastmlp.__version__} ({os.path.dirname(fastmlp.__file__)})")
    print(f"Python {platform.python_version()}, NumPy {np.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    errors = backend_errors()
    print("Backends (fastest first; 'auto' takes the first that loads):")
    for name in _AUTO_ORDER:
        if name in errors:
            print(f"  {name:7s} NOT loaded: {errors[name]}")
        else:
            mod = get_backend(name).raw
            extra = getattr(mod, "describe", lambda: "")()
            print(f"  {name:7s} loaded{(' - ' + extra) if extra else ''}")
    from fastmlp import _threads

    env = os.environ.get("FASTMLP_NUM_THREADS")
    print(f"Threads: compiled epochs use up to {_threads.thread_budget()} of the {_threads.cpu_count()} CPUs this "
          f"process may run on ($FASTMLP_NUM_THREADS={env or 'unset'})")  # fmt: skip
    try:
        feats = np._core._multiarray_umath.__cpu_features__  # type: ignore[attr-defined]
        have = [f for f in ("SSE42", "AVX", "AVX2", "FMA3", "AVX512F") if feats.get(f)]
        print(f"CPU features: {' '.join(have) or 'baseline only'}")
    except AttributeError:
        pass
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            print(f"Thread pool: {lib.get('internal_api')} {lib.get('version') or ''} "
                  f"({lib.get('num_threads')} threads) {lib.get('filepath')}")  # fmt: skip
    except ImportError:
        pass
    print("MNIST is looked for in: --data DIR, then $FASTMLP_DATA "
          f"({os.environ.get('FASTMLP_DATA') or 'unset'}), then {datasets.cache_dir()}, then downloaded")  # fmt: skip
    try:
        files = datasets.find_mnist(download=False)
        print(f"MNIST found: {files[0].parent}")
    except datasets.DataNotFoundError:
        print("MNIST not found locally (fastmlp train downloads it, or falls back to digits offline)")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastmlp`` command."""
    import fastmlp

    p = _Parser(prog="fastmlp", description="Fast multilayer perceptrons on the CPU.")
    p.add_argument("--version", action="version", version=f"fastmlp {fastmlp.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a network and report test accuracy",
                       description="Train a network; prints one line per epoch and the test accuracy.")  # fmt: skip
    _add_network_options(t)
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=50)
    g.add_argument("--lr", type=_positive_float, default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "nesterov", "adam", "adamw"],
                   help="sgd (default: plain minibatch SGD, the notebook's), momentum or nesterov (0.9), "
                        "adam (scikit-learn's) or adamw (PyTorch's, weight decay 0.01)")  # fmt: skip
    g.add_argument("--schedule", default=None, choices=["constant", "linear", "step", "exp", "cosine", "plateau"],
                   help="learning-rate schedule (default constant)")  # fmt: skip
    g.add_argument("--l1", type=_nonneg_float, default=0.0)
    g.add_argument("--l2", type=_nonneg_float, default=0.0)
    g.add_argument("--dropout", type=_probability, default=0.0, help="hidden-unit drop probability")
    g.add_argument("--input-dropout", type=_probability, default=0.0, help="input drop probability")
    g.add_argument("--patience", type=_positive_int, default=None, help="early stopping patience (epochs)")
    g.add_argument("--out", default=None, metavar="model.npz", help="save the trained model here")
    g.add_argument("--plot", default=None, metavar="trace.png", help="save the loss/accuracy trace plot here")
    g.add_argument("--quiet", action="store_true", help="print only the final lines")
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="learning-rate range test with a suggestion",
                        description="Sweep the learning rate exponentially and suggest one.")  # fmt: skip
    _add_network_options(lf)
    lf.add_argument("--start", type=_positive_float, default=1e-5)
    lf.add_argument("--end", type=_positive_float, default=10.0)
    lf.add_argument("--num-iter", type=_positive_int, default=100)
    lf.add_argument("--plot", default="lr_find.png", metavar="PNG", help="plot file (default lr_find.png)")
    lf.add_argument("--quiet", action="store_true")
    lf.set_defaults(func=cmd_lr_find)

    pr = sub.add_parser("predict", help="accuracy and confusion matrix of a saved model",
                        description="Evaluate a saved model on the test split of a dataset.")  # fmt: skip
    pr.add_argument("--model", required=True, metavar="model.npz")
    pr.add_argument("--data", default="mnist", metavar="mnist|digits|DIR")
    pr.add_argument("--mc-samples", type=_nonneg_int, default=0, help="Monte-Carlo dropout samples (0 = off)")
    pr.add_argument("--backend", default="auto")
    pr.add_argument("--seed", type=_nonneg_int, default=0)
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="throughput of every backend against the classic NumPy loop",
                       description="Measure GEMM peak and training throughput per backend, dtype and configuration.")  # fmt: skip
    b.add_argument("--quick", action="store_true", help="small data, few rounds: under a minute")
    b.add_argument("--configs", default="abc", help="which configurations (letters from 'abc')")
    b.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    b.add_argument("--rounds", type=_positive_int, default=None)
    b.add_argument("--rows", type=_positive_int, default=None, help="training rows per configuration")
    b.add_argument("--data", default=None, metavar="DIR", help="MNIST directory (default: as load_mnist finds it)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch row even if torch is installed")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="version, backends, threads, BLAS, CPU features, data paths")
    i.set_defaults(func=cmd_info)
    for sp in (t, lf, pr, b, i):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmlp`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fastmlp: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastmlp {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
