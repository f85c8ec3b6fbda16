"""The kernel contract shared by every backend.

Every backend module (``reference``, ``cython``, ``numba``) exposes the same
functions with the same signatures and semantics; the reference is the spec.
This module holds what they must agree on bit for bit: the integer codes of
activations and losses (compiled kernels switch on them), the valid
output/loss pairs, and the counter-based dropout mask generator's constants.

Kernel set (``A`` is a layer input ``(n_samples, n_in)``, ``W`` is
``(n_out, n_in)``, ``b`` is ``(n_out,)``, all of one floating dtype, C-contiguous)

``forward(A, W, b, act, out=None)``
    ``out = act(A @ W.T + b)``, shape ``(n_samples, n_out)``.
``output_delta(A, y, output, loss, out=None) -> (delta, loss_sum, n_correct)``
    delta of the loss with respect to the output layer's pre-activation,
    straight from integer labels ``y`` (no one-hot matrix):

    * ``mse``: ``g = 2 (A - onehot(y)) / n``; sigmoid: ``g * A (1 - A)``,
      identity: ``g``, softmax: ``A * (g - sum(g * A, axis=1))``.
    * ``ce``: ``(A - onehot(y)) / n`` for softmax (categorical) and sigmoid
      (binary cross-entropy per unit).

    ``loss_sum`` is the data loss summed over samples (float64): for MSE the
    per-sample mean over classes of ``(a - y)^2``, for CE ``-log a_y``
    (softmax) or ``-sum_j [y_j log a_j + (1 - y_j) log(1 - a_j)]`` (sigmoid),
    probabilities clipped to ``[LOG_EPS, 1]`` inside the log.  ``n_correct``
    counts rows whose first arg-max equals the label.
``hidden_delta(D_next, W_next, A, act, mask=None, out=None)``
    ``out = (D_next @ W_next) * mask * act'(A)`` with the derivative written
    from the activation's output ``A`` (before dropout).
``inplace_update(W, b, D, A, lr, l2=0.0, l1=0.0)``
    ``W <- max(0, 1 - lr*l2) * W - lr * l1 * sign(W) - lr * D.T @ A`` and
    ``b <- b - lr * D.sum(0)``; biases are never penalized.
``dropout_mask(seed, step, layer, n_rows, n_units, keep, scale, dtype, out=None)``
    the multiplier matrix ``m * scale`` with ``m`` in {0, 1} drawn by
    :func:`mask_bits` below.
``train_epoch(X, y, order, weights, biases, lrs, *, hidden_act, output_act,
loss, batch_size, l2=0.0, l1=0.0, keep=None, inverted=True, seed=0, step0=0)``
    one epoch: for step ``i`` the rows ``order[i*bs:(i+1)*bs]`` (the last
    batch may be partial) go through gather, forward (with input dropout on
    layer input ``l`` when ``keep[l] < 1``), output delta, then from the top
    layer down: the next-lower delta (using the not-yet-updated ``W``), then
    the update of that layer with learning rate ``lrs[i]``.  Dropout masks
    use step ``step0 + i``.  Returns ``(loss_sum, n_correct)`` over the
    epoch's training batches (measured before each update).
``forward_network(X, weights, biases, hidden_act, output_act)``
    the output activations ``(n_samples, n_classes)``.

Dropout masks (counter-based, identical on every backend)
---------------------------------------------------------
With ``mix64`` the splitmix64 finalizer and ``G = 0x9E3779B97F4A7C15``, all
arithmetic modulo 2**64::

    key      = mix64(mix64(seed + G * (layer + 1)) + G * (step + 1))
    h[r, u]  = mix64(key + G * (r * n_units + u + 1))
    keep[r, u] = (h[r, u] >> 40) < floor(keep * 2**24)

``layer`` is the index of the layer whose *input* is masked (0 = the
network's input, ``l`` = the output of hidden layer ``l``), ``r`` the row
within the minibatch, ``u`` the unit.
"""

from __future__ import annotations

import math

import numpy as np

#: integer codes of the activations, as the compiled kernels switch on them
ACT_CODES: dict[str, int] = {"identity": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "softmax": 4}
#: activations allowed on hidden layers
HIDDEN_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu", "identity")
#: activations allowed on the output layer
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax", "identity")
#: integer codes of the losses
LOSS_CODES: dict[str, int] = {"mse": 0, "ce": 1}
#: (output activation, loss) pairs that have a delta kernel
VALID_OUTPUT_LOSS: frozenset[tuple[str, str]] = frozenset(
    {("sigmoid", "mse"), ("softmax", "mse"), ("identity", "mse"), ("softmax", "ce"), ("sigmoid", "ce")}
)
#: probabilities are clipped to at least this inside the cross-entropy's log
LOG_EPS: float = 1e-12

#: dtypes a network may use
DTYPES: tuple[str, ...] = ("float32", "float64")

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
#: a uniform draw keeps 24 bits of the hash
KEEP_BITS = 24


def keep_threshold(keep: float) -> int:
    """Integer threshold for the 24-bit draw: a unit is kept iff ``(h >> 40) < threshold``."""
    return math.floor(float(keep) * (1 << KEEP_BITS))


def _mix64_int(z: int) -> int:
    """splitmix64 finalizer on one Python int (modulo 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def mask_key(seed: int, step: int, layer: int) -> int:
    """The per-(seed, step, layer) key of the dropout hash, as a Python int in [0, 2**64)."""
    inner = _mix64_int((int(seed) + GOLDEN * (int(layer) + 1)) & MASK64)
    return _mix64_int((inner + GOLDEN * (int(step) + 1)) & MASK64)


def mix64(z: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finalizer on a ``uint64`` array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(MIX1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def mask_bits(seed: int, step: int, layer: int, n_rows: int, n_units: int, keep: float) -> np.ndarray:
    """Boolean keep-mask ``(n_rows, n_units)`` of the counter-based generator."""
    key = np.uint64(mask_key(seed, step, layer))
    counter = np.arange(1, n_rows * n_units + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(key + np.uint64(GOLDEN) * counter)
    return ((h >> np.uint64(40)) < np.uint64(keep_threshold(keep))).reshape(n_rows, n_units)
