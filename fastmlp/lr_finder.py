"""The learning-rate range test ("LR finder").

Train for ``num_iter`` minibatch steps while the learning rate grows
exponentially from ``start`` to ``end``, one step per rate, recording the loss
of each minibatch; then put the weights back.  Plotted against the rate on a
log axis, the (smoothed) loss first stays flat, then falls, reaches a
minimum and blows up.  The lecture's rule: take about **half the learning rate
at which the loss stops falling and starts to blow up**, made precise here as
half the rate at the minimum of the smoothed loss (:attr:`LRFinderResult.suggestion`).
The steepest-descent rule (the rate where the smoothed loss falls fastest per
decade, before the minimum) is given as :attr:`LRFinderResult.steepest`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends.contract import plan_epoch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastmlp.network import Network

__all__ = ["LRFinderResult", "lr_find"]

#: the loss has "turned" when, after its minimum, the smoothed loss rose by this fraction of the minimum
TURN_RISE = 0.1
#: the steepest-descent search skips this many first steps (the bias-corrected average of few, noisy batches)
STEEPEST_SKIP = 10


@dataclass(repr=False)
class LRFinderResult:
    """Outcome of :func:`lr_find`; unpacks as ``lrs, losses`` (the smoothed losses).

    Attributes
    ----------
    lrs : ndarray (n_iter,)
        Learning rate of each step taken.
    losses : ndarray (n_iter,)
        Exponentially smoothed, bias-corrected minibatch loss after each step's
        forward pass (the loss of the minibatch before its update).
    raw_losses : ndarray (n_iter,)
        The unsmoothed minibatch losses.
    diverged : bool
        The sweep stopped early because the smoothed loss exceeded
        ``diverge`` × its minimum (or became non-finite).
    min_lr : float
        Rate at the minimum of the smoothed loss.
    suggestion : float
        ``min_lr / 2``: the lecture's rule, half the rate at which the loss
        stops falling and blows up.
    steepest : float
        Rate of the steepest descent of the smoothed loss against ``log10(lr)``
        before the minimum (an alternative, usually more conservative, choice);
        the first :data:`STEEPEST_SKIP` steps are left out of that search.
    turned : bool
        The smoothed loss rose after its minimum by at least
        :data:`TURN_RISE` × the minimum (or the sweep diverged).  When
        ``False`` the loss was still falling, or flat, at the end of the
        sweep, and ``suggestion`` (half the last rate) is not the lecture's
        rule but an artefact of the range: raise ``end``, or use ``steepest``.
        (Bounded losses, e.g. MSE on sigmoid outputs, may never turn.)
    """

    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    diverged: bool
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lrs.size == 0:
            raise ValueError("an LR range test needs at least one step")
        losses = np.where(np.isfinite(self.losses), self.losses, np.inf)
        self.i_min = int(np.argmin(losses))
        self.min_lr = float(self.lrs[self.i_min])
        self.suggestion = self.min_lr / 2.0
        after = losses[self.i_min :]
        self.turned = bool(self.diverged or after.max() >= (1.0 + TURN_RISE) * losses[self.i_min])
        skip = min(STEEPEST_SKIP, self.i_min // 2)
        if self.i_min - skip >= 1:
            part = slice(skip, self.i_min + 1)
            slope = np.gradient(losses[part], np.log10(self.lrs[part]))
            self.i_steepest = skip + int(np.argmin(slope))
        else:
            self.i_steepest = self.i_min
        self.steepest = float(self.lrs[self.i_steepest])

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.lrs, self.losses))

    def __len__(self) -> int:
        return int(self.lrs.size)

    def plot(self, path: str | os.PathLike[str] | None = None, ax: Any = None) -> Any:
        """Loss against learning rate on a log axis, with the suggestion marked.

        See :func:`fastmlp.plotting.plot_lr_find`; returns the matplotlib Figure.
        """
        from fastmlp.plotting import plot_lr_find

        return plot_lr_find(self, path=path, ax=ax)

    def __repr__(self) -> str:
        return (f"LRFinderResult({self.lrs.size} steps, lr {self.lrs[0]:.3g}..{self.lrs[-1]:.3g}, "
                f"min_lr={self.min_lr:.4g}, suggestion={self.suggestion:.4g}, steepest={self.steepest:.4g}, "
                f"turned={self.turned}, diverged={self.diverged})")  # fmt: skip


def lr_find(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    start: float = 1e-5,
    end: float = 10.0,
    num_iter: int = 100,
    batch_size: int | None = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
    seed: int | None = None,
) -> LRFinderResult:
    """Learning-rate range test: an exponential sweep of one minibatch step per rate.

    Step ``i`` trains one minibatch (rows drawn in a shuffled order, reshuffled
    after each pass over the data) with ``lr_i = start · (end/start)^(i/(num_iter−1))``
    through the backend's compiled epoch (plain SGD, no dropout, no penalty; the
    data are validated once).  The loss ``ℓ_i`` of that
    minibatch (before its update) is smoothed as
    ``m_i = smooth·m_{i−1} + (1−smooth)·ℓ_i``, ``m_0' = 0``, and bias-corrected,
    ``s_i = m_i / (1 − smooth^(i+1))``.  The sweep stops after the first step whose
    ``s_i`` exceeds ``diverge · min_{j<=i} s_j`` or is not finite.  The network's
    weights, biases and step counter are restored afterwards (also on error); its
    optimizer state, history and epoch count are never touched.

    Parameters
    ----------
    net : Network
    X : array-like (n_samples, n_features)
    y : array-like
        Class labels ``(n_samples,)`` or dense targets, as :meth:`fastmlp.Network.fit` takes them.
    start, end : float
        First and last learning rate of the sweep, ``0 < start < end``.
    num_iter : int
        Steps of the full sweep (>= 2).
    batch_size : int or None
        Rows per step (``None``: all rows).
    smooth : float
        Smoothing factor of the exponential average, in ``[0, 1)`` (0: none).
    diverge : float
        Stop when the smoothed loss exceeds this multiple of its minimum (> 1).
    seed : int, optional
        Seed of the row order.

    Returns
    -------
    LRFinderResult
        ``lrs``, smoothed ``losses``, ``suggestion``, ``steepest`` and ``plot()``.
    """
    start = V.check_float(start, "start", low=0.0, low_open=True)
    end = V.check_float(end, "end", low=start, low_open=True)
    num_iter = V.check_int(num_iter, "num_iter", minimum=2)
    smooth = V.check_float(smooth, "smooth", low=0.0, high=1.0, high_open=True)
    diverge = V.check_float(diverge, "diverge", low=1.0, low_open=True)
    seed = V.check_seed(seed)
    from fastmlp.training import as_targets

    net.check_parameters()
    Xc = V.as_features(X, net.dtype, "X", n_features=net.n_features)
    target, Y = as_targets(net, y, Xc.shape[0], "y")
    n = Xc.shape[0]
    bs = n if batch_size is None else min(V.check_int(batch_size, "batch_size", minimum=1), n)

    lrs = start * (end / start) ** (np.arange(num_iter) / (num_iter - 1))
    rng = np.random.default_rng(seed)
    plan = plan_epoch(net.layers, net.dtype, batch_size=bs, hidden=net.activation, output=net.output, loss=net.loss,
                      target=target)  # fmt: skip
    epochs = net.backend.prepare(Xc, Y, plan)
    saved, saved_step = net.get_params(), net.step_
    taken: list[float] = []
    raw_losses: list[float] = []
    smoothed: list[float] = []
    avg, best, diverged = 0.0, np.inf, False
    order = rng.permutation(n)
    pos = 0
    try:
        for i, lr in enumerate(lrs):
            if pos + bs > n:
                order, pos = rng.permutation(n), 0
            idx = order[pos : pos + bs]
            pos += bs
            with np.errstate(over="ignore", invalid="ignore"):
                stats = epochs(idx, (net.weights, net.biases), None, float(lr))  # one minibatch: one step
            loss = stats.loss_sum / bs
            avg = smooth * avg + (1.0 - smooth) * loss
            s = avg / (1.0 - smooth ** (i + 1))
            taken.append(float(lr))
            raw_losses.append(loss)
            smoothed.append(s)
            if not np.isfinite(s) or s > diverge * best:
                diverged = True
                break
            best = min(best, s)
            # the next step needs finite parameters (the kernels assume them): a blown-up weight ends the sweep
            if not all(V.all_finite(a) for a in (*net.weights, *net.biases)):
                diverged = True
                break
    finally:
        net.set_params(*saved)
        net.step_ = saved_step
    params = {"start": start, "end": end, "num_iter": num_iter, "batch_size": bs, "smooth": smooth,
              "diverge": diverge, "seed": seed}  # fmt: skip
    result = LRFinderResult(np.array(taken), np.array(smoothed), np.array(raw_losses), diverged, params)
    if not result.turned:
        warnings.warn(
            f"lr_find: the smoothed loss did not rise after its minimum up to lr={result.lrs[-1]:.3g}, so the "
            f"'half the rate where the loss blows up' rule does not apply (suggestion={result.suggestion:.3g} is "
            f"half the rate of the lowest loss seen); raise end, or use .steepest={result.steepest:.3g}",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
