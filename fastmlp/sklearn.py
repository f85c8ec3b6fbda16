"""scikit-learn's ``MLPClassifier`` and ``MLPRegressor``, one changed import away, on fastmlp's kernels.

::

    from fastmlp.sklearn import MLPClassifier, MLPRegressor   # instead of sklearn.neural_network

The constructors are scikit-learn's exactly -- every parameter, name, default
and meaning (``solver`` sgd/adam/lbfgs, ``alpha``, ``batch_size='auto'``,
``learning_rate`` constant/invscaling/adaptive, ``momentum``,
``nesterovs_momentum``, ``early_stopping``, ``n_iter_no_change``, ``tol``,
``max_fun``, ``warm_start``, ...) -- and so are the fitted attributes
(``coefs_`` in its ``(fan_in, fan_out)`` layout, ``intercepts_``, ``loss_``,
``loss_curve_``, ``validation_scores_``, ``n_iter_``, ``t_``, ...), the
methods (``fit(X, y, sample_weight=None)``, ``partial_fit``, ``predict``,
``predict_proba``, ``predict_log_proba``, ``score``) and the targets (binary,
multiclass, multi-label; single- and multi-output regression).  With the same
``random_state``, in float64, the weights, the loss curve, ``n_iter_`` and the
predictions agree with scikit-learn's own estimators: the initialisation, the
validation split and the shuffles are drawn from the same ``RandomState`` in
the same order, and every epoch runs the same arithmetic in fastmlp's compiled
epoch (:func:`fastmlp.training.fit` with scikit-learn's ``alpha`` penalty,
optimizers and stopping rule).

fastmlp's own options are further keyword arguments: ``dropout``,
``input_dropout``, ``l1``, ``dtype`` (None: float32 input trains in float32,
anything else in float64, as scikit-learn), ``backend``, ``n_threads`` (a cap
of the threads of fit and predict; None: 1 inside a joblib or Dask worker, else no
cap) and ``callbacks``.  ``solver='lbfgs'`` minimises the full-batch loss with
``scipy.optimize.minimize(method='L-BFGS-B')`` on fastmlp's compiled loss and
gradient.  Sparse input is accepted and densified.

This is the only module of fastmlp that imports scikit-learn.
"""

from __future__ import annotations

import numbers
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.optimize
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, shuffle
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.optimize import _check_optimize_result
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d, validate_data

from fastmlp import _threads
from fastmlp.backends.contract import OptimizerState, plan_epoch
from fastmlp.callbacks import Callback, EarlyStopping
from fastmlp.network import Network, init_params
from fastmlp.optimizers import SGD, Adam

__all__ = ["MLPClassifier", "MLPRegressor"]

_STOCHASTIC_SOLVERS = ("sgd", "adam")
#: scikit-learn's activation names -> fastmlp's
_ACT = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
#: predictions on at most this many rows skip the thread cap (one thread runs them anyway)
_FEW_ROWS = 8
#: an n_iter_no_change of inf never stops
_NEVER = 2**62


def _in_joblib_worker() -> bool:
    """True inside a task run by joblib's ``Parallel`` with more than one worker (its nesting level >= 1)."""
    try:
        from joblib.parallel import get_active_backend
    except ImportError:  # pragma: no cover - scikit-learn depends on joblib
        return False
    backend, _ = get_active_backend()
    return (getattr(backend, "nesting_level", 0) or 0) >= 1


def _lbfgs_iprint(iprint: int) -> dict[str, int]:
    """L-BFGS-B's ``iprint`` option where SciPy still takes it (< 1.15), as scikit-learn >= 1.8 passes it
    (``sklearn.utils.fixes._get_additional_lbfgs_options_dict``, which older scikit-learn lacks)."""
    try:
        from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
    except ImportError:
        major, minor = (int(re.match(r"\d+", p).group()) for p in scipy.__version__.split(".")[:2])
        return {} if (major, minor) >= (1, 15) else {"iprint": iprint}
    return _get_additional_lbfgs_options_dict("iprint", iprint)


def _in_dask_worker() -> bool:
    """True inside a task of a ``dask.distributed`` worker (joblib's dask backend, ``client.submit``, dask-ml):
    there joblib's nesting level says nothing, the worker's own threads share its cores."""
    distributed = sys.modules.get("distributed")  # never imported here: if it is not loaded, this is no worker
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except (ValueError, AttributeError):  # "No worker found"
        return False
    return True


class _SolverRate:
    """The SGD/Adam solver's learning rate as scikit-learn's optimizers change it.

    ``constant``: ``learning_rate_init``; ``invscaling``: after each epoch
    ``learning_rate_init / (t_ + 1) ** power_t`` with ``t_`` the samples seen;
    ``adaptive``: divided by 5 when the stopping rule runs out of patience
    (:meth:`on_plateau`), until it is at most 1e-6.  Lives as long as
    scikit-learn's ``_optimizer`` (a new one at each ``fit``, kept by ``partial_fit``).
    """

    def __init__(self, init: float, schedule: str, power_t: float) -> None:
        self.init, self.schedule, self.power_t = float(init), schedule, float(power_t)
        self.lr = float(init)
        #: samples seen (the estimator's ``t_``) and rows of an epoch, set before each fit
        self.t = 0
        self.n_samples = 0

    def __repr__(self) -> str:
        return f"_SolverRate({self.schedule!r}, lr={self.lr:g})"

    def epoch_lrs(self, epoch: int, n_steps: int) -> np.ndarray:
        return np.full(n_steps, self.lr)

    def step_epoch(self, history: Any) -> None:
        """scikit-learn's ``iteration_ends(t_)``, after the epoch's stopping check."""
        self.t += self.n_samples
        if self.schedule == "invscaling":
            self.lr = self.init / (self.t + 1) ** self.power_t

    def on_plateau(self) -> bool:
        """scikit-learn's ``trigger_stopping``: True to go on (the rate was divided by 5)."""
        if self.schedule != "adaptive" or self.lr <= 1e-6:
            return False
        self.lr /= 5.0
        return True


class _Verbose(Callback):
    """scikit-learn's verbose lines."""

    def __init__(self, early: bool) -> None:
        self.early = early
        self.done = 0

    def on_epoch_end(self, net: Any, history: Any) -> bool:
        self.done += 1
        print(f"Iteration {self.done}, loss = {history.train_loss[-1]:.8f}")
        if self.early:
            print(f"Validation score: {history.valid_score[-1]:f}")
        return False


class _BaseMLP(BaseEstimator):
    """What scikit-learn's ``BaseMultilayerPerceptron`` does, on a :class:`fastmlp.Network`."""

    _parameter_constraints: ClassVar[dict] = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions({"identity", "logistic", "tanh", "relu"})],
        "solver": [StrOptions({"lbfgs", "sgd", "adam"})],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "power_t": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(numbers.Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left"), Options(numbers.Real, {np.inf})],
        "max_fun": [Interval(numbers.Integral, 1, None, closed="left")],
        # fastmlp's own
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "input_dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "l1": [Interval(numbers.Real, 0, None, closed="left")],
        "dtype": [None, StrOptions({"float32", "float64"}), type, np.dtype],
        "backend": [StrOptions({"auto", "cython", "numba", "numpy"})],
        "n_threads": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "callbacks": [None, list, tuple],
    }

    # ---------------------------------------------------------------- fitted attributes (views of the network)
    @property
    def coefs_(self) -> list[np.ndarray]:
        """Weight matrices ``(fan_in, fan_out)`` of each layer (views of the network's ``W.T``)."""
        if "network_" not in self.__dict__:
            raise AttributeError("coefs_")
        return [W.T for W in self.network_.weights]

    @coefs_.setter
    def coefs_(self, value: Sequence[np.ndarray]) -> None:
        check_is_fitted(self)
        self.network_.set_params([np.asarray(c).T for c in value], self.network_.biases)

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Bias vectors ``(fan_out,)`` of each layer (the network's arrays)."""
        if "network_" not in self.__dict__:
            raise AttributeError("intercepts_")
        return list(self.network_.biases)

    @intercepts_.setter
    def intercepts_(self, value: Sequence[np.ndarray]) -> None:
        check_is_fitted(self)
        self.network_.set_params(self.network_.weights, list(value))

    # ---------------------------------------------------------------- helpers
    def _threads(self) -> int | None:
        """The thread cap for this call: ``n_threads``, else 1 inside a joblib or Dask worker, else none."""
        if self.n_threads is not None:
            return int(self.n_threads)
        return 1 if _in_joblib_worker() or _in_dask_worker() else None

    def _dtype(self, X_dtype: np.dtype) -> np.dtype:
        if self.dtype is None:
            return np.dtype(np.float32) if X_dtype == np.float32 else np.dtype(np.float64)
        name = np.dtype(self.dtype).name
        if name not in ("float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        return np.dtype(name)

    def _hidden(self) -> list[int]:
        h = self.hidden_layer_sizes
        if not hasattr(h, "__iter__"):
            h = [h]
        h = list(h)
        if np.any(np.array(h) <= 0):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {h}.")
        return [int(v) for v in h]

    def _output(self, y: np.ndarray) -> tuple[str, str, str]:
        """``(out_activation_, fastmlp output, fastmlp loss)`` for the binarized/2-D targets ``y``."""
        if not is_classifier(self):
            return ("exp", "exp", "poisson") if self.loss == "poisson" else ("identity", "identity", "squared_error")
        if self._label_binarizer.y_type_ == "multiclass":
            return "softmax", "softmax", "ce"
        return "logistic", "sigmoid", "ce"

    def _initialize(self, y: np.ndarray, layer_units: list[int], dtype: np.dtype) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_, output, loss = self._output(y)
        weights, biases = init_params(layer_units, "glorot", _ACT[self.activation], self._random_state, dtype)
        net = Network(layer_units, activation=_ACT[self.activation], output=output, loss=loss, dtype=dtype,
                      backend=self.backend, init="glorot", seed=0)  # fmt: skip
        net.weights, net.biases = weights, biases
        self.network_ = net
        for name in ("_rate", "_stopper"):
            self.__dict__.pop(name, None)
        if self.solver in _STOCHASTIC_SOLVERS:
            self.loss_curve_: list[float] = []
            if self.early_stopping:
                self.validation_scores_: list[float] | None = []
                self.best_validation_score_: float | None = -np.inf
                self.best_loss_: float | None = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """The network's targets of the 2-D (binarized) ``y``: labels for binary/multiclass, else dense."""
        if is_classifier(self) and self._label_binarizer.y_type_ != "multilabel-indicator":
            return y[:, 0].astype(np.int64) if y.shape[1] == 1 else np.argmax(y, axis=1)
        return y.astype(self.network_.dtype)

    # ---------------------------------------------------------------- fit
    def _fit(self, X: Any, y: Any, sample_weight: Any = None, incremental: bool = False) -> _BaseMLP:
        hidden = self._hidden()
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        if hasattr(X, "toarray"):  # sparse input: the kernels take dense rows
            X = X.toarray()
        dtype = self.network_.dtype if not first_pass else self._dtype(X.dtype)
        X = np.ascontiguousarray(X, dtype=dtype)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        self.n_outputs_ = y.shape[1]
        layer_units = [X.shape[1], *hidden, self.n_outputs_]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, layer_units, dtype)
        elif [self.network_.n_features, *self.network_.layers[1:]] != layer_units:
            raise ValueError(f"the fitted network has layers {self.network_.layers} but this data and "
                             f"hidden_layer_sizes give {layer_units}; fit with warm_start=False to start afresh")  # fmt: skip
        with _threads.thread_limit(self._threads()):
            if self.solver in _STOCHASTIC_SOLVERS:
                self._fit_stochastic(X, y, sample_weight, incremental)
            else:
                self._fit_lbfgs(X, y, sample_weight)
        if not all(np.isfinite(w).all() for w in (*self.network_.weights, *self.network_.biases)):
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             "and need to be preprocessed.")  # fmt: skip
        return self

    def _fit_stochastic(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None, incremental: bool) -> None:
        net = self.network_
        new_optimizer = not incremental or "_rate" not in self.__dict__
        if new_optimizer:
            net.optimizer_state_ = None  # scikit-learn creates a new optimizer: zero velocities/moments, t = 0
            self._rate = _SolverRate(self.learning_rate_init, self.learning_rate if self.solver == "sgd" else "constant",
                                     self.power_t)  # fmt: skip
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early = self.early_stopping
        sw_train = sw_val = X_val = y_val = None
        if early:
            stratify = y if is_classifier(self) and self.n_outputs_ == 1 else None
            if sample_weight is None:
                X_train, X_val, y_train, y_val = train_test_split(
                    X, y, random_state=self._random_state, test_size=self.validation_fraction, stratify=stratify)
            else:
                X_train, X_val, y_train, y_val, sw_train, sw_val = train_test_split(
                    X, y, sample_weight, random_state=self._random_state, test_size=self.validation_fraction,
                    stratify=stratify)  # fmt: skip
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                                 "your dataset.")  # fmt: skip
        else:
            X_train, y_train, sw_train = X, y, sample_weight
        n_samples = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                              stacklevel=3)  # fmt: skip
            batch_size = int(np.clip(self.batch_size, 1, n_samples))
        sample_idx = np.arange(n_samples, dtype=int)
        rs = self._random_state

        def orders(epoch: int) -> np.ndarray:  # scikit-learn reshuffles the previous order each epoch
            nonlocal sample_idx
            if self.shuffle:
                sample_idx = shuffle(sample_idx, random_state=rs)
            return sample_idx

        stopper = self.__dict__.get("_stopper")
        if stopper is None:  # a cold start: scikit-learn's count and best value start afresh
            patience = _NEVER if self.n_iter_no_change == np.inf else int(self.n_iter_no_change)
            stopper = EarlyStopping(patience=patience, min_delta=float(self.tol),
                                    monitor="valid_score" if early else "train_loss", restore_best=early,
                                    convention="sklearn", on_plateau=self._on_plateau, keep_state=True)  # fmt: skip
            self._stopper = stopper
        rate = self._rate
        rate.t, rate.n_samples = self.t_, n_samples
        opt = SGD(momentum=float(self.momentum), nesterov=bool(self.nesterovs_momentum)) if self.solver == "sgd" \
            else Adam(beta1=float(self.beta_1), beta2=float(self.beta_2), eps=float(self.epsilon))  # fmt: skip
        cbs: list[Callback] = [_Verbose(early)] if self.verbose else []
        cbs += [*(self.callbacks or []), stopper]
        Y_train = self._targets(y_train)
        Y_val = None if y_val is None else self._targets(y_val)
        self.n_iter_ = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the batch-size clip was warned about above
                hist = net.fit(
                    X_train, Y_train, epochs=1 if incremental else int(self.max_iter), batch_size=batch_size,
                    lr=rate, optimizer=opt, X_valid=X_val, y_valid=Y_val, sample_weight=sw_train,
                    valid_sample_weight=sw_val, shuffle=orders, verbose=False, alpha=float(self.alpha),
                    l1=float(self.l1), dropout=float(self.dropout), input_dropout=float(self.input_dropout),
                    callbacks=cbs, on_divergence="raise", warn=False,
                )  # fmt: skip
        except FloatingPointError:
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             "and need to be preprocessed.") from None  # fmt: skip
        self.n_iter_ = len(hist.epoch)
        self.t_ += n_samples * len(hist.epoch)
        if hist.train_loss:
            self.loss_ = float(hist.train_loss[-1])
        self.loss_curve_.extend(hist.train_loss)
        if early:
            self.validation_scores_.extend(hist.valid_score or [])  # type: ignore[union-attr]
            self.best_validation_score_ = float(stopper.rule.best)
        else:
            self.best_loss_ = float(stopper.rule.best)
        self.history_ = hist
        if hist.interrupted:
            warnings.warn("Training interrupted by user.", stacklevel=3)
        elif not incremental and hist.stopped_epoch is None and self.n_iter_ == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization "
                          "hasn't converged yet.", ConvergenceWarning, stacklevel=3)  # fmt: skip

    def _fit_lbfgs(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None) -> None:
        net = self.network_
        Y = self._targets(y)
        n = X.shape[0]
        plan = plan_epoch(net.layers, net.dtype, batch_size=n, hidden=net.activation, output=net.output, loss=net.loss,
                          target="labels" if Y.ndim == 1 else "dense", alpha=float(self.alpha), optimizer="gradient")  # fmt: skip
        epochs = net.backend.prepare(X, Y, plan, sample_weight=sample_weight)
        grads = OptimizerState.zeros("gradient", net.layers, net.dtype)
        order = np.arange(n, dtype=np.int64)
        shapes = [(W.shape, b.shape) for W, b in zip(net.weights, net.biases, strict=True)]

        def unpack(theta: np.ndarray) -> None:
            off = 0
            Ws, bs = [], []
            for (o, i), _ in shapes:  # scikit-learn's order: every coef (fan_in, fan_out), then every intercept
                Ws.append(theta[off : off + i * o].reshape(i, o).T)
                off += i * o
            for _, (o,) in shapes:
                bs.append(theta[off : off + o])
                off += o
            for W, Wn in zip(net.weights, Ws, strict=True):
                W[...] = Wn
            for b, bn in zip(net.biases, bs, strict=True):
                b[...] = bn

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            unpack(theta)
            if not all(np.isfinite(a).all() for a in (*net.weights, *net.biases)):
                return np.inf, np.zeros_like(theta)
            with np.errstate(over="ignore", invalid="ignore"):
                stats = epochs(order, (net.weights, net.biases), grads, 1.0)
            loss = (stats.loss_sum + stats.penalty_sum) / n
            g = np.concatenate([gW.T.ravel() for gW in grads.weights[0]] + [gb for gb in grads.biases[0]])
            return loss, g

        theta0 = np.concatenate([W.T.ravel() for W in net.weights] + [b for b in net.biases])
        iprint = 1 if self.verbose is True or self.verbose >= 1 else -1
        options = {"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol}
        options.update(_lbfgs_iprint(iprint))
        res = scipy.optimize.minimize(loss_grad, theta0, method="L-BFGS-B", jac=True, options=options)
        self.n_iter_ = _check_optimize_result("lbfgs", res, self.max_iter)
        self.loss_ = float(res.fun)
        unpack(np.asarray(res.x, dtype=net.dtype))

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> _BaseMLP:
        """Fit the model to data matrix X and target(s) y.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            The target values (class labels in classification, real numbers in regression).
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights: each minibatch's output deltas are multiplied by them and the
            gradient is normalised by their sum.

        Returns
        -------
        self : object
            Returns a trained MLP model.
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _on_plateau(self) -> bool:
        """The stopping rule ran out of patience: ``learning_rate='adaptive'`` divides the rate and goes on."""
        return self._rate.on_plateau()

    def _check_solver(self) -> bool:
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. {self.solver} is not "
                                 "stochastic.")  # fmt: skip
        return True

    def _predict_X(self, X: Any) -> np.ndarray:
        if "network_" not in self.__dict__:  # scikit-learn's check (a scan of every attribute) only when unfitted
            check_is_fitted(self)
        net = self.network_
        # the fast road for the common case (a plain array of the network's dtype, fitted without feature names);
        # everything else goes through scikit-learn's checks
        if not (type(X) is np.ndarray and X.ndim == 2 and X.dtype == net.dtype and X.shape[1] == self.n_features_in_
                and "feature_names_in_" not in self.__dict__):  # fmt: skip
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
            if hasattr(X, "toarray"):
                X = X.toarray()
        return X

    def _forward(self, X: Any) -> np.ndarray:
        X = self._predict_X(X)
        if X.shape[0] <= _FEW_ROWS and self.n_threads is None:
            # a few rows run on one thread whatever the cap (fastmlp splits from 512 rows, a BLAS product this
            # small stays on one thread): the cap's bookkeeping would cost more than the prediction
            return self.network_.predict_proba(X)
        with _threads.thread_limit(self._threads()):
            return self.network_.predict_proba(X)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    #: the loss (not a parameter): log-loss, binary per unit for binary and multi-label targets
    loss = "log_loss"

    __doc__ = """Multi-layer perceptron classifier: scikit-learn's ``MLPClassifier`` on fastmlp's compiled kernels.

    Parameters are scikit-learn's (see ``sklearn.neural_network.MLPClassifier``),
    with the same defaults and meaning, plus fastmlp's own options.

    Parameters
    ----------
    hidden_layer_sizes : array-like of shape (n_layers - 2,), default=(100,)
        The ith element represents the number of neurons in the ith hidden layer.
    activation : {'identity', 'logistic', 'tanh', 'relu'}, default='relu'
        Activation function for the hidden layers.
    solver : {'lbfgs', 'sgd', 'adam'}, default='adam'
        The solver for weight optimization.
    alpha : float, default=0.0001
        Strength of the L2 regularization term, divided by the sample size when added to the loss.
    batch_size : int, default='auto'
        Size of minibatches for stochastic optimizers; 'auto' is ``min(200, n_samples)``.
    learning_rate : {'constant', 'invscaling', 'adaptive'}, default='constant'
        Learning rate schedule for weight updates (sgd only).
    learning_rate_init : float, default=0.001
        The initial learning rate (sgd and adam).
    power_t : float, default=0.5
        The exponent for inverse scaling learning rate (sgd with 'invscaling').
    max_iter : int, default=200
        Maximum number of epochs (stochastic solvers) or iterations (lbfgs).
    shuffle : bool, default=True
        Whether to shuffle samples in each iteration (stochastic solvers).
    random_state : int, RandomState instance, default=None
        The initialisation, the early-stopping split and the shuffles.
    tol : float, default=1e-4
        Tolerance for the optimization.
    verbose : bool, default=False
        Print progress messages to stdout.
    warm_start : bool, default=False
        Reuse the solution of the previous call to fit as initialization.
    momentum : float, default=0.9
        Momentum for gradient descent update (sgd).
    nesterovs_momentum : bool, default=True
        Whether to use Nesterov's momentum (sgd, momentum > 0).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data and stop when its score stops improving.
    validation_fraction : float, default=0.1
        Share of the training data held out for early stopping.
    beta_1, beta_2 : float, default=0.9, 0.999
        Exponential decay rates of Adam's moment estimates.
    epsilon : float, default=1e-8
        Adam's numerical-stability term.
    n_iter_no_change : int, default=10
        Maximum number of epochs not meeting ``tol`` improvement.
    max_fun : int, default=15000
        Maximum number of loss function calls (lbfgs).
    dropout, input_dropout : float, default=0.0
        fastmlp: inverted dropout of hidden units and of input features while training.
    l1 : float, default=0.0
        fastmlp: L1 penalty ``l1·‖W‖₁`` as a step ``lr·l1·sign(W)``.
    dtype : {None, 'float32', 'float64'}, default=None
        fastmlp: the network's dtype; None keeps float32 input in float32, else float64.
    backend : {'auto', 'cython', 'numba', 'numpy'}, default='auto'
        fastmlp: the kernel backend.
    n_threads : int or None, default=None
        fastmlp: cap of the threads of fit and predict (None: 1 inside a joblib or Dask worker, else no cap).
    callbacks : list of fastmlp.callbacks.Callback, default=None
        fastmlp: extra fit callbacks.

    Attributes
    ----------
    classes_ : ndarray or list of ndarray of shape (n_classes,)
    loss_ : float
    best_loss_ : float or None
    loss_curve_ : list of shape (n_iter_,)
    validation_scores_ : list of shape (n_iter_,) or None
    best_validation_score_ : float or None
    t_ : int
    coefs_ : list of shape (n_layers - 1,)
        ``coefs_[i]`` is ``(fan_in, fan_out)``: views of the network's weights.
    intercepts_ : list of shape (n_layers - 1,)
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
    n_iter_ : int
        Epochs run by the last call (1 after a ``partial_fit``), or lbfgs iterations.
    n_layers_ : int
    n_outputs_ : int
    out_activation_ : str
    network_ : fastmlp.Network
        The trained network.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = MLPClassifier(max_iter=30, random_state=0).fit(X / 16, y)
    >>> clf.score(X / 16, y) > 0.9
    True
    """

    def __init__(
        self,
        hidden_layer_sizes: Any = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: Any = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: Any = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: Any = 10,
        max_fun: int = 15000,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        l1: float = 0.0,
        dtype: Any = None,
        backend: str = "auto",
        n_threads: int | None = None,
        callbacks: Any = None,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.l1 = l1
        self.dtype = dtype
        self.backend = backend
        self.n_threads = n_threads
        self.callbacks = callbacks

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[Any, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)  # fmt: skip
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        # Matrix of actions to be taken under the possible combinations (scikit-learn's):
        # The case where incremental == True and classes_ not defined is already checked by _check_partial_fit_first_call
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the previous call to fit."
                        f" Previously got {self.classes_}, `y` has {classes}"
                    )
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")  # fmt: skip
        y = self._label_binarizer.transform(y).astype(bool)
        return X, y

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPClassifier:
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)  # type: ignore[return-value]

    fit.__doc__ = _BaseMLP.fit.__doc__

    def predict(self, X: Any) -> np.ndarray:
        """Predict using the multi-layer perceptron classifier.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray, shape (n_samples,) or (n_samples, n_classes)
            The predicted classes.
        """
        y_pred = self._forward(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None, classes: Any = None) -> MLPClassifier:
        """Update the model with a single iteration over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None
        classes : array of shape (n_classes,), default=None
            Classes across all calls to partial_fit; required on the first call.

        Returns
        -------
        self : object
        """
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)  # type: ignore[return-value]

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """The log of :meth:`predict_proba`, ``(n_samples, n_classes)``."""
        y_prob = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(y_prob, out=y_prob)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability estimates ``(n_samples, n_classes)``, columns in the order of ``classes_``."""
        y_pred = self._forward(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    # skl2onnx's converter protocol: skl2onnx.to_onnx(clf, X[:1]) finds the converter here (see fastmlp.onnx)
    def onnx_shape_calculator(self) -> Any:
        """skl2onnx: the shape calculator of this estimator's ONNX graph (``label``, ``probabilities``)."""
        from fastmlp.onnx import classifier_shape_calculator

        return classifier_shape_calculator

    def onnx_converter(self) -> Any:
        """skl2onnx: the converter that writes this estimator's network into an ONNX graph."""
        from fastmlp.onnx import classifier_converter

        return classifier_converter


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's ``MLPRegressor`` on fastmlp's compiled kernels.

    Parameters are scikit-learn's (see ``sklearn.neural_network.MLPRegressor``;
    ``loss`` is ``'squared_error'`` or ``'poisson'``) plus fastmlp's own, as
    :class:`MLPClassifier`.  The output is the identity (exp for Poisson) and the
    loss ``½ mean((y − ŷ)²)``; train on standardised targets (e.g. with
    ``TransformedTargetRegressor``) as for scikit-learn's.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 3))
    >>> y = X @ [1.0, -2.0, 0.5]
    >>> reg = MLPRegressor(hidden_layer_sizes=(20,), max_iter=500, random_state=0).fit(X, y)
    >>> reg.score(X, y) > 0.95
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions({"squared_error", "poisson"})],
    }

    def __init__(
        self,
        loss: str = "squared_error",
        hidden_layer_sizes: Any = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: Any = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: Any = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: Any = 10,
        max_fun: int = 15000,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        l1: float = 0.0,
        dtype: Any = None,
        backend: str = "auto",
        n_threads: int | None = None,
        callbacks: Any = None,
    ) -> None:
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.l1 = l1
        self.dtype = dtype
        self.backend = backend
        self.n_threads = n_threads
        self.callbacks = callbacks

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[Any, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), reset=reset)  # fmt: skip
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and np.any(y < 0):
            raise ValueError("Some value(s) of y are negative which is not allowed for Poisson regression.")
        return X, y

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)  # type: ignore[return-value]

    fit.__doc__ = _BaseMLP.fit.__doc__

    def predict(self, X: Any) -> np.ndarray:
        """Predict using the multi-layer perceptron model.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        y_pred = self._forward(X)
        if y_pred.shape[1] == 1:
            return y_pred.ravel()
        return y_pred

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """Update the model with a single iteration over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)  # type: ignore[return-value]

    # skl2onnx's converter protocol: skl2onnx.to_onnx(reg, X[:1]) finds the converter here (see fastmlp.onnx)
    def onnx_shape_calculator(self) -> Any:
        """skl2onnx: the shape calculator of this estimator's ONNX graph (``variable``)."""
        from fastmlp.onnx import regressor_shape_calculator

        return regressor_shape_calculator

    def onnx_converter(self) -> Any:
        """skl2onnx: the converter that writes this estimator's network into an ONNX graph."""
        from fastmlp.onnx import regressor_converter

        return regressor_converter


def __getattr__(name: str) -> Any:
    if name in ("FastMLPClassifier", "FastMLPRegressor"):
        new = "MLPClassifier" if name == "FastMLPClassifier" else "MLPRegressor"
        warnings.warn(f"fastmlp.sklearn.{name} is deprecated: use fastmlp.sklearn.{new}, which takes scikit-learn's "
                      "parameters (alpha instead of l2, learning_rate_init instead of learning_rate, solver='sgd' "
                      "for plain SGD); it will be removed", FutureWarning, stacklevel=2)  # fmt: skip
        return MLPClassifier if new == "MLPClassifier" else MLPRegressor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
