"""The :class:`Network`: parameters, forward pass, prediction, evaluation, save/load."""

from __future__ import annotations

import io
import json
import lzma
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp._io import atomic_write
from fastmlp.backends import Backend, get_backend
from fastmlp.backends import reference as _ref
from fastmlp.backends._contract import ACT_CODES, LOSS_CODES

if TYPE_CHECKING:
    from fastmlp.mc_dropout import MCPrediction
    from fastmlp.training import History

#: version of the ``.npz`` model format written by :meth:`Network.save`
FORMAT_VERSION = 1
#: rows per chunk when predicting, so a large X never needs one huge activation matrix
PREDICT_CHUNK = 8192


class Network:
    """A fully connected feed-forward network trained by minibatch SGD.

    Parameters
    ----------
    layers : sequence of int
        Layer sizes ``[n_features, n_hidden_1, ..., n_classes]``; any number of
        hidden layers (including none).
    activation : {'sigmoid', 'tanh', 'relu', 'identity'}
        Hidden-layer activation.
    output : {'sigmoid', 'softmax', 'identity'}
        Output activation.
    loss : {'mse', 'ce'}
        ``'mse'`` (the classic notebook's) or cross-entropy (``'ce'``, with a
        softmax or sigmoid output).
    dtype : {'float64', 'float32'}
        One floating dtype for all parameters and computations.
    backend : {'auto', 'cython', 'numba', 'numpy'}
        Kernel backend; ``'auto'`` is the fastest one available here.
    seed : int, optional
        Seed of the initialisation: weights ~ normal(0, 0.1) drawn from
        ``np.random.RandomState(seed)`` first layer first (as the classic
        ``NeuralNetMLP``), biases zero.

    Attributes
    ----------
    weights : list of ndarray
        ``W`` of each layer, shape ``(n_out, n_in)``.
    biases : list of ndarray
        ``b`` of each layer, shape ``(n_out,)``.
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
        output: str = "sigmoid",
        loss: str = "mse",
        dtype: str | np.dtype = "float64",
        backend: str | Backend = "auto",
        seed: int | None = None,
    ) -> None:
        self.layers: list[int] = V.check_layers(layers)
        self.activation: str = V.check_activation(activation, "activation")
        self.output: str = V.check_activation(output, "output", output=True)
        self.loss: str = V.check_output_loss(self.output, loss)
        self.dtype: np.dtype = V.check_dtype(dtype)
        self.seed: int | None = V.check_seed(seed)
        self._backend: Backend = get_backend(backend)
        rng = np.random.RandomState(self.seed)
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for n_in, n_out in zip(self.layers[:-1], self.layers[1:], strict=True):
            W = rng.normal(loc=0.0, scale=0.1, size=(n_out, n_in))
            self.weights.append(np.ascontiguousarray(W, dtype=self.dtype))
            self.biases.append(np.zeros(n_out, dtype=self.dtype))
        #: keep probability of each layer's input when dropout scales at prediction time (classic dropout)
        self.predict_keep: list[float] | None = None
        #: drop probabilities of hidden units and inputs in the last fit (defaults of mc_predict)
        self.dropout_: float | None = None
        self.input_dropout_: float | None = None
        #: global minibatch step counter (dropout masks never repeat across fits)
        self.step_: int = 0
        self.history_: History | None = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # the backend is a handle on compiled modules: pickle it by name, look it up again on load
        state = self.__dict__.copy()
        state["_backend"] = self._backend.name
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        name = state.get("_backend", "auto")
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
    def n_classes(self) -> int:
        """Number of output units (classes)."""
        return self.layers[-1]

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
        }

    def get_params(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of ``(weights, biases)``."""
        return [W.copy() for W in self.weights], [b.copy() for b in self.biases]

    def set_params(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
        """Copy ``weights``/``biases`` (same shapes as the network's) into the network, in place."""
        if len(weights) != len(self.weights) or len(biases) != len(self.biases):
            raise ValueError(f"expected {len(self.weights)} weight matrices and bias vectors")
        for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
            W, b = np.asarray(W), np.asarray(b)
            if W.shape != self.weights[i].shape or b.shape != self.biases[i].shape:
                raise ValueError(
                    f"layer {i}: expected shapes {self.weights[i].shape} and {self.biases[i].shape}, "
                    f"got {W.shape} and {b.shape}"
                )
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise ValueError(f"layer {i}: weights and biases must be finite")
            self.weights[i][...] = W
            self.biases[i][...] = b

    # ------------------------------------------------------------------ inference
    def _inference_params(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
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
        """Output activations (class scores; probabilities for softmax).

        Parameters
        ----------
        X : array-like (n_samples, n_features)

        Returns
        -------
        ndarray (n_samples, n_classes)
        """
        X = V.as_features(X, self.dtype, n_features=self.n_features)
        return self._proba_checked(X)

    def _proba_checked(self, X: np.ndarray) -> np.ndarray:
        Ws, bs = self._inference_params()
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        h, o = ACT_CODES[self.activation], ACT_CODES[self.output]
        raw = self._backend.raw
        for start in range(0, X.shape[0], PREDICT_CHUNK):
            stop = min(start + PREDICT_CHUNK, X.shape[0])
            raw.forward_network(X[start:stop], Ws, bs, h, o, out[start:stop])
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class indices ``(n_samples,)`` (arg-max of the output)."""
        return np.argmax(self.predict_proba(X), axis=1)

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

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean data loss and accuracy on ``(X, y)``.

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : array of int (n_samples,)

        Returns
        -------
        loss : float
            Mean per-sample loss (MSE: mean over classes of the squared error,
            as the classic ``mse_loss``; CE: mean negative log-likelihood).
        accuracy : float
            Fraction of correct arg-max predictions, in [0, 1].
        """
        X = V.as_features(X, self.dtype, n_features=self.n_features)
        yy = V.as_labels(y, X.shape[0], self.n_classes)
        return self._evaluate_checked(X, yy)

    def _evaluate_checked(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        A = self._proba_checked(X)
        loss = _ref.LOSSES[LOSS_CODES[self.loss]](A, y, ACT_CODES[self.output]) / X.shape[0]
        acc = float(np.count_nonzero(np.argmax(A, axis=1) == y)) / X.shape[0]
        return float(loss), acc

    def penalty(self, l2: float = 0.0, l1: float = 0.0) -> float:
        """The norm penalty ``½·l2·Σ‖W‖² + l1·Σ‖W‖₁`` over the weights (biases are not penalized)."""
        total = 0.0
        for W in self.weights:
            if l2:
                total += 0.5 * l2 * float(np.dot(W.ravel(), W.ravel()))
            if l1:
                total += l1 * float(np.abs(W).sum())
        return total

    # ------------------------------------------------------------------ training
    def fit(self, X: np.ndarray, y: np.ndarray, **kwargs: Any) -> History:
        """Train with minibatch SGD; see :func:`fastmlp.training.fit` for the parameters."""
        from fastmlp.training import fit

        return fit(self, X, y, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the network to one ``.npz`` file, atomically.

        The file holds the configuration (JSON), a format version and every
        weight and bias; it is written to a temporary file in the same
        directory, flushed to disk and renamed over ``path``, so a crash never
        leaves a half-written model.

        Returns
        -------
        pathlib.Path
            The path written (``.npz`` appended when missing).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"format": "fastmlp", "format_version": FORMAT_VERSION, "config": self.config(),
                "predict_keep": self.predict_keep, "step": self.step_,
                "dropout": self.dropout_, "input_dropout": self.input_dropout_}  # fmt: skip
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"W{i}"] = W
            arrays[f"b{i}"] = b
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | Backend = "auto") -> Network:
        """Read a network written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            When ``path`` does not exist.
        ValueError
            For a truncated, corrupted or foreign file, or a newer format version.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no model file at {path}")
        try:
            data = path.read_bytes()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        # a damaged zip can surface as any of these (unknown compression method, 'encrypted' flag, bad deflate data)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError,
                zlib.error, lzma.LZMAError) as exc:  # fmt: skip
            raise ValueError(f"{path} is not a readable fastmlp model file (truncated or corrupted?): {exc}") from exc
        if "meta" not in arrays:
            raise ValueError(f"{path} is not a fastmlp model file (no metadata)")
        try:
            meta = json.loads(str(arrays["meta"]))
            fmt, version, cfg = meta["format"], int(meta["format_version"]), meta["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} has corrupted fastmlp metadata: {exc}") from exc
        if fmt != "fastmlp":
            raise ValueError(f"{path} is not a fastmlp model file (format {fmt!r})")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer fastmlp (format version {version} > {FORMAT_VERSION}); upgrade fastmlp"
            )
        try:
            net = cls(cfg["layers"], activation=cfg["activation"], output=cfg["output"], loss=cfg["loss"],
                      dtype=cfg["dtype"], backend=backend, seed=cfg.get("seed"))  # fmt: skip
            n = len(net.weights)
            net.set_params([arrays[f"W{i}"] for i in range(n)], [arrays[f"b{i}"] for i in range(n)])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is missing parameters or has a bad configuration: {exc}") from exc
        net.predict_keep = meta.get("predict_keep")
        net.step_ = int(meta.get("step", 0))
        for key in ("dropout", "input_dropout"):
            rate = meta.get(key)
            setattr(net, f"{key}_", None if rate is None else float(rate))
        return net
