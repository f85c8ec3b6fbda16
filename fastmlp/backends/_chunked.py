"""Minibatches too large for one compiled step's buffers, run in row chunks.

A compiled step gathers its rows into work buffers: every layer's input and
output activation and its delta, ``rows x (2 sum(sizes) + ...)`` elements.
For a full-batch fit of millions of rows that is a copy of ``X`` and more.
When a minibatch's buffers would exceed :data:`CHUNK_BYTES`, its gradient is
computed chunk by chunk with the backend's own ``gradient`` epoch (rows of
at most :func:`chunk_rows`, the same count for every backend, set by the
shape and dtype only), summed in float64 with the chunks' weight sums
(``G = sum_c (s_c / s) G_c``: every delta of the contract is linear in
``c_i = w_i / s``), and applied once by the optimizer as the reference
defines it.  The ``alpha`` penalty is added once (``alpha / s * W``), from
the weights before the step.  Memory then depends on the chunk, not on the
minibatch.

Dropout masks are indexed by a row's place in its minibatch, which the
compiled kernels number from the chunk's first row: the chunks of a plan
with dropout run through the NumPy reference instead, with their rows
numbered from the chunk's place (``row0``), so the masks are the contract's
(documented in ``docs/reliability.md``).
"""

from __future__ import annotations

import numpy as np

from . import reference as _ref
from .contract import EpochPlan, OptimizerState

#: a minibatch whose compiled step would allocate more than this many bytes of work buffers runs in chunks
CHUNK_BYTES = 256 * 2**20


def row_bytes(plan: EpochPlan) -> int:
    """Work-buffer bytes a compiled step allocates per row of its minibatch (activations, deltas, targets)."""
    sizes = plan.sizes
    return (sum(sizes) + sum(sizes[1:]) + sizes[-1]) * np.dtype(plan.dtype).itemsize


def chunk_rows(plan: EpochPlan) -> int:
    """Rows of one chunk: the most whose work buffers fit :data:`CHUNK_BYTES` (at least 1)."""
    return max(1, CHUNK_BYTES // row_bytes(plan))


def needs_chunks(plan: EpochPlan, n_used: int) -> bool:
    """Whether an epoch of ``plan`` over ``n_used`` rows runs its minibatches in chunks."""
    return min(plan.batch_size, n_used) > chunk_rows(plan)


def chunked_epoch(raw, X: np.ndarray, Y: np.ndarray, order: np.ndarray, weights: list[np.ndarray],
                  biases: list[np.ndarray], state: OptimizerState, lrs: np.ndarray, plan: EpochPlan, step0: int,
                  sw: np.ndarray | None) -> tuple[float, float, int]:  # fmt: skip
    """One epoch as the contract defines it, each minibatch's gradient summed over row chunks.

    Takes the arguments of a raw backend's ``train_epoch`` (validated by the
    caller) and returns ``(loss_sum, penalty_sum, n_correct)``.
    """
    C = chunk_rows(plan)
    gplan = plan.replace(optimizer="gradient", alpha=0.0, batch_size=C)
    grads = OptimizerState.zeros("gradient", plan.sizes, plan.dtype)
    dt = np.dtype(plan.dtype)
    L = len(weights)
    bs = plan.batch_size
    n = order.shape[0]
    loss_sum, pen_sum, correct = 0.0, 0.0, 0
    for step, start in enumerate(range(0, n, bs)):
        idx = order[start : start + bs]
        nb = idx.shape[0]
        s = float(nb) if sw is None else float(np.sum(sw[idx]))
        gW = [np.zeros(W.shape) for W in weights]
        gb = [np.zeros(b.shape) for b in biases]
        step_loss = 0.0  # sum of w_i l_i over the minibatch
        for c0 in range(0, nb, C):
            cidx = np.ascontiguousarray(idx[c0 : c0 + C])
            n_c = cidx.shape[0]
            s_c = float(n_c) if sw is None else float(np.sum(sw[cidx]))
            # a chunk without weight adds nothing but its correct rows (run unweighted: s_c = 0 would divide)
            csw = sw if s_c > 0.0 else None
            if plan.has_dropout:  # masks numbered from the chunk's place in its minibatch
                ls, _, nc = _ref.train_epoch(X, Y, cidx, weights, biases, grads, np.zeros(1), gplan, step0 + step, csw,
                                             row0=c0)  # fmt: skip
            else:
                ls, _, nc = raw.train_epoch(X, Y, cidx, weights, biases, grads, np.zeros(1), gplan, step0 + step,
                                            csw)  # fmt: skip
            correct += int(nc)
            step_loss += float(ls) if sw is None else float(ls) * s_c / n_c
            f = s_c / s
            if f == 0.0:
                continue
            for i in range(L):
                gW[i] += f * grads.weights[0][i]
                gb[i] += f * grads.biases[0][i]
        loss_sum += step_loss if sw is None else nb * step_loss / s
        if plan.alpha:
            sq = sum(float(np.dot(v, v)) for v in (W.ravel().astype(np.float64) for W in weights))
            pen_sum += nb * (0.5 * plan.alpha * sq / s)
            for i in range(L):
                gW[i] += (plan.alpha / s) * weights[i]
        _ref.apply_step(weights, biases, state, [g.astype(dt) for g in gW], [g.astype(dt) for g in gb], plan,
                        float(lrs[step]), state.t + step + 1)  # fmt: skip
    if plan.optimizer != "gradient":
        state.t += plan.n_steps(n)
    return loss_sum, pen_sum, correct

