"""The ``fastmlp`` command: train, lr-find, predict, bench, info, export.

Every user error (a wrong path, a corrupt file, an unknown backend, a bad
hyper-parameter) ends with one line on stderr and exit code 2; ``--debug``
shows the traceback instead.  Every option's help says its default.  A closed
output pipe (``fastmlp info | head -1``) ends quietly with exit code 0, as
``head`` expects.  Extras a command needs (matplotlib for ``--plot``) are
checked before any data is loaded or any training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

#: the exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, as ``(default: ...)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text + " (default: off)"
        if action.default is None:
            return text if "unset" in text else text + " (default: unset)"
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) and shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

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
            files = datasets.find_mnist()
        except datasets.DataNotFoundError as exc:
            print(f"fastmlp: MNIST unavailable ({exc}); using scikit-learn's bundled 8x8 digits instead. "
                  "Point at a copy of MNIST with --data DIR or FASTMLP_DATA=DIR", file=sys.stderr, flush=True)  # fmt: skip
            name, (Xtr, ytr, Xte, yte) = "digits (scikit-learn's 8x8, MNIST fallback)", datasets.load_digits()
        else:
            Xtr, ytr, Xte, yte = datasets.load_mnist(files[0].parent, download=False)
            name = datasets.identify(files) or f"IDX files in {files[0].parent}"
    else:
        if not os.path.isdir(spec):
            raise CLIError(f"--data {spec}: no such directory (use 'mnist', 'digits' or a directory of four IDX files)")
        Xtr, ytr, Xte, yte = datasets.load_mnist(spec, download=False)
        name = datasets.identify(spec) or f"IDX files in {spec}"
        name = name if name.startswith("IDX") else f"{name} ({spec})"
    return name, _scale(Xtr), ytr, _scale(Xte), yte


def _check_plot_extra(path: str | None, flag: str = "--plot") -> None:
    """Fail before any work when a plot is asked for and matplotlib is missing."""
    if not path:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError(f"{flag} {path} needs matplotlib: pip install 'fastmlp[plot]' (or leave out {flag})") from None
    from fastmlp._io import check_output_path

    target = path if path.lower().endswith(".png") else path + ".png"
    if os.path.dirname(target) and not os.path.isdir(os.path.dirname(target)):
        return  # plotting creates the folders
    check_output_path(target, "plot")


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
                   help="'mnist' ($FASTMLP_DATA, the user cache, then a download; falls back to digits offline), "
                        "'digits', or a directory of four MNIST-layout IDX files (MNIST, Fashion-MNIST, KMNIST: "
                        "named from their digests); pixels are scaled to [-1, 1] as the notebook does")  # fmt: skip
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=[50], metavar="N",
                   help="hidden layer sizes, e.g. --hidden 256 256 for two layers")  # fmt: skip
    g.add_argument("--activation", default="sigmoid", choices=["sigmoid", "tanh", "relu", "identity"],
                   help="hidden-layer activation")  # fmt: skip
    g.add_argument("--output", default=None, choices=["sigmoid", "softmax", "identity"],
                   help="output activation; unset: the loss's (sigmoid for mse, softmax for ce)")  # fmt: skip
    g.add_argument("--init", default="normal", choices=["normal", "glorot", "he"],
                   help="weight initialisation: normal is N(0, 0.1), the notebook's; he suits relu")  # fmt: skip
    g.add_argument("--loss", default="mse", choices=["mse", "ce"],
                   help="mse (the notebook's, with sigmoid outputs) or cross-entropy (with softmax outputs)")  # fmt: skip
    g.add_argument("--backend", default="auto", help="kernel backend: auto (the fastest that loads), cython, numba or numpy")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="float32 is about twice as fast; float64 gives the notebook's numbers")  # fmt: skip
    g.add_argument("--seed", type=_nonneg_int, default=123,
                   help="seed of the initialisation, the validation split and the shuffling (123: the notebook's)")  # fmt: skip
    g.add_argument("--batch-size", type=_positive_int, default=100, help="minibatch size")
    g.add_argument("--valid", type=_nonneg_int, default=5000,
                   help="validation rows split off the training set (stratified; 0 for none)")  # fmt: skip


def _build_network(args: argparse.Namespace, n_features: int, n_classes: int) -> Any:
    from fastmlp import Network

    # output=None: the network's default for the loss (sigmoid for mse, softmax for ce)
    return Network([n_features, *args.hidden, n_classes], activation=args.activation, output=args.output, loss=args.loss,
                   dtype=args.dtype, backend=args.backend, seed=args.seed, init=args.init)  # fmt: skip


def _n_classes(*ys: np.ndarray) -> int:
    return int(max(int(y.max()) for y in ys)) + 1


def _make_schedule(args: argparse.Namespace) -> Any:
    if args.schedule == "constant":
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
    _check_plot_extra(args.plot)
    if args.out:
        from fastmlp._io import check_output_path

        check_output_path(args.out if args.out.endswith(".npz") else args.out + ".npz", "model")
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
    if hist.interrupted:  # Ctrl-C: fit kept the weights of the last complete epoch; save those, exit 130
        done = len(hist.epoch)
        print(f"fastmlp train: interrupted after {done} complete epoch{'s' * (done != 1)} of {args.epochs}",
              file=sys.stderr)  # fmt: skip
        if args.out and done:
            path = net.save(args.out)
            print(f"Model of epoch {done} saved to {path}")
        return EXIT_INTERRUPTED
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
    plot = None if args.no_plot else args.plot
    _check_plot_extra(plot)
    name, Xtr, ytr, _, yte = load_data(args.data, args.quiet)
    net = _build_network(args, Xtr.shape[1], _n_classes(ytr, yte))
    res = fastmlp.lr_find(net, Xtr, ytr, start=args.start, end=args.end, num_iter=args.num_iter,
                          batch_size=args.batch_size, seed=args.seed, optimizer=args.optimizer, warn=False)  # fmt: skip
    print(f"Data: {name}; model: {net!r}")
    if res.turned:
        how = f"half the rate where the loss turns up, {res.turn_lr:.4g}; it diverges from {res.divergence_lr:.4g}"
    else:
        how = (f"the loss never turned up below {res.lrs[-1]:.3g}: half the rate where it reached its floor, "
               f"{res.turn_lr:.4g}")  # fmt: skip
    print(f"Suggested learning rate: {res.suggestion:.4g} ({how})")
    print(f"Steepest descent at {res.steepest:.4g}; train with: fastmlp train --lr {res.suggestion:.3g} ...")
    if plot:
        res.plot(plot)
        print(f"LR finder plot saved to {plot}")
    return 0


def _read_rows(path: str) -> np.ndarray:
    """Feature rows from ``.npy`` (no pickles) or ``.csv`` (comma-separated numbers, an optional header line)."""
    if not os.path.isfile(path):
        raise CLIError(f"--input {path}: no such file")
    if path.lower().endswith(".npy"):
        try:
            X = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            msg = "it holds Python objects" if "allow_pickle" in str(exc) else str(exc).splitlines()[0]
            raise CLIError(f"--input {path}: not a readable .npy file of numbers ({msg})") from None
    elif path.lower().endswith(".csv"):
        with open(path) as fh:
            first = fh.readline()
        try:
            float(first.split(",")[0])
            skip = 0
        except ValueError:
            skip = 1  # a header line
        try:
            X = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        except ValueError as exc:
            raise CLIError(f"--input {path}: not a CSV of numbers ({str(exc).splitlines()[0]})") from None
    else:
        raise CLIError(f"--input {path}: give a .npy or a .csv file of feature rows")
    if X.ndim != 2:
        raise CLIError(f"--input {path}: rows must be 2-D (n_rows, n_features), got shape {X.shape}; save one sample "
                       "as X.reshape(1, -1)")  # fmt: skip
    return X


def _input_scale(X: np.ndarray, how: str, path: str) -> np.ndarray:
    """``--input-scale``: 'pixels' scales 0..255 to [-1, 1] as train does; 'auto' does so for 0..255 integers."""
    if how == "none":
        return X
    integral = X.dtype.kind in "iub" or bool(np.all(np.mod(X, 1) == 0))
    pixels = integral and X.size and X.min() >= 0 and X.max() <= 255 and X.max() > 1
    if how == "pixels" or pixels:
        if how == "auto":
            print(f"note: --input {path} holds integers in 0..255: scaled to [-1, 1] as fastmlp train scales pixels "
                  "(--input-scale none uses them as they are)", file=sys.stderr, flush=True)  # fmt: skip
        return _scale(X)
    return X


def _write_predictions(path: str, pred: np.ndarray, probs: np.ndarray, mc: Any) -> None:
    from fastmlp._io import atomic_write, check_output_path

    k = probs.shape[1]
    if mc is None:
        head = ["label", *(f"p_{j}" for j in range(k))]
        cols = [pred[:, None], probs]
    else:
        head = ["label", *(f"mean_{j}" for j in range(k)), *(f"std_{j}" for j in range(k)), "entropy"]
        cols = [pred[:, None], mc.mean, mc.std, mc.entropy[:, None]]
    table = np.hstack([c.astype(np.float64) for c in cols])
    lines = [",".join(head)] + [str(int(r[0])) + "," + ",".join(f"{v:.6g}" for v in r[1:]) for r in table]
    text = "\n".join(lines) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    check_output_path(path, "predictions")
    atomic_write(path, lambda fh: fh.write(text.encode()))


def cmd_predict(args: argparse.Namespace) -> int:
    from fastmlp import Network

    try:
        net = Network.load(args.model, backend=args.backend)
    except FileNotFoundError as exc:
        raise CLIError(f"--model {args.model}: {exc}") from None
    if net.is_regressor:
        raise CLIError(f"--model {args.model}: a regression network ({net.output} output, {net.loss} loss); "
                       "fastmlp predict reports the classes and probabilities of classifiers")  # fmt: skip
    if args.mc_samples:
        trained = (net.dropout_ or 0) > 0 or (net.input_dropout_ or 0) > 0
        if not trained and args.mc_dropout is None:
            raise CLIError(f"--mc-samples: {args.model} was trained without dropout, so every Monte-Carlo pass would "
                           "give the same prediction; pass --mc-dropout RATE to drop hidden units at RATE anyway "
                           "(e.g. --mc-dropout 0.2), or train with fastmlp train --dropout RATE")  # fmt: skip
    elif args.mc_dropout is not None:
        raise CLIError("--mc-dropout RATE only takes effect with --mc-samples N (N > 0)")
    output = args.output
    if args.input is None:
        name, _, _, X, y = load_data(args.data, quiet=True)
        what = f"{name} test split"
    else:
        X, y = _input_scale(_read_rows(args.input), args.input_scale, args.input), None
        name = what = args.input
        output = output or "-"
    if X.shape[1] != net.n_features:
        raise CLIError(f"the model expects {net.n_features} features but {name} has {X.shape[1]}")
    if y is not None and y.max() >= net.n_classes:
        raise CLIError(f"the model has {net.n_classes} classes but {name} has labels up to {y.max()}")
    if output and output != "-":
        from fastmlp._io import check_output_path

        check_output_path(output, "predictions")
    mc = None
    if args.mc_samples:
        mc = net.mc_predict(X, n_samples=args.mc_samples, seed=args.seed, dropout=args.mc_dropout)
        probs, pred = mc.mean, np.argmax(mc.mean, axis=1)
    else:
        probs = net.predict_proba(X).astype(np.float64)
        pred = net.predict(X)
        if probs.shape[1] == 1:  # one sigmoid unit: the probabilities of classes 0 and 1
            probs = np.hstack([1 - probs, probs])
    if output:
        _write_predictions(output, pred, probs, mc)
        if output != "-":
            print(f"Predictions of {len(pred)} rows written to {output}", file=sys.stderr if y is None else sys.stdout)
    if y is None:
        return 0
    acc = float(np.mean(pred == y))
    print(f"Model: {net!r}")
    print(f"Data: {what}, {len(y)} rows")
    print(f"Test accuracy: {100 * acc:.2f}%")
    k = net.n_classes
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    width = max(5, len(str(cm.max())) + 1)
    print("Confusion matrix (rows: true class, columns: predicted):")
    print("true\\pred" + "".join(f"{j:>{width}}" for j in range(k)))
    for i in range(k):
        print(f"{i:>9}" + "".join(f"{v:>{width}}" for v in cm[i]))
    if mc is not None:
        wrong = pred != y
        ent_wrong = mc.entropy[wrong].mean() if wrong.any() else float("nan")
        print(f"MC dropout ({args.mc_samples} samples, dropout {mc.dropout:g}): mean predictive entropy "
              f"{mc.entropy.mean():.4f} nats; correct {mc.entropy[~wrong].mean():.4f}, wrong {ent_wrong:.4f}")  # fmt: skip
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
    if args.sections in ("all", None):
        sections = benchmark.SECTIONS
    elif args.sections == "none":
        sections = ()
    else:
        sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
        unknown = [x for x in sections if x not in benchmark.SECTIONS]
        if unknown:
            raise CLIError(f"--sections takes 'all', 'none' or names from {','.join(benchmark.SECTIONS)}, "
                           f"got {', '.join(unknown)}")  # fmt: skip
    benchmark.run(quick=args.quick, configs=configs, backends=backends, rounds=args.rounds, rows=args.rows,
                  json_path=args.json, data_path=data, torch=not args.no_torch, memory=not args.no_memory,
                  sections=sections)  # fmt: skip
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
        print(f"MNIST-layout data found: {files[0].parent} ({datasets.identify(files) or 'unknown IDX files'})")
    except datasets.DataNotFoundError:
        print("MNIST not found locally (fastmlp train downloads it, or falls back to digits offline); "
              "point at a copy with --data DIR or FASTMLP_DATA=DIR")
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
    g.add_argument("--epochs", type=_positive_int, default=50, help="passes over the training data")
    g.add_argument("--lr", type=_positive_float, default=0.1, help="learning rate (fastmlp lr-find suggests one)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "nesterov", "adam", "adamw"],
                   help="sgd: plain minibatch SGD, the notebook's; momentum or nesterov (0.9); "
                        "adam (scikit-learn's) or adamw (PyTorch's, weight decay 0.01)")  # fmt: skip
    g.add_argument("--schedule", default="constant", choices=["constant", "linear", "step", "exp", "cosine", "plateau"],
                   help="learning-rate schedule: linear decays to a tenth, step divides by 10 every third of the "
                        "epochs, exp multiplies by 0.95 an epoch, cosine anneals to 0, plateau divides when the "
                        "validation loss stalls")  # fmt: skip
    g.add_argument("--l1", type=_nonneg_float, default=0.0, help="L1 penalty l1 * sum |W|")
    g.add_argument("--l2", type=_nonneg_float, default=0.0, help="L2 penalty 1/2 l2 * sum W^2 (weight decay)")
    g.add_argument("--dropout", type=_probability, default=0.0, help="drop probability of hidden units while training")
    g.add_argument("--input-dropout", type=_probability, default=0.0, help="drop probability of input features")
    g.add_argument("--patience", type=_positive_int, default=None,
                   help="early stopping: stop after this many epochs without a better validation loss and keep "
                        "the best epoch's weights; unset: no early stopping")  # fmt: skip
    g.add_argument("--out", default=None, metavar="model.npz", help="save the trained model here; unset: not saved")
    g.add_argument("--plot", default=None, metavar="trace.png",
                   help="save the loss/accuracy trace plot here (needs matplotlib); unset: no plot")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="print only the final lines")
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="learning-rate range test with a suggestion",
                        description="Sweep the learning rate exponentially, one minibatch a rate, and suggest half "
                                    "the rate where the loss turns up (the lecture's rule).")  # fmt: skip
    _add_network_options(lf)
    g = lf.add_argument_group("sweep")
    g.add_argument("--start", type=_positive_float, default=1e-5, help="first learning rate of the sweep")
    g.add_argument("--end", type=_positive_float, default=10.0, help="last learning rate of the sweep")
    g.add_argument("--num-iter", type=_positive_int, default=100, help="steps (rates) of the sweep")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "nesterov", "adam", "adamw"],
                   help="sweep with the optimizer the training will use")  # fmt: skip
    g.add_argument("--plot", default="lr_find.png", metavar="PNG", help="plot file (needs matplotlib)")
    g.add_argument("--no-plot", action="store_true", help="write no plot")
    g.add_argument("--quiet", action="store_true", help="print only the suggestion")
    lf.set_defaults(func=cmd_lr_find)

    pr = sub.add_parser("predict", help="predictions, accuracy and confusion matrix of a saved model",
                        description="Evaluate a saved model on a dataset's test split (accuracy, confusion matrix), "
                                    "or predict rows of your own (--input) and write labels and probabilities "
                                    "as CSV (--output).")  # fmt: skip
    pr.add_argument("--model", required=True, metavar="model.npz", help="a model saved by fastmlp train --out (required)")
    pr.add_argument("--data", default="mnist", metavar="mnist|digits|DIR",
                    help="the dataset whose test split is evaluated, when there is no --input")  # fmt: skip
    pr.add_argument("--input", default=None, metavar="rows.npy|rows.csv",
                    help="feature rows to predict instead of a test split (.npy, or .csv with an optional header)")
    pr.add_argument("--input-scale", default="auto", choices=["auto", "none", "pixels"],
                    help="pixels: scale 0..255 to [-1, 1] as fastmlp train does; auto: do so when the rows are "
                         "integers in 0..255; none: use the rows as they are")  # fmt: skip
    pr.add_argument("--output", default=None, metavar="predictions.csv",
                    help="write one CSV row per input row: label, then the class probabilities (with --mc-samples: "
                         "their means, standard deviations and the predictive entropy); '-' for stdout; "
                         "unset: stdout with --input, nothing otherwise")  # fmt: skip
    pr.add_argument("--mc-samples", type=_nonneg_int, default=0, help="Monte-Carlo dropout passes (0 = off)")
    pr.add_argument("--mc-dropout", type=_probability, default=None, metavar="RATE",
                    help="drop probability of hidden units for --mc-samples; unset: the rate the model was "
                         "trained with (a model trained without dropout needs it)")  # fmt: skip
    pr.add_argument("--backend", default="auto", help="kernel backend: auto, cython, numba or numpy")
    pr.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the Monte-Carlo dropout masks")
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="throughput of every backend against the classic NumPy loop",
                       description="Measure GEMM peak and training throughput per backend, dtype and configuration.")  # fmt: skip
    b.add_argument("--quick", action="store_true", help="small data, few rounds: under a minute")
    b.add_argument("--configs", default="abc", help="which configurations (letters from 'abc')")
    b.add_argument("--backends", default=None, help="comma-separated backends; unset: all available")
    b.add_argument("--rounds", type=_positive_int, default=None, help="timing rounds; unset: the benchmark's own")
    b.add_argument("--rows", type=_positive_int, default=None, help="training rows per configuration; unset: all")
    b.add_argument("--data", default=None, metavar="DIR", help="MNIST directory; unset: as load_mnist finds it")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON; unset: no file")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch row even if torch is installed")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    b.add_argument("--sections", default="all", metavar="LIST",
                   help="the tables after the training table: 'all' (default), 'none', or a comma-separated "
                        "list of avx2, optimizers, fit, predict, sklearn")  # fmt: skip
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="version, backends, threads, BLAS, CPU features, data paths",
                       description="Version, backends (and why one failed to load), threads, BLAS, CPU features "
                                   "and where data is looked for.")  # fmt: skip
    i.set_defaults(func=cmd_info)
    from fastmlp import onnx as _onnx

    ex = sub.add_parser("export", help="write a saved model as an ONNX file",
                        description="Export a network saved by fastmlp train --out (or Network.save) to ONNX; "
                                    "needs onnx (pip install 'fastmlp[onnx]'), and onnxruntime for the check.")  # fmt: skip
    _onnx.add_export_arguments(ex)
    ex.set_defaults(func=_onnx.export_command)
    for sp in (t, lf, pr, b, i, ex):
        sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _closed_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as command-line tools do, exit 0."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
    except (OSError, ValueError):
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmlp`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print("fastmlp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError, OSError,
            OverflowError, zlib.error) as exc:  # fmt: skip
        if getattr(args, "debug", False):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastmlp {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:
        if getattr(args, "debug", False):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else "out of memory"
        print(f"fastmlp {args.command}: error: not enough memory: {msg}; use smaller layers, --batch-size or "
              "less data", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except Exception as exc:  # a bug of ours: one line, and how to see the rest
        if getattr(args, "debug", False):
            raise
        print(f"fastmlp {args.command}: internal error: {type(exc).__name__}: {exc} (run again with --debug for "
              "the traceback, and report it)", file=sys.stderr)  # fmt: skip
        return 1
