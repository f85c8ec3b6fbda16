"""The :class:`Network`: parameters, initialisation, forward pass, prediction, evaluation, save/load."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp._io import atomic_write, check_output_path, read_npz
from fastmlp.backends import Backend, get_backend
from fastmlp.backends import reference as _ref
from fastmlp.backends.contract import ACT_CODES, DEFAULT_OUTPUT, LOSS_CODES, OPTIMIZER_SLOTS, OptimizerState

if TYPE_CHECKING:
    from fastmlp.history import History
    from fastmlp.mc_dropout import MCPrediction

__all__ = ["INITS", "Network", "init_params"]

#: version of the ``.npz`` model format written by :meth:`Network.save` (1: no optimizer state, no init)
FORMAT_VERSION = 2
#: rows per chunk when predicting, so a large X never needs one huge activation matrix
PREDICT_CHUNK = 8192
#: initialisations of :class:`Network`
INITS: tuple[str, ...] = ("normal", "glorot", "he")
#: the largest network :meth:`Network.load` builds (parameters), far above any small MLP
MAX_LOAD_PARAMS = 1 << 28
_MODEL_MEMBER = re.compile(r"^(meta|W\d+|b\d+|s[Wb]\d+_\d+)$")


def init_params(layers: Sequence[int], init: str, activation: str, rng: np.random.RandomState,
                dtype: object) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """Initial ``(weights, biases)`` drawn from ``rng`` layer by layer.

    ``'normal'``: ``W ~ N(0, 0.1)``, ``b = 0`` (the classic notebook's ``NeuralNetMLP``).
    ``'glorot'``: scikit-learn's ``_init_coef``: ``bound = sqrt(6 / (fan_in + fan_out))``
    (``sqrt(2 / ...)`` for a sigmoid hidden activation), ``coef ~ U(-bound, bound)`` of
    shape ``(fan_in, fan_out)`` then ``intercept ~ U(-bound, bound)``, in that order;
    ``W = coef.T``.  ``'he'``: ``W ~ N(0, sqrt(2 / fan_in))``, ``b = 0``.

    Parameters
    ----------
    layers : sequence of int
    init : {'normal', 'glorot', 'he'}
    activation : str
        The hidden activation (glorot's factor).
    rng : numpy.random.RandomState
    dtype : dtype
        The draws are float64, then cast.

    Returns
    -------
    weights : list of ndarray ``(n_out, n_in)``
    biases : list of ndarray ``(n_out,)``
    """
    weights, biases = [], []
    for n_in, n_out in zip(layers[:-1], layers[1:], strict=True):
        if init == "glorot":
            bound = np.sqrt((2.0 if activation == "sigmoid" else 6.0) / (n_in + n_out))
            coef = rng.uniform(-bound, bound, (n_in, n_out))
            b = rng.uniform(-bound, bound, n_out)
            W = coef.T
        elif init == "he":
            W = rng.normal(loc=0.0, scale=np.sqrt(2.0 / n_in), size=(n_out, n_in))
            b = np.zeros(n_out)
        else:
            W = rng.normal(loc=0.0, scale=0.1, size=(n_out, n_in))
            b = np.zeros(n_out)
        weights.append(np.ascontiguousarray(W, dtype=dtype))
        biases.append(np.ascontiguousarray(b, dtype=dtype))
    return weights, biases


def _array_meta(a: np.ndarray) -> tuple[int, ...]:
    """``(ndim, type number, *shape, *strides)``: what :meth:`Network._params_unchanged` compares."""
    return (a.ndim, a.dtype.num, *a.shape, *a.strides)


_SAME: list = []


def _same_arrays():
    """The Cython build's ``same_arrays`` (the comparison in C), or None without the build."""
    if not _SAME:
        fn = None
        try:
            from fastmlp.backends import cython as _cy

            fn = getattr(_cy._k, "same_arrays", None)
        except Exception:  # not built, or failed to load: the Python loop
            fn = None
        _SAME.append(fn)
    return _SAME[0]


class Network:
    """A fully connected feed-forward network trained by minibatch gradient descent.

    Parameters
    ----------
    layers : sequence of int
        Layer sizes ``[n_features, n_hidden_1, ..., n_outputs]``; any number of
        hidden layers (including none).
    activation : {'sigmoid', 'tanh', 'relu', 'identity'}
        Hidden-layer activation.
    output : {'sigmoid', 'softmax', 'identity', 'exp'}, optional
        Output activation; default by loss: ``'sigmoid'`` for ``'mse'`` (the
        notebook's), ``'softmax'`` for ``'ce'`` (``'sigmoid'`` with one output unit),
        ``'identity'`` for ``'squared_error'``, ``'exp'`` for ``'poisson'``.
    loss : {'mse', 'ce', 'squared_error', 'poisson'}
        ``'mse'`` (the classic notebook's scaling), cross-entropy (``'ce'``:
        softmax, or per-unit binary with a sigmoid output), scikit-learn's
        ``'squared_error'`` (regression) or ``'poisson'`` (counts).
    dtype : {'float64', 'float32'}
        One floating dtype for all parameters and computations.
    backend : {'auto', 'cython', 'numba', 'numpy'}
        Kernel backend; ``'auto'`` is the fastest one available here.
    seed : int, optional
        Seed of the initialisation (``np.random.RandomState(seed)``, first layer first).
    init : {'normal', 'glorot', 'he'}
        ``'normal'``: N(0, 0.1) weights and zero biases, as the classic
        ``NeuralNetMLP``; ``'glorot'``: scikit-learn's uniform initialisation of
        weights and biases; ``'he'``: N(0, sqrt(2/fan_in)) for relu networks.

    Attributes
    ----------
    weights : list of ndarray
        ``W`` of each layer, shape ``(n_out, n_in)``.
    biases : list of ndarray
        ``b`` of each layer, shape ``(n_out,)``.
    optimizer_state_ : OptimizerState or None
        The optimizer's arrays after the last :meth:`fit` (kept for the next one).
    epochs_ : int
        Epochs trained so far (History epochs continue from here).
    step_ : int
        Minibatch steps trained so far (dropout masks never repeat across fits).
    dropout_, input_dropout_ : float or None
        Drop probabilities of the last :meth:`fit` (``None`` before any);
        the default rates of :meth:`mc_predict`; kept by :meth:`save`.

    Examples
    --------
    >>> net = Network([4, 3, 2], seed=1)
    >>> net.predict(np.zeros((5, 4))).shape
    (5,)
    """

    def __init__(
        self,
        layers: Sequence[int],
        activation: str = "sigmoid",
        output: str | None = None,
        loss: str = "mse",
        dtype: str | np.dtype = "float64",
        backend: str | Backend = "auto",
        seed: int | None = None,
        init: str = "normal",
    ) -> None:
        self._configure(layers, activation, output, loss, dtype, backend, seed, init)
        self.weights, self.biases = init_params(self.layers, self.init, self.activation,
                                                np.random.RandomState(_rs_seed(self.seed)), self.dtype)  # fmt: skip

    def _configure(self, layers: Sequence[int], activation: str, output: str | None, loss: str, dtype: object,
                   backend: str | Backend, seed: int | None, init: str) -> None:  # fmt: skip
        self.layers: list[int] = V.check_layers(layers)
        self.activation: str = V.check_activation(activation, "activation")
        if not isinstance(loss, str) or loss not in LOSS_CODES:
            raise ValueError(f"loss must be one of {tuple(LOSS_CODES)}, got {loss!r}")
        if output is None:
            output = DEFAULT_OUTPUT[loss]
            if output == "softmax" and self.layers[-1] == 1:
                output = "sigmoid"  # one output unit: binary cross-entropy
        self.output: str = V.check_activation(output, "output", output=True)
        self.loss: str = V.check_output_loss(self.output, loss)
        if self.output == "softmax" and self.layers[-1] < 2:
            raise ValueError("a softmax output needs at least 2 units; use output='sigmoid' for one unit")
        self.dtype: np.dtype = V.check_dtype(dtype)
        self.seed: int | None = V.check_seed(seed)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init: str = init
        self._backend: Backend = get_backend(backend)
        #: keep probability of each layer's input when dropout scales at prediction time (classic dropout)
        self.predict_keep: list[float] | None = None
        self.dropout_: float | None = None
        self.input_dropout_: float | None = None
        self.step_: int = 0
        self.epochs_: int = 0
        self.optimizer_state_: OptimizerState | None = None
        self.history_: History | None = None

    def reset(self) -> None:
        """Initialise the weights again (``init`` and ``seed``) and forget every trace of training."""
        W, b = init_params(self.layers, self.init, self.activation, np.random.RandomState(_rs_seed(self.seed)),
                           self.dtype)  # fmt: skip
        self.weights, self.biases = W, b
        self.predict_keep = None
        self.dropout_ = self.input_dropout_ = None
        self.step_ = self.epochs_ = 0
        self.optimizer_state_ = None
        self.history_ = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # the backend is a handle on compiled modules: pickle it by name, look it up again on load
        state = self.__dict__.copy()
        state["_backend"] = self._backend.name
        state.pop("_checked", None)  # which arrays were checked: this object's, not a copy's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        name = state.get("_backend", "auto")
        state.setdefault("init", "normal")
        state.setdefault("epochs_", 0)
        state.setdefault("optimizer_state_", None)
        self.__dict__.update(state)
        try:
            self._backend = get_backend(name)
        except ImportError:  # unpickled where that backend cannot load: the fastest one here
            self._backend = get_backend("auto")

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> Backend:
        """The kernel backend this network runs on."""
        return self._backend

    @backend.setter
    def backend(self, name: str | Backend) -> None:
        self._backend = get_backend(name)

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return self.layers[0]

    @property
    def n_outputs(self) -> int:
        """Number of output units."""
        return self.layers[-1]

    @property
    def n_classes(self) -> int:
        """Number of classes of a classifier: the output units (2 for one sigmoid unit)."""
        return max(2, self.layers[-1]) if self.output == "sigmoid" and self.layers[-1] == 1 else self.layers[-1]

    @property
    def is_regressor(self) -> bool:
        """Whether the output is a real value (identity or exp output)."""
        return self.output in ("identity", "exp") and self.loss in ("squared_error", "poisson")

    @property
    def n_parameters(self) -> int:
        """Total number of weights and biases."""
        return int(sum(W.size + b.size for W, b in zip(self.weights, self.biases, strict=True)))

    def __repr__(self) -> str:
        arch = "-".join(str(n) for n in self.layers)
        return (
            f"Network({arch}, activation={self.activation!r}, output={self.output!r}, loss={self.loss!r}, "
            f"dtype={self.dtype.name!r}, backend={self._backend.name!r})"
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments (what :meth:`save` stores beside the parameters)."""
        return {
            "layers": list(self.layers),
            "activation": self.activation,
            "output": self.output,
            "loss": self.loss,
            "dtype": self.dtype.name,
            "seed": self.seed,
            "init": self.init,
        }

    def check_parameters(self, train: bool = True) -> None:
        """Check that ``weights``/``biases`` still are arrays of the network's shapes and dtype, finite.

        With ``train`` (before a fit), read-only or non-contiguous parameters (a network
        unpickled from a read-only memory map, say) are first replaced by writeable copies.

        Raises
        ------
        TypeError, ValueError
            When a parameter was replaced by an array of another shape or dtype, or holds NaN/inf.
        """
        for name in ("weights", "biases"):
            if not isinstance(getattr(self, name), list):
                setattr(self, name, list(getattr(self, name)))
        if train:
            for lst in (self.weights, self.biases):
                for i, a in enumerate(lst):
                    if isinstance(a, np.ndarray) and not (a.flags.writeable and a.flags.c_contiguous and a.flags.aligned):
                        lst[i] = np.array(a, order="C")
        V.check_parameters(self.weights, self.biases, self.dtype, finite=True, sizes=self.layers, writeable=train)

    def get_params(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of ``(weights, biases)``."""
        return [W.copy() for W in self.weights], [b.copy() for b in self.biases]

    def set_params(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
        """Copy ``weights``/``biases`` (the network's shapes, finite, representable in its dtype) in place."""
        if len(weights) != len(self.weights) or len(biases) != len(self.biases):
            raise ValueError(f"expected {len(self.weights)} weight matrices and bias vectors")
        checked = []
        for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
            W, b = np.asarray(W), np.asarray(b)
            if W.shape != self.weights[i].shape or b.shape != self.biases[i].shape:
                raise ValueError(
                    f"layer {i}: expected shapes {self.weights[i].shape} and {self.biases[i].shape}, "
                    f"got {W.shape} and {b.shape}"
                )
            if W.dtype.kind not in "iuf" or b.dtype.kind not in "iuf":
                raise TypeError(f"layer {i}: weights and biases must be real numbers, got {W.dtype} and {b.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                Wc, bc = W.astype(self.dtype), b.astype(self.dtype)
            if not (V.all_finite(Wc) and V.all_finite(bc)):
                raise ValueError(f"layer {i}: weights and biases must be finite in {self.dtype} "
                                 "(NaN, inf, or values too large for the network's dtype)")  # fmt: skip
            checked.append((Wc, bc))
        for i, (Wc, bc) in enumerate(checked):
            if self.weights[i].shape != Wc.shape or self.weights[i].dtype != self.dtype or \
                    not self.weights[i].flags.writeable:  # fmt: skip
                self.weights[i] = np.empty_like(Wc)
            if self.biases[i].dtype != self.dtype or not self.biases[i].flags.writeable:
                self.biases[i] = np.empty_like(bc)
            self.weights[i][...] = Wc
            self.biases[i][...] = bc

    # ------------------------------------------------------------------ inference
    def _params_unchanged(self) -> bool:
        """Whether the parameter arrays are the very objects :meth:`check_parameters` last passed for
        inference, with the same shapes, strides and dtype (references are held, so no id is reused)."""
        ck = self.__dict__.get("_checked")
        Ws, bs = self.weights, self.biases
        if ck is None or type(Ws) is not list or type(bs) is not list:
            return False
        params, meta, dtype, layers = ck
        if dtype != self.dtype or layers != self.layers:
            return False
        same = _same_arrays()
        if same is not None:
            return bool(same(Ws + bs, params, meta))
        if len(Ws) + len(bs) != len(params):
            return False
        for a, b, m in zip((*Ws, *bs), params, meta, strict=True):
            # shape and strides fix the layout (an object's buffer moves only with its shape)
            if a is not b or _array_meta(a) != m:
                return False
        return True

    def _raise_not_finite(self) -> None:
        """Raise for the first layer whose weights or biases hold a NaN or an infinity (none: return)."""
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if not (V.all_finite(W) and V.all_finite(b)):
                raise ValueError(f"weights[{i}]/biases[{i}] contain NaN or infinite values")

    def _inference_params(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        # The structural checks (shapes against layers, dtype, layout, no shared memory) are repeated only
        # when a parameter array was replaced; finiteness is checked on every call, since a value can be
        # changed in place (a summation pass, see fastmlp._validation.all_finite).
        if self._params_unchanged():
            fast = V._compiled_all_finite()
            if fast is None or not fast([*self.weights, *self.biases]):
                self._raise_not_finite()
        else:
            self.check_parameters(train=False)
            params = (*self.weights, *self.biases)
            self.__dict__["_checked"] = (params, tuple(_array_meta(a) for a in params), self.dtype,
                                         list(self.layers))  # fmt: skip
        if self.predict_keep is None:
            return self.weights, self.biases
        # classic (non-inverted) dropout: scale each layer's weights by its input keep probability
        Ws = [np.ascontiguousarray(W * self.dtype.type(k)) for W, k in zip(self.weights, self.predict_keep, strict=True)]
        return Ws, self.biases

    def forward(self, X: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer.

        Parameters
        ----------
        X : array-like (n_samples, n_features)

        Returns
        -------
        list of ndarray
            ``[a_1, ..., a_L]``, ``a_l`` of shape ``(n_samples, layers[l])``;
            the last one is the output.
        """
        A = V.as_features(X, self.dtype, n_features=self.n_features)
        Ws, bs = self._inference_params()
        acts = []
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            act = self.output if i == len(Ws) - 1 else self.activation
            A = self._backend.forward(A, W, b, act)
            acts.append(A)
        return acts

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Output activations (class probabilities for softmax; per-unit probabilities for sigmoid).

        Parameters
        ----------
        X : array-like (n_samples, n_features)

        Returns
        -------
        ndarray (n_samples, n_outputs)
        """
        if not (type(X) is np.ndarray and X.dtype == self.dtype and X.ndim == 2 and X.shape[0] > 0
                and X.shape[1] == self.n_features and X.flags.c_contiguous and X.flags.aligned
                and X.size < V._SEEN_MIN_SIZE and V.all_finite(X)):  # fmt: skip
            # the fast road above: a small finite array of the network's dtype and layout, used as it is
            X = V.as_features(X, self.dtype, n_features=self.n_features)
        return self._proba_checked(X)

    def _proba_checked(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((X.shape[0], self.n_outputs), dtype=self.dtype)
        be = self._backend
        if self.predict_keep is None and self._params_unchanged():
            # the parameters' structure is as last checked: the finiteness test rides on the first chunk's pass
            Ws, bs = self.weights, self.biases
            n = X.shape[0]
            first = X if n <= PREDICT_CHUNK else X[:PREDICT_CHUNK]
            if not be._forward_network_checked(first, Ws, bs, self.activation, self.output,
                                               out if n <= PREDICT_CHUNK else out[:PREDICT_CHUNK]):  # fmt: skip
                self._raise_not_finite()
            for start in range(PREDICT_CHUNK, n, PREDICT_CHUNK):
                stop = min(start + PREDICT_CHUNK, n)
                be._forward_network_into(X[start:stop], Ws, bs, self.activation, self.output, out[start:stop])
            return out
        Ws, bs = self._inference_params()
        for start in range(0, X.shape[0], PREDICT_CHUNK):
            stop = min(start + PREDICT_CHUNK, X.shape[0])
            be._forward_network_into(X[start:stop], Ws, bs, self.activation, self.output, out[start:stop])
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions ``(n_samples,)``: class indices (arg-max; ``output > 0.5`` for one sigmoid unit).

        For a regression network (identity or exp output with ``squared_error`` or
        ``poisson``) the outputs themselves: ``(n_samples,)`` for one output,
        ``(n_samples, n_outputs)`` otherwise.
        """
        P = self.predict_proba(X)
        if self.is_regressor:
            return P[:, 0] if P.shape[1] == 1 else P
        if P.shape[1] == 1:
            return (P[:, 0] > 0.5).astype(np.int64)
        return np.argmax(P, axis=1)

    def mc_predict(
        self,
        X: np.ndarray,
        n_samples: int = 30,
        seed: int | None = None,
        dropout: float | None = None,
        input_dropout: float | None = None,
    ) -> MCPrediction:
        """Monte-Carlo dropout: ``n_samples`` forward passes with dropout on, averaged.

        Each pass draws a fresh dropout mask for every row and unit from the
        counter-based generator of the kernel contract, so the result is
        reproducible with ``seed`` and identical on every backend.  Rows are
        processed in blocks, so memory stays bounded for any ``X``.

        Parameters
        ----------
        X : array-like (n_rows, n_features)
        n_samples : int
            Forward passes (>= 1).
        seed : int, optional
            Seed of the masks; ``None`` draws one (stored in the result).
        dropout, input_dropout : float, optional
            Drop probabilities of hidden units and inputs; default: the rates
            of the last :meth:`fit` (``dropout_``, ``input_dropout_``).
            Inverted scaling ``1/keep`` is used; a network trained with
            ``dropout_scaling='predict'`` gets its masks scaled by
            ``keep_trained/keep`` instead (1 at the trained rate).

        Returns
        -------
        MCPrediction
            ``mean`` and ``std`` of the class probabilities ``(n_rows, n_classes)``
            and the predictive ``entropy`` ``(n_rows,)``; unpacks as
            ``mean, std, entropy = net.mc_predict(X)``.  Sigmoid and identity
            outputs are normalized to sum to one per row first.

        Raises
        ------
        ValueError
            When no rate is given and the network was not fitted with dropout.
        """
        from fastmlp.mc_dropout import mc_predict

        return mc_predict(self, X, n_samples=n_samples, seed=seed, dropout=dropout, input_dropout=input_dropout)

    def evaluate(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple[float, float]:
        """Mean data loss and accuracy (R² for a regression network) on ``(X, y)``.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array-like
            Class indices ``(n_samples,)`` or targets ``(n_samples, n_outputs)``, as for :meth:`fit`.
        sample_weight : array-like (n_samples,), optional

        Returns
        -------
        loss : float
            Mean per-sample loss (MSE: mean over outputs of the squared error, as
            the classic ``mse_loss``; CE: mean negative log-likelihood), weighted
            by ``sample_weight``.
        score : float
            Accuracy in [0, 1] (subset accuracy for multi-label targets), or R².
        """
        from fastmlp.training import as_targets

        X = V.as_features(X, self.dtype, n_features=self.n_features)
        _, Y = as_targets(self, y, X.shape[0])
        sw = None if sample_weight is None else V.as_sample_weight(sample_weight, X.shape[0])
        loss, _, score = self._evaluate_checked(X, Y, sw, None)
        return loss, score

    def _evaluate_checked(self, X: np.ndarray, Y: np.ndarray, sw: np.ndarray | None,
                          score: Callable[..., float] | None) -> tuple[float, float | None, float]:  # fmt: skip
        """``(mean loss, accuracy or None, score)`` of validated data (labels or a dense target matrix)."""
        A = self._proba_checked(X)
        T = _ref.target_matrix(Y, self.n_outputs, self.dtype)
        li = _ref.sample_losses(A, T, ACT_CODES[self.output], LOSS_CODES[self.loss])
        loss = float(np.mean(li)) if sw is None else float(np.dot(sw, li) / np.sum(sw))
        regression = Y.ndim == 2 and self.output in ("identity", "exp")
        acc = None if regression else accuracy(Y, A, sw, multilabel=Y.ndim == 2 and self.output == "sigmoid")
        if score is not None:
            s = float(score(Y, A, sample_weight=sw) if sw is not None else score(Y, A))
        else:
            s = r2(T, A, sw) if acc is None else acc
        return loss, acc, s

    def penalty(self, l2: float = 0.0, l1: float = 0.0, alpha: float = 0.0, n: float = 1.0) -> float:
        """The penalty ``½·l2·Σ‖W‖² + l1·Σ‖W‖₁ + ½·alpha·Σ‖W‖²/n`` over the weights (never the biases)."""
        total = 0.0
        for W in self.weights:
            if l2 or alpha:
                sq = float(np.dot(W.ravel(), W.ravel()))
                total += 0.5 * l2 * sq + 0.5 * alpha * sq / n
            if l1:
                total += l1 * float(np.abs(W).sum())
        return total

    # ------------------------------------------------------------------ summary
    def summary(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Print a table of the layers, as Keras's ``model.summary()``: shapes, parameters, activation, dropout.

        One row per dense layer: its input and output widths, the shapes of ``W``
        ``(n_out, n_in)`` and ``b`` ``(n_out,)``, its parameter count, its
        activation and the drop probability of its *input* during training (the
        rates of the last :meth:`fit`; ``-`` before any), then the totals, the
        loss, the dtype and the backend.

        Parameters
        ----------
        print_fn : callable, optional
            Called with each line (default: :func:`print`).

        Examples
        --------
        >>> Network([784, 50, 10], seed=1, backend="numpy").summary()
        Network 784-50-10 (loss 'mse', float64, backend 'numpy')
        layer     in -> out   W (n_out, n_in)   b       parameters   activation   input dropout
        dense_1   784 -> 50   (50, 784)         (50,)       39,250   sigmoid      -
        output     50 -> 10   (10, 50)          (10,)          510   sigmoid      -
        Total parameters: 39,760 (float64, 310.6 KiB); trained 0 epochs
        """
        emit = print if print_fn is None else print_fn
        if not callable(emit):
            raise TypeError(f"print_fn must be a callable taking one line of text, got {type(print_fn).__name__}")
        for line in self._summary_lines():
            emit(line)

    def _summary_lines(self) -> list[str]:
        L = len(self.weights)
        rates: list[float | None] = [self.input_dropout_] + [self.dropout_] * (L - 1)
        rows = []
        for i, (n_in, n_out) in enumerate(zip(self.layers[:-1], self.layers[1:], strict=True)):
            rate = rates[i]
            rows.append(("output" if i == L - 1 else f"dense_{i + 1}", f"{n_in} -> {n_out}", f"({n_out}, {n_in})",
                         f"({n_out},)", f"{n_in * n_out + n_out:,}", self.output if i == L - 1 else self.activation,
                         "-" if rate is None else f"{rate:g}"))  # fmt: skip
        head = ("layer", "in -> out", "W (n_out, n_in)", "b", "parameters", "activation", "input dropout")
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        right = {1, 4}

        def fmt(r: Sequence[str]) -> str:
            return "   ".join(v.rjust(w) if c in right and r is not head else v.ljust(w)
                              for c, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip()  # fmt: skip

        arch = "-".join(str(n) for n in self.layers)
        kib = self.n_parameters * self.dtype.itemsize / 1024
        total = f"Total parameters: {self.n_parameters:,} ({self.dtype.name}, {kib:,.1f} KiB); trained {self.epochs_} epochs"
        head_line = f"Network {arch} (loss {self.loss!r}, {self.dtype.name}, backend {self._backend.name!r})"
        return [head_line, fmt(head), *(fmt(r) for r in rows), total]

    # ------------------------------------------------------------------ training
    def fit(self, X: np.ndarray, y: np.ndarray, **kwargs: Any) -> History:
        """Train with minibatch gradient descent; see :func:`fastmlp.training.fit` for the parameters."""
        from fastmlp.training import fit

        return fit(self, X, y, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the network (and its optimizer state) to one ``.npz`` file, atomically.

        The file holds the configuration (JSON), a format version, every weight
        and bias and the optimizer's arrays; it is written to a temporary file in
        the same directory, flushed to disk and renamed over ``path``, so a crash
        never leaves a half-written model.  ``.npz`` is appended when missing.

        Returns
        -------
        pathlib.Path
            The path written.

        Raises
        ------
        ValueError
            When the parameters are not what :meth:`load` accepts (non-finite,
            wrong shapes), or the directory does not exist or is not writable.
        """
        path = _npz_path(path)
        check_output_path(path, "model")
        self.check_parameters()
        state = self.optimizer_state_
        meta = {"format": "fastmlp", "format_version": FORMAT_VERSION, "config": self.config(),
                "predict_keep": self.predict_keep, "step": self.step_, "epochs": self.epochs_,
                "dropout": self.dropout_, "input_dropout": self.input_dropout_,
                "optimizer": None if state is None else {"kind": state.kind, "t": state.t}}  # fmt: skip
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"W{i}"] = W
            arrays[f"b{i}"] = b
        if state is not None:
            for s in range(len(state.weights)):
                for i, (W, b) in enumerate(zip(state.weights[s], state.biases[s], strict=True)):
                    arrays[f"sW{s}_{i}"], arrays[f"sb{s}_{i}"] = W, b
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | Backend = "auto") -> Network:
        """Read a network written by :meth:`save` (``.npz`` is appended when ``path`` has no such file).

        Raises
        ------
        FileNotFoundError
            When neither ``path`` nor ``path.npz`` exists.
        ValueError
            For anything else wrong with the file (not a regular file, truncated, corrupted,
            foreign, inconsistent, a newer format version), naming the path.
        """
        path = Path(os.fspath(path))
        if not os.path.lexists(path) and path.suffix != ".npz" and os.path.lexists(_npz_path(path)):
            path = _npz_path(path)
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no model file at {path}")
        # a model is its parameters (at most MAX_LOAD_PARAMS of 8 bytes, twice over for optimizer state) plus JSON
        limit = 3 * 8 * MAX_LOAD_PARAMS + (1 << 20)
        arrays = read_npz(path, lambda n: bool(_MODEL_MEMBER.match(n)), limit, "fastmlp model file", required=("meta",))
        try:
            return cls._from_arrays(arrays, backend)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError, IndexError, AttributeError) as exc:
            raise ValueError(f"{path} is not a usable fastmlp model file: {exc}") from None

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], backend: str | Backend) -> Network:
        meta_raw = arrays.pop("meta")
        if meta_raw.dtype.kind != "U" or meta_raw.ndim != 0:
            raise ValueError("its metadata is not a JSON string")
        meta = json.loads(str(meta_raw), parse_constant=_no_constant)
        if not isinstance(meta, dict) or meta.get("format") != "fastmlp":
            raise ValueError("it is not a fastmlp model file")
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"it was written by a newer fastmlp (format version {version} > {FORMAT_VERSION}); "
                             "upgrade fastmlp")  # fmt: skip
        cfg = meta["config"]
        if not isinstance(cfg, dict):
            raise ValueError("its configuration is not a mapping")
        layers = V.check_layers(cfg["layers"])
        pairs = list(zip(layers[:-1], layers[1:], strict=True))
        if sum(i * o + o for i, o in pairs) > MAX_LOAD_PARAMS:
            raise ValueError(f"layers={layers} is larger than any network fastmlp loads")
        net = cls.__new__(cls)
        net._configure(layers, cfg["activation"], cfg["output"], cfg["loss"], cfg["dtype"], backend, cfg.get("seed"),
                       cfg.get("init", "normal"))  # fmt: skip
        L = len(pairs)
        expected = {f"W{i}": (o, n) for i, (n, o) in enumerate(pairs)} | {f"b{i}": (o,) for i, (_, o) in enumerate(pairs)}
        for name, shape in expected.items():
            if name not in arrays:
                raise ValueError(f"the parameter {name} is missing")
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, the configuration says {shape}")
        net.weights = [np.empty((o, n), dtype=net.dtype) for n, o in pairs]
        net.biases = [np.empty(o, dtype=net.dtype) for _, o in pairs]
        net.set_params([arrays[f"W{i}"] for i in range(L)], [arrays[f"b{i}"] for i in range(L)])
        keep = meta.get("predict_keep")
        if keep is not None:
            keep = [V.check_float(k, "predict_keep", low=0.0, high=1.0, low_open=True) for k in keep]
            if len(keep) != L:
                raise ValueError(f"predict_keep has {len(keep)} entries for {L} layers")
        net.predict_keep = keep
        net.step_ = V.check_int(meta.get("step", 0), "step", minimum=0, maximum=2**62)
        net.epochs_ = V.check_int(meta.get("epochs", 0), "epochs", minimum=0, maximum=2**62)
        for key in ("dropout", "input_dropout"):
            rate = meta.get(key)
            setattr(net, f"{key}_", None if rate is None else V.check_float(rate, key, low=0.0, high=1.0, high_open=True))
        opt = meta.get("optimizer")
        if opt is not None:
            kind = opt["kind"]
            if kind not in OPTIMIZER_SLOTS:
                raise ValueError(f"unknown optimizer state {kind!r}")
            state = OptimizerState.zeros(kind, layers, net.dtype)
            state.t = V.check_int(opt["t"], "optimizer step count", minimum=0, maximum=2**62)
            for s in range(len(state.weights)):
                for i in range(L):
                    for arr, name in ((state.weights[s][i], f"sW{s}_{i}"), (state.biases[s][i], f"sb{s}_{i}")):
                        src = arrays[name]
                        if src.shape != arr.shape or src.dtype.kind != "f" or not V.all_finite(src):
                            raise ValueError(f"the optimizer state {name} is damaged")
                        arr[...] = src
            net.optimizer_state_ = state
        return net

    def to_onnx(self, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
        """The network as an ONNX model, written to ``path`` if given: :func:`fastmlp.onnx.to_onnx` (needs ``fastmlp[onnx]``)."""
        from fastmlp.onnx import to_onnx

        return to_onnx(self, path, **kwargs)


def _no_constant(name: str) -> None:
    raise ValueError(f"its metadata holds {name}, which fastmlp never writes")


def _npz_path(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path))
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def _rs_seed(seed: int | None) -> int | None:
    """A seed for ``RandomState``, which takes 32 bits: larger seeds are folded (documented range: 64-bit)."""
    if seed is None or seed < 2**32:
        return seed
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


def accuracy(Y: np.ndarray, A: np.ndarray, sw: np.ndarray | None = None, multilabel: bool = False) -> float:
    """Accuracy of outputs ``A (n, k)`` on labels ``(n,)`` or dense targets ``(n, k)``, weighted by ``sw``.

    ``multilabel`` (sigmoid units, indicator targets): every unit on the right
    side of 0.5 (subset accuracy).  Otherwise one output unit: ``a > 0.5``
    against the 0/1 target; several: arg-max agreement.
    """
    if multilabel:
        hit = ((A > 0.5) == (Y > 0.5)).all(axis=1)
    elif A.shape[1] == 1:
        truth = Y == 1 if Y.ndim == 1 else Y[:, 0] > 0.5
        hit = (A[:, 0] > 0.5) == truth
    else:
        truth = Y if Y.ndim == 1 else np.argmax(Y, axis=1)
        hit = np.argmax(A, axis=1) == truth
    if sw is None:
        return float(np.count_nonzero(hit)) / hit.shape[0]
    return float(np.dot(sw, hit) / np.sum(sw))


def r2(T: np.ndarray, P: np.ndarray, sw: np.ndarray | None = None) -> float:
    """R² of predictions ``P`` against targets ``T`` (both ``(n, k)``), averaged over the outputs.

    scikit-learn's ``r2_score`` with ``multioutput='uniform_average'``: an output
    whose targets are constant scores 1 when predicted exactly, else 0.
    """
    t = T.astype(np.float64)
    p = P.astype(np.float64)
    w = np.ones(t.shape[0]) if sw is None else sw
    num = (w[:, None] * (t - p) ** 2).sum(axis=0)
    mean = np.average(t, axis=0, weights=w)
    den = (w[:, None] * (t - mean) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(den != 0, 1.0 - num / np.where(den != 0, den, 1.0), np.where(num == 0, 1.0, 0.0))
    return float(np.mean(scores))
