"""scikit-learn estimators: :class:`FastMLPClassifier` and :class:`FastMLPRegressor`.

Both wrap a :class:`fastmlp.Network` and pass scikit-learn's
``check_estimator``; they work in ``Pipeline``, ``GridSearchCV``,
``cross_validate``, ``clone`` and pickle.  This is the only module of fastmlp
that imports scikit-learn.

Seeding
    With an integer ``random_state`` the classifier builds
    ``Network(layers, ..., seed=random_state)`` and trains it with
    ``Network.fit(..., seed=random_state)``, so it gives the same weights, bit
    for bit, as calling those two yourself with the same settings (and, with
    ``early_stopping=True``, the split
    ``train_test_split(X, y, test_size=validation_fraction,
    random_state=random_state, stratify=y)``).  ``None`` draws a seed from
    NumPy's global generator; a ``RandomState`` instance gives one draw.
    Continued training (``warm_start``, ``partial_fit``) derives its
    shuffling and dropout seeds from the network's seed and step counter.

Data types
    ``dtype=None`` (the default) trains in float32 when ``X`` is float32 and in
    float64 otherwise (integers, float16, lists, ...); ``'float32'`` or
    ``'float64'`` fixes it.  Prediction casts ``X`` to the fitted dtype and
    returns arrays of that dtype.

Threads
    ``n_threads=None`` leaves BLAS, OpenMP and Numba their default thread
    counts (all cores) when the estimator runs in the main process, and caps
    them at 1 while it runs inside a joblib worker (``GridSearchCV(n_jobs=k)``,
    ``cross_validate(n_jobs=k)``, ...), so that parallel jobs do not
    oversubscribe the cores.  An integer caps them at that many during
    ``fit``, ``partial_fit`` and prediction: the compiled backends' epoch
    threads, ``numba.set_num_threads``, and (from the main thread only:
    OpenBLAS ignores the call from other threads) BLAS/OpenMP through
    threadpoolctl.  ``n_threads_`` records the cap used by the last fit.
"""

from __future__ import annotations

import copy
import numbers
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import Tags, check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from fastmlp._regression import RegressionHistory, fit_regression
from fastmlp.backends import Backend, get_backend
from fastmlp.callbacks import Callback
from fastmlp.network import Network
from fastmlp.training import History

__all__ = ["FastMLPClassifier", "FastMLPRegressor"]

_FIT_DTYPES = {None: [np.float64, np.float32], "float32": np.float32, "float64": np.float64}


# ---------------------------------------------------------------------- helpers
class _Convergence(Callback):
    """scikit-learn's stopping rule for MLPs, as a fit callback.

    An epoch *improves* when the monitored value beats the best so far by more
    than ``tol``; training stops once more than ``n_iter_no_change`` epochs in
    a row did not improve.  With ``restore_best`` the weights of the best epoch
    are put back at the end (scikit-learn does so under early stopping).

    Parameters
    ----------
    key : str
        History attribute to watch (``'train_loss'``, ``'valid_acc'``, ``'valid_score'``).
    maximize : bool
        Whether larger is better.
    tol : float
    n_iter_no_change : int
    restore_best : bool
    """

    def __init__(self, key: str, *, maximize: bool, tol: float, n_iter_no_change: int, restore_best: bool) -> None:
        self.key = key
        self.maximize = maximize
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.restore_best = restore_best
        self.on_train_begin(None, None)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"_Convergence(key={self.key!r}, maximize={self.maximize}, tol={self.tol}, "
                f"n_iter_no_change={self.n_iter_no_change}, restore_best={self.restore_best})")  # fmt: skip

    def on_train_begin(self, net: Any, history: Any) -> None:
        self.best = -np.inf if self.maximize else np.inf
        self.best_epoch: int | None = None
        self.best_params: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.count = 0
        self.converged = False

    def on_epoch_end(self, net: Any, history: Any) -> bool:
        v = float(getattr(history, self.key)[-1])
        # written so that a NaN (e.g. R² of a one-sample validation set) counts as no improvement
        if self.maximize:
            stalled, better = not v >= self.best + self.tol, v > self.best
        else:
            stalled, better = not v <= self.best - self.tol, v < self.best
        self.count = self.count + 1 if stalled else 0
        if better:
            self.best, self.best_epoch = v, history.epoch[-1]
            if self.restore_best:
                self.best_params = net.get_params()
                history.best_epoch = self.best_epoch
        if self.count > self.n_iter_no_change:
            self.converged = True
            history.stopped_epoch = history.epoch[-1]
            return True
        return False

    def on_train_end(self, net: Any, history: Any) -> None:
        if self.restore_best and self.best_params is not None:
            net.set_params(*self.best_params)
            if hasattr(history, "restored_best"):
                history.restored_best = True


def _in_joblib_worker() -> bool:
    """True inside a task run by joblib's ``Parallel`` with more than one worker (its nesting level >= 1)."""
    try:
        from joblib.parallel import get_active_backend
    except ImportError:  # pragma: no cover - scikit-learn depends on joblib
        return False
    backend, _ = get_active_backend()
    return (getattr(backend, "nesting_level", 0) or 0) >= 1


#: modules whose ``NUM_THREADS`` global sets the threads of a compiled ``train_epoch`` (read at each call)
_EPOCH_THREAD_KNOBS = ("fastmlp.config", "fastmlp.backends.cython")


_limit_lock = threading.Lock()
_limit_depth = 0
_limit_stack: ExitStack | None = None


@contextmanager
def _limit_threads(n: int | None) -> Iterator[None]:
    """Cap BLAS/OpenMP (threadpoolctl), Numba and the compiled backends' epoch threads at ``n``; restore after.

    The compiled backends choose their own thread count per epoch from a
    module-level ``NUM_THREADS`` (``$FASTMLP_NUM_THREADS``), which is set here
    for the duration.  These settings (and BLAS's) are process-wide, so
    concurrent callers in one process (joblib's threading backend) share them:
    the first one in sets the cap, the last one out restores the previous
    values.  BLAS and OpenMP are capped only when the first caller is the main
    thread (loky workers run tasks there); Numba's own thread count is per
    thread and set per call.
    """
    global _limit_depth, _limit_stack
    if n is None:
        yield
        return
    with _limit_lock:
        if _limit_depth == 0:
            _limit_stack = _enter_process_limits(n)
        _limit_depth += 1
    numba = sys.modules.get("numba")  # only when already imported (the numba backend loaded it)
    old_numba = None
    try:
        if numba is not None:
            old_numba = numba.get_num_threads()
            numba.set_num_threads(max(1, min(n, int(numba.config.NUMBA_NUM_THREADS))))
        yield
    finally:
        if old_numba is not None:
            numba.set_num_threads(old_numba)
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0 and _limit_stack is not None:
                _limit_stack.close()
                _limit_stack = None


def _enter_process_limits(n: int) -> ExitStack:
    stack = ExitStack()
    if threading.current_thread() is threading.main_thread():
        # OpenBLAS (0.3.30, pthreads) ignores openblas_set_num_threads from other threads, at times only
        # the restore: a limit set or undone off the main thread could leave BLAS pinned for the process
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=n))
    for mod in map(sys.modules.get, _EPOCH_THREAD_KNOBS):
        if mod is not None and hasattr(mod, "NUM_THREADS"):
            stack.callback(setattr, mod, "NUM_THREADS", mod.NUM_THREADS)
            mod.NUM_THREADS = n
    return stack


def _check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def _check_integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------- base
class _BaseFastMLP(BaseEstimator):
    """Parameter checks, seeding, threads, pickling and the fit bookkeeping shared by both estimators."""

    _output: str
    _loss: str

    # ---------------------------------------------------------------- parameters
    def _hidden_sizes(self) -> list[int]:
        h = self.hidden_layer_sizes
        if isinstance(h, numbers.Integral) and not isinstance(h, bool):
            h = (h,)
        if isinstance(h, (str, bytes)) or not isinstance(h, Sequence | np.ndarray):
            raise TypeError(f"hidden_layer_sizes must be an int or a sequence of ints, got {h!r}")
        return [_check_integer(s, "hidden_layer_sizes", 1) for s in h]

    def _check_hyperparameters(self) -> None:
        self._hidden_sizes()
        if self.batch_size is not None:
            _check_integer(self.batch_size, "batch_size", 1)
        if not hasattr(self.learning_rate, "epoch_lrs"):
            _check_real(self.learning_rate, "learning_rate", low=0.0, low_open=True)
        _check_integer(self.max_iter, "max_iter", 1)
        _check_real(self.tol, "tol", low=0.0)
        for name in ("l1", "l2"):
            _check_real(getattr(self, name), name, low=0.0)
        for name in ("dropout", "input_dropout"):
            _check_real(getattr(self, name), name, low=0.0, high=1.0, high_open=True)
        if self.dropout_scaling not in ("inverted", "predict"):
            raise ValueError(f"dropout_scaling must be 'inverted' or 'predict', got {self.dropout_scaling!r}")
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise TypeError(f"early_stopping must be a bool, got {self.early_stopping!r}")
        _check_real(self.validation_fraction, "validation_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        _check_integer(self.n_iter_no_change, "n_iter_no_change", 1)
        self._dtype_name()
        if self.n_threads is not None:
            _check_integer(self.n_threads, "n_threads", 1)
        if self.on_divergence not in ("raise", "stop"):
            raise ValueError(f"on_divergence must be 'raise' or 'stop', got {self.on_divergence!r}")
        for cb in self.callbacks or []:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastmlp.callbacks.Callback instances, got {type(cb).__name__}")
        get_backend(self.backend)  # unknown or unavailable backends fail here, before any work

    def _threads(self) -> int | None:
        """The thread cap for this call: ``n_threads``, else 1 inside a joblib worker, else none."""
        if self.n_threads is not None:
            return int(self.n_threads)
        return 1 if _in_joblib_worker() else None

    def _new_seed(self) -> int:
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool):
            check_random_state(rs)  # sklearn's range check: [0, 2**32)
            return int(rs)
        return int(check_random_state(rs).randint(0, np.iinfo(np.int32).max))

    def _dtype_name(self) -> str | None:
        if self.dtype is None:
            return None
        try:
            name = np.dtype(self.dtype).name
        except TypeError:
            name = None
        if name not in ("float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        return name

    def _fit_dtype(self, reuse: bool) -> Any:
        return self.network_.dtype if reuse else _FIT_DTYPES[self._dtype_name()]

    def _copies(self) -> tuple[Any, list[Callback]]:
        """Fresh copies of the (possibly stateful) schedule and callbacks: fit never mutates its parameters."""
        lr = self.learning_rate
        lr = copy.deepcopy(lr) if hasattr(lr, "epoch_lrs") else float(lr)
        return lr, [copy.deepcopy(cb) for cb in (self.callbacks or [])]

    def _record(self, hist: History | RegressionHistory, n_train: int, valid_scores: list[float] | None,
                reuse: bool) -> None:  # fmt: skip
        if not reuse:
            self.loss_curve_: list[float] = []
            self.validation_scores_: list[float] | None = [] if valid_scores is not None else None
            self.n_iter_ = 0
            self.t_ = 0
        self.loss_curve_.extend(hist.train_loss)
        if valid_scores is not None:
            if self.validation_scores_ is None:
                self.validation_scores_ = []
            self.validation_scores_.extend(valid_scores)
        self.n_iter_ += len(hist.epoch)
        self.t_ += n_train * len(hist.epoch)
        self.best_loss_ = float(min(self.loss_curve_)) if self.loss_curve_ else np.inf
        self.best_validation_score_ = float(max(self.validation_scores_)) if self.validation_scores_ else None
        self.history_ = hist

    def _stopper(self, incremental: bool) -> _Convergence | None:
        if incremental:
            return None
        if self.early_stopping:
            key = "valid_acc" if isinstance(self, ClassifierMixin) else "valid_score"
            return _Convergence(key, maximize=True, tol=float(self.tol), n_iter_no_change=int(self.n_iter_no_change),
                                restore_best=True)  # fmt: skip
        return _Convergence("train_loss", maximize=False, tol=float(self.tol),
                            n_iter_no_change=int(self.n_iter_no_change), restore_best=False)  # fmt: skip

    def _warn_not_converged(self, stopper: _Convergence | None, hist: History | RegressionHistory) -> None:
        if (stopper is not None and not stopper.converged and not hist.diverged and not hist.interrupted
                and len(hist.epoch) == self.max_iter):  # fmt: skip
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _split(self, X: np.ndarray, y: np.ndarray, seed: int, stratify: bool) -> tuple[np.ndarray, ...]:
        """Hold out ``validation_fraction`` of the rows for early stopping (stratified for classifiers when possible)."""
        if X.shape[0] < 2:
            raise ValueError(f"early_stopping cannot hold out a validation set from {X.shape[0]} sample(s)")
        kw: dict[str, Any] = {"test_size": self.validation_fraction, "random_state": seed}
        if stratify:
            try:
                return tuple(train_test_split(X, y, stratify=y, **kw))
            except ValueError:
                pass  # a class too small to split: fall back to a plain random split
        return tuple(train_test_split(X, y, **kw))

    def _network(self, n_in: int, n_out: int, dtype: Any, seed: int) -> Network:
        return Network([n_in, *self._hidden_sizes(), n_out], activation=self.activation, output=self._output,
                       loss=self._loss, dtype=np.dtype(dtype).name, backend=self.backend, seed=seed)  # fmt: skip

    def _validate_predict_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=self.network_.dtype, order="C")

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # object.__getstate__ may return __dict__ itself
        net = state.get("network_")
        if isinstance(net, Network):
            # a Network holds its backend, which holds a kernel module (not picklable): store the name instead
            attrs = {k: (_BackendName(v.name) if isinstance(v, Backend) else v) for k, v in vars(net).items()}
            state["network_"] = _PickledNetwork(attrs)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        net = state.get("network_")
        if isinstance(net, _PickledNetwork):
            rebuilt = Network.__new__(Network)
            for k, v in net.attrs.items():
                if isinstance(v, _BackendName):
                    try:
                        v = get_backend(v.name)
                    except ImportError as exc:
                        warnings.warn(f"{exc}; the unpickled estimator uses backend 'auto' instead", RuntimeWarning,
                                      stacklevel=2)  # fmt: skip
                        v = get_backend("auto")
                setattr(rebuilt, k, v)
            state = {**state, "network_": rebuilt}
        super().__setstate__(state)


@dataclass(frozen=True)
class _BackendName:
    """A backend, pickled by name."""

    name: str


@dataclass(frozen=True)
class _PickledNetwork:
    """A Network's attributes, its backend replaced by a :class:`_BackendName`."""

    attrs: dict[str, Any]


_PARAMS_DOC = """
    hidden_layer_sizes : int or sequence of int, default=(50,)
        Units of each hidden layer; ``()`` gives no hidden layer.
    activation : {{'relu', 'sigmoid', 'tanh', 'identity'}}, default='relu'
        Hidden-layer activation.{extra}
    batch_size : int or None, default=100
        Minibatch size (capped at the number of samples); ``None``: full batch.
    learning_rate : float or schedule, default={lr}
        SGD step size, or a schedule object with ``epoch_lrs(epoch, n_steps)``
        (e.g. from :mod:`fastmlp.schedules`), deep-copied at each fit.
    max_iter : int, default=200
        Maximum number of epochs of one ``fit``.
    tol : float, default=1e-4
        Improvement needed to reset the patience counter (training loss, or the
        validation score under ``early_stopping``), as in scikit-learn's MLPs.
    l1, l2 : float, default=0.0
        Penalties ``l1·‖W‖₁`` and ``½·l2·‖W‖²`` on the weights (not the biases).
    dropout, input_dropout : float, default=0.0
        Drop probabilities of hidden units and of input features, in ``[0, 1)``.
    dropout_scaling : {{'inverted', 'predict'}}, default='inverted'
        As :func:`fastmlp.training.fit`.
    shuffle : bool, default=True
        Visit the samples in a new random order each epoch.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data{strat}, stop when
        its score ({score}) has not improved by ``tol`` for more than
        ``n_iter_no_change`` epochs, and keep the best epoch's weights.
        Without it, training stops on the training loss by the same rule.
    validation_fraction : float, default=0.1
        Share of the training data held out under ``early_stopping``, in (0, 1).
    n_iter_no_change : int, default=10
        Patience (epochs) of both stopping rules.
    warm_start : bool, default=False
        Continue from the fitted weights on the next ``fit`` instead of starting anew.
    dtype : {{None, 'float32', 'float64'}}, default=None
        Network dtype; ``None`` takes float32 when ``X`` is float32, else float64.
    backend : {{'auto', 'cython', 'numba', 'numpy'}}, default='auto'
        Kernel backend (see :func:`fastmlp.get_backend`).
    n_threads : int or None, default=None
        Thread cap for BLAS/OpenMP/Numba during fit and predict; ``None``: no
        cap in the main process, 1 inside a joblib worker (``n_jobs > 1``).
    callbacks : list of fastmlp.callbacks.Callback, optional
        Extra fit callbacks (deep-copied at each fit).
    on_divergence : {{'raise', 'stop'}}, default='raise'
        On a non-finite loss: raise ``FloatingPointError`` or warn and keep the
        last finite weights.
    random_state : int, RandomState instance or None, default=None
        Seed of the initial weights, the shuffling, the dropout masks and the
        validation split (see the module docstring for the exact use).
    verbose : bool, default=False
        Print one line per epoch."""

_ATTRS_DOC = """
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of str (n_features_in_,)
        Feature names, when ``X`` had string column names.
    network_ : fastmlp.Network
        The trained network.
    loss_curve_ : list of float
        Training loss (with penalty) of each epoch, over all fits since the last cold start.
    validation_scores_ : list of float or None
        Validation {score} of each epoch under ``early_stopping``, else ``None``.
    best_loss_ : float
        Smallest value of ``loss_curve_``.
    best_validation_score_ : float or None
        Largest value of ``validation_scores_``.
    n_iter_ : int
        Epochs run since the last cold start.
    t_ : int
        Training samples seen (``n_train * epochs``) since the last cold start.
    n_threads_ : int or None
        Thread cap used by the last fit.
    history_ : History or RegressionHistory
        The per-epoch record of the last fit."""


# ---------------------------------------------------------------------- classifier
class FastMLPClassifier(ClassifierMixin, _BaseFastMLP):
    __doc__ = (
        """Multilayer perceptron classifier trained by minibatch SGD on fastmlp's kernels.

    Parameters
    ----------"""
        + _PARAMS_DOC.format(
            extra="""
    output : {'softmax', 'sigmoid'}, default='softmax'
        Output activation (one unit per class; two for binary problems).
    loss : {'ce', 'mse'}, default='ce'
        Cross-entropy, or the classic notebook's squared error (with ``output='sigmoid'``).""",
            lr="0.1",
            strat=" (stratified when every class allows it)",
            score="accuracy",
        )
        + """

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
        Class labels (any sortable labels: strings, arbitrary integers ...),
        output unit ``k`` standing for ``classes_[k]``."""
        + _ATTRS_DOC.format(score="accuracy")
        + """

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = FastMLPClassifier(max_iter=20, random_state=0).fit(X / 16, y)
    >>> clf.score(X / 16, y) > 0.9
    True
    """
    )

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (50,),
        activation: str = "relu",
        output: str = "softmax",
        loss: str = "ce",
        batch_size: int | None = 100,
        learning_rate: Any = 0.1,
        max_iter: int = 200,
        tol: float = 1e-4,
        l1: float = 0.0,
        l2: float = 0.0,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        dropout_scaling: str = "inverted",
        shuffle: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        warm_start: bool = False,
        dtype: str | None = None,
        backend: str = "auto",
        n_threads: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        on_divergence: str = "raise",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.output = output
        self.loss = loss
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.tol = tol
        self.l1 = l1
        self.l2 = l2
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.dropout_scaling = dropout_scaling
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.warm_start = warm_start
        self.dtype = dtype
        self.backend = backend
        self.n_threads = n_threads
        self.callbacks = callbacks
        self.on_divergence = on_divergence
        self.random_state = random_state
        self.verbose = verbose

    @property
    def _output(self) -> str:  # type: ignore[override]
        return self.output

    @property
    def _loss(self) -> str:  # type: ignore[override]
        return self.loss

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        if not isinstance(self.output, str) or self.output not in ("softmax", "sigmoid"):
            raise ValueError(f"output must be 'softmax' or 'sigmoid' for a classifier, got {self.output!r}")
        if self.loss not in ("ce", "mse"):
            raise ValueError(f"loss must be 'ce' or 'mse', got {self.loss!r}")

    def fit(self, X: Any, y: Any) -> FastMLPClassifier:
        """Train on ``(X, y)`` for up to ``max_iter`` epochs.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array-like (n_samples,)
            Class labels (strings or any integers).

        Returns
        -------
        self
        """
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> FastMLPClassifier:
        """One epoch over ``(X, y)``, continuing from the current weights.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array-like (n_samples,)
        classes : array-like (n_classes,), optional
            All the labels that will ever appear; required on the first call.

        Returns
        -------
        self
        """
        if not hasattr(self, "network_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        return self._fit(X, y, incremental=True, classes=classes)

    def _fit(self, X: Any, y: Any, *, incremental: bool, classes: Any = None) -> FastMLPClassifier:
        self._check_hyperparameters()
        reuse = (incremental or self.warm_start) and hasattr(self, "network_")
        X, y = validate_data(self, X, y, reset=not reuse, dtype=self._fit_dtype(reuse), order="C")
        check_classification_targets(y)
        if reuse:
            known = self.classes_
        elif classes is not None:
            known = np.unique(np.asarray(classes))
        else:
            known = np.unique(y)
        pos = np.searchsorted(known, y)
        pos = np.minimum(pos, known.shape[0] - 1)
        if not np.array_equal(known[pos], y):
            unseen = np.setdiff1d(np.unique(y), known)
            raise ValueError(f"y contains labels not in classes_ {known.tolist()}: {unseen.tolist()}")
        y_enc = pos.astype(np.int64)
        if reuse:
            seed, fit_seed = self.network_.seed or 0, None
        else:
            self.classes_ = known
            seed = self._new_seed()
            fit_seed = seed
            self.network_ = self._network(X.shape[1], known.shape[0], X.dtype, seed)
        X_tr, y_tr, X_va, y_va = X, y_enc, None, None
        if self.early_stopping and not incremental:
            X_tr, X_va, y_tr, y_va = self._split(X, y_enc, seed, stratify=True)
        lr, cbs = self._copies()
        stopper = self._stopper(incremental)
        self.n_threads_ = self._threads()
        with _limit_threads(self.n_threads_):
            hist = self.network_.fit(
                X_tr, y_tr, epochs=1 if incremental else int(self.max_iter), batch_size=self.batch_size, lr=lr,
                X_valid=X_va, y_valid=y_va, shuffle=bool(self.shuffle), seed=fit_seed, verbose=bool(self.verbose),
                l2=float(self.l2), l1=float(self.l1), dropout=float(self.dropout),
                input_dropout=float(self.input_dropout), dropout_scaling=self.dropout_scaling,
                callbacks=[*cbs, *([stopper] if stopper else [])], on_divergence=self.on_divergence,
            )  # fmt: skip
        self.callbacks_ = cbs
        self._record(hist, X_tr.shape[0], hist.valid_acc if X_va is not None else None, reuse)
        self._warn_not_converged(stopper, hist)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Softmax outputs as they are; sigmoid outputs normalized to sum to one
        per row.

        Parameters
        ----------
        X : array-like (n_samples, n_features)

        Returns
        -------
        ndarray (n_samples, n_classes)
            Columns in the order of ``classes_``; the network's dtype.
        """
        X = self._validate_predict_X(X)
        with _limit_threads(self._threads()):
            P = self.network_.predict_proba(X)
        if self.network_.output != "softmax":
            P = P / np.maximum(P.sum(axis=1, keepdims=True), np.finfo(P.dtype).tiny)
        return P

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba` ``(n_samples, n_classes)``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels ``(n_samples,)``, drawn from ``classes_``.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        """
        X = self._validate_predict_X(X)
        with _limit_threads(self._threads()):
            P = self.network_.predict_proba(X)
        return self.classes_[np.argmax(P, axis=1)]


# ---------------------------------------------------------------------- regressor
class FastMLPRegressor(RegressorMixin, _BaseFastMLP):
    __doc__ = (
        """Multilayer perceptron regressor trained by minibatch SGD on fastmlp's kernels.

    The output layer is the identity and the loss the squared error summed over
    the outputs, ``(1/n) Σ_i ‖f(x_i) − y_i‖²`` (its gradient ``2(A − Y)/n`` is
    the library's MSE scaling); training composes the backend's ``forward``,
    ``hidden_delta`` and ``inplace_update`` kernels
    (:func:`fastmlp._regression.fit_regression`).  SGD on unscaled targets
    diverges easily: standardize ``y`` (e.g. with
    ``TransformedTargetRegressor``) and ``X`` (``StandardScaler``).

    Parameters
    ----------"""
        + _PARAMS_DOC.format(
            extra="""
    standardize_y : bool, default=True
        Train on ``(y − y_mean_) / y_scale_`` (per output; the scale of a
        constant target is 1) and map predictions back, so that one learning
        rate suits targets of any scale.  ``loss_curve_``, ``l1`` and ``l2``
        then refer to the standardized problem.  ``False`` trains on ``y`` as
        given.""",
            lr="0.01",
            strat="",
            score="R²",
        )
        + """

    Attributes
    ----------
    n_outputs_ : int
        Number of targets.
    y_mean_, y_scale_ : ndarray (n_outputs_,)
        Target standardization (zeros and ones with ``standardize_y=False``);
        computed by the first (cold) fit, or the first ``partial_fit`` batch."""
        + _ATTRS_DOC.format(score="R²")
        + """

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3))
    >>> y = X @ [1.0, -2.0, 0.5]
    >>> reg = FastMLPRegressor(hidden_layer_sizes=(), random_state=0).fit(X, y)
    >>> reg.score(X, y) > 0.99
    True
    """
    )

    _output = "identity"
    _loss = "mse"

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (50,),
        activation: str = "relu",
        standardize_y: bool = True,
        batch_size: int | None = 100,
        learning_rate: Any = 0.01,
        max_iter: int = 200,
        tol: float = 1e-4,
        l1: float = 0.0,
        l2: float = 0.0,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        dropout_scaling: str = "inverted",
        shuffle: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        warm_start: bool = False,
        dtype: str | None = None,
        backend: str = "auto",
        n_threads: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        on_divergence: str = "raise",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.standardize_y = standardize_y
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.tol = tol
        self.l1 = l1
        self.l2 = l2
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.dropout_scaling = dropout_scaling
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.warm_start = warm_start
        self.dtype = dtype
        self.backend = backend
        self.n_threads = n_threads
        self.callbacks = callbacks
        self.on_divergence = on_divergence
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> FastMLPRegressor:
        """Train on ``(X, y)`` for up to ``max_iter`` epochs.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array-like (n_samples,) or (n_samples, n_outputs)
            Real targets.

        Returns
        -------
        self
        """
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X: Any, y: Any) -> FastMLPRegressor:
        """One epoch over ``(X, y)``, continuing from the current weights.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array-like (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self
        """
        return self._fit(X, y, incremental=True)

    def _fit(self, X: Any, y: Any, *, incremental: bool) -> FastMLPRegressor:
        self._check_hyperparameters()
        reuse = (incremental or self.warm_start) and hasattr(self, "network_")
        X, y = validate_data(self, X, y, reset=not reuse, dtype=self._fit_dtype(reuse), order="C",
                             multi_output=True, y_numeric=True)  # fmt: skip
        Y = np.asarray(y, dtype=X.dtype)
        ndim = Y.ndim
        Y = Y.reshape(Y.shape[0], -1)
        if reuse:
            if Y.shape[1] != self.n_outputs_:
                raise ValueError(f"y has {Y.shape[1]} outputs but the fitted regressor has {self.n_outputs_}")
            seed, fit_seed = self.network_.seed or 0, None
        else:
            seed = self._new_seed()
            fit_seed = seed
            self.n_outputs_ = Y.shape[1]
            self._y_ndim = ndim
            if self.standardize_y:
                std = Y.std(axis=0, dtype=np.float64)
                self.y_mean_ = Y.mean(axis=0, dtype=np.float64).astype(X.dtype)
                self.y_scale_ = np.where(std > 0, std, 1.0).astype(X.dtype)  # a constant target keeps scale 1
            else:
                self.y_mean_ = np.zeros(Y.shape[1], dtype=X.dtype)
                self.y_scale_ = np.ones(Y.shape[1], dtype=X.dtype)
            self.network_ = self._network(X.shape[1], Y.shape[1], X.dtype, seed)
        Y = (Y - self.y_mean_) / self.y_scale_
        X_tr, Y_tr, X_va, Y_va = X, Y, None, None
        if self.early_stopping and not incremental:
            X_tr, X_va, Y_tr, Y_va = self._split(X, Y, seed, stratify=False)
        lr, cbs = self._copies()
        stopper = self._stopper(incremental)
        self.n_threads_ = self._threads()
        with _limit_threads(self.n_threads_):
            hist = fit_regression(
                self.network_, X_tr, Y_tr, epochs=1 if incremental else int(self.max_iter),
                batch_size=self.batch_size, lr=lr, X_valid=X_va, Y_valid=Y_va, score=_r2,
                shuffle=bool(self.shuffle), seed=fit_seed, verbose=bool(self.verbose), l2=float(self.l2),
                l1=float(self.l1), dropout=float(self.dropout), input_dropout=float(self.input_dropout),
                dropout_scaling=self.dropout_scaling, callbacks=[*cbs, *([stopper] if stopper else [])],
                on_divergence=self.on_divergence,
            )  # fmt: skip
        self.callbacks_ = cbs
        self._record(hist, X_tr.shape[0], hist.valid_score if X_va is not None else None, reuse)
        self._warn_not_converged(stopper, hist)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets.

        Parameters
        ----------
        X : array-like (n_samples, n_features)

        Returns
        -------
        ndarray (n_samples,) or (n_samples, n_outputs)
            The shape of the ``y`` given to ``fit``; the network's dtype.
        """
        X = self._validate_predict_X(X)
        with _limit_threads(self._threads()):
            P = self.network_.predict_proba(X)
        P = P * self.y_scale_ + self.y_mean_
        return P.ravel() if self._y_ndim == 1 else P


def _r2(Y: np.ndarray, P: np.ndarray) -> float:
    """R² of the validation predictions; NaN (no improvement) when it is undefined (one sample)."""
    if Y.shape[0] < 2:
        return float("nan")
    return float(r2_score(Y, P))
