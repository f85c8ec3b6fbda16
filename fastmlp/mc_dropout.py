"""Monte-Carlo dropout: predict many times with dropout on, report the mean and the spread.

The masks come from the counter-based generator of the kernel contract
(:mod:`fastmlp.backends.contract`), drawn by the backend's compiled
``dropout_mask``, so a seed gives the same numbers on every backend.  The rows
of ``X`` are processed in blocks of :data:`MC_BLOCK`; Monte-Carlo sample ``s``
of block ``j`` masks layer input ``l`` with the contract's mask for
``(seed, step = j·2³² + s, layer = l)``.  The result therefore depends on the
seed only, not on how many samples are stacked into one gemm (that is chosen
to bound memory by :data:`MC_MAX_ELEMENTS`), and the first ``k`` samples of a
run with ``n_samples > k`` are those of a run with ``n_samples = k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends.contract import ACT_CODES, keep_threshold

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastmlp.network import Network

#: rows of X per block of masks (part of the definition of the masks: changing it changes results)
MC_BLOCK = 256
#: at most this many activations (samples × rows × units) are stacked into one forward pass
MC_MAX_ELEMENTS = 1 << 21


@dataclass(repr=False)
class MCPrediction:
    """Result of :meth:`fastmlp.Network.mc_predict`; unpacks as ``mean, std, entropy``.

    Attributes
    ----------
    mean : ndarray of float64 (n_samples, n_classes)
        Mean class probabilities over the Monte-Carlo samples.
    std : ndarray of float64 (n_samples, n_classes)
        Their standard deviation over the samples (population, ``ddof=0``).
    entropy : ndarray of float64 (n_samples,)
        Predictive entropy ``−Σ_k p̄_k log p̄_k`` of the mean probabilities (nats).
    mutual_info : ndarray of float64 (n_samples,)
        ``entropy`` minus the mean entropy of the single samples (the model-
        uncertainty part, "BALD").
    n_samples : int
        Monte-Carlo samples drawn.
    seed : int
        Seed of the masks (pass it again to reproduce the result).
    dropout, input_dropout : float
        Drop probabilities used.
    """

    mean: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    mutual_info: np.ndarray
    n_samples: int
    seed: int
    dropout: float
    input_dropout: float

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.mean, self.std, self.entropy))

    def predict(self) -> np.ndarray:
        """Class indices ``(n_samples,)`` of the largest mean probability."""
        return np.argmax(self.mean, axis=1)

    def __repr__(self) -> str:
        n, k = self.mean.shape
        h = float(np.mean(self.entropy)) if n else 0.0
        return (f"MCPrediction({n} rows, {k} classes, n_samples={self.n_samples}, dropout={self.dropout:g}, "
                f"input_dropout={self.input_dropout:g}, mean entropy={h:.4f})")  # fmt: skip


def output_to_proba(A: np.ndarray, output: str) -> np.ndarray:
    """Class probabilities from output activations ``A (n, k)``, float64.

    Softmax outputs are probabilities already; one sigmoid unit (a binary
    classifier) gives ``[1 - a, a]``; several sigmoid units (one-vs-rest
    scores) and identity or exp outputs (clipped at 0) are normalized to sum to
    one; a row with no positive score becomes uniform.
    """
    P = np.asarray(A, dtype=np.float64)
    if output == "softmax":
        return P
    if output == "sigmoid" and P.shape[-1] == 1:
        return np.concatenate([1.0 - P, P], axis=-1)
    P = np.maximum(P, 0.0)
    s = P.sum(axis=-1, keepdims=True)
    k = P.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, P / np.where(s > 0, s, 1.0), 1.0 / k)


def _entropy(P: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def mc_predict(
    net: Network,
    X: np.ndarray,
    n_samples: int = 30,
    seed: int | None = None,
    dropout: float | None = None,
    input_dropout: float | None = None,
) -> MCPrediction:
    """Monte-Carlo dropout prediction; see :meth:`fastmlp.Network.mc_predict`."""
    net.check_parameters()  # the raw kernels below take finite parameters of the network's shapes, as predict does
    Xc = V.as_features(X, net.dtype, "X", n_features=net.n_features)
    n_samples = V.check_int(n_samples, "n_samples", minimum=1)
    if n_samples >= 1 << 32:
        raise ValueError(f"n_samples must be below 2**32, got {n_samples}")
    seed = V.check_seed(seed)
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**63))
    fitted_drop, fitted_in = getattr(net, "dropout_", None), getattr(net, "input_dropout_", None)
    drop = dropout if dropout is not None else fitted_drop
    in_drop = input_dropout if input_dropout is not None else fitted_in
    if drop is None and in_drop is None:
        raise ValueError("mc_predict needs dropout rates: this network was not fitted with dropout here; "
                         "pass dropout= and/or input_dropout=")  # fmt: skip
    drop = V.check_float(0.0 if drop is None else drop, "dropout", low=0.0, high=1.0, high_open=True)
    in_drop = V.check_float(0.0 if in_drop is None else in_drop, "input_dropout", low=0.0, high=1.0, high_open=True)
    if drop == 0.0 and in_drop == 0.0:
        raise ValueError("mc_predict needs a dropout rate > 0 (the network's last fit used none): "
                         "pass dropout= and/or input_dropout=")  # fmt: skip

    L = len(net.weights)
    keeps = [1.0 - in_drop] + [1.0 - drop] * (L - 1)
    # Multiplier of a kept unit: inverted dropout 1/q keeps the expectation of the plain forward pass;
    # a network trained with classic dropout (keep p, weights scaled by p at prediction) gets p/q, which
    # is 1 when q = p (its training-time masks) and p (the predict-time scaling) where q = 1.
    trained = net.predict_keep if net.predict_keep is not None else [1.0] * L
    scales = [p / q for p, q in zip(trained, keeps, strict=True)]
    thresholds = [keep_threshold(q) for q in keeps]
    raw = net.backend.raw
    dt = net.dtype
    h_code, o_code = ACT_CODES[net.activation], ACT_CODES[net.output]
    n, k_out, k = Xc.shape[0], net.n_outputs, net.n_classes
    mean = np.empty((n, k))
    std = np.empty((n, k))
    entropy = np.empty(n)
    mutual = np.empty(n)
    width = max(net.layers)
    for j, start in enumerate(range(0, n, MC_BLOCK)):
        Xb = Xc[start : start + MC_BLOCK]
        b = Xb.shape[0]
        group = max(1, min(n_samples, MC_MAX_ELEMENTS // (b * width)))
        # running mean, sum of squared deviations (Chan et al.'s pairwise update) and entropy sum over the
        # samples: memory stays one group of samples whatever n_samples is
        count = 0
        m = np.zeros((b, k))
        M2 = np.zeros((b, k))
        ent_sum = np.zeros(b)
        for s0 in range(0, n_samples, group):
            g = min(group, n_samples - s0)
            A = np.empty((g * b, Xb.shape[1]), dtype=dt)
            A.reshape(g, b, -1)[...] = Xb
            for i, (W, bias) in enumerate(zip(net.weights, net.biases, strict=True)):
                if keeps[i] < 1.0:
                    M = np.empty_like(A)
                    for s in range(g):
                        step = (j << 32) + s0 + s
                        raw.dropout_mask(seed, step, i, thresholds[i], scales[i], M[s * b : (s + 1) * b])
                    A *= M
                elif scales[i] != 1.0:
                    A *= dt.type(scales[i])
                Z = np.empty((g * b, W.shape[0]), dtype=dt)
                raw.forward(A, W, bias, o_code if i == L - 1 else h_code, Z)
                A = Z
            G = output_to_proba(A.reshape(g, b, k_out), net.output)
            gm = G.mean(axis=0)
            gM2 = np.square(G - gm).sum(axis=0)
            tot = count + g
            delta = gm - m
            m += delta * (g / tot)
            M2 += gM2 + np.square(delta) * (count * g / tot)
            count = tot
            ent_sum += _entropy(G).sum(axis=0)
        mean[start : start + b] = m
        std[start : start + b] = np.sqrt(M2 / count)
        H = _entropy(m)
        entropy[start : start + b] = H
        mutual[start : start + b] = np.maximum(H - ent_sum / count, 0.0)  # >= 0 by Jensen
    return MCPrediction(mean=mean, std=std, entropy=entropy, mutual_info=mutual, n_samples=n_samples, seed=seed,
                        dropout=drop, input_dropout=in_drop)  # fmt: skip
