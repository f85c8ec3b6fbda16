"""The learning-rate range test ("LR finder") and the lecture's rule.

Train for ``num_iter`` minibatch steps while the learning rate grows
exponentially from ``start`` (1e-5) to ``end`` (10), one minibatch per rate,
recording the loss of each minibatch; then put the weights back.  Plotted
against the rate on a log axis the loss stays flat, falls, runs along the
floor of a valley and turns up (blows up).  The lecture's rule: **find where
the loss turns up and take about half of that rate.**

Made precise, and lag-free:

1. *Smoothing without lag.*  Each step's loss is one noisy minibatch; the curve
   is smoothed with a centred Gaussian kernel on the ``log10(lr)`` axis
   (standard deviation ``smooth`` = 0.1 decade).  A centred kernel does not lag
   behind the raw loss, as an exponential moving average does (one of 0.98 over
   100 steps lags by about two decades), and its width is in decades, not steps,
   so it smooths the same whatever ``num_iter`` is.
2. *The turn.*  The loss has *blown up* once the smoothed loss exceeds
   :data:`BLOWUP` (2) × its minimum after that minimum (the first such rate is
   the *divergence point*).  The rate where it *turns up* is the right end of the
   valley: the last rate before the divergence point at which the smoothed loss
   is still within :data:`VALLEY_TOL` (30 %) of its minimum.  (A flat valley's
   lowest point wanders with the noise, by 5x between runs; its right end,
   where the loss leaves the floor for good, does not.)
3. *The suggestion* is half the turn rate.
4. A loss that never blows up in the range (a bounded loss, e.g. MSE on sigmoid
   outputs, survives large rates once the sweep has warmed the network up) has
   no turn to halve: the suggestion is then half the rate at which the loss
   reached its floor -- the first rate where the smoothed loss has come within
   :data:`FLOOR_TOL` (10 %) of its descent below the chance level (the loss of
   predicting the class frequencies) -- and a warning says so.

On MNIST (784-50-10 sigmoid/MSE, 784-256-10 relu/softmax-CE, 784-256-256-10
tanh/softmax-CE) the suggestion moves by less than 1.5x across ``num_iter`` in
{100, 300, 1000}, and 5 epochs at it reach at least 98 % of the best test
accuracy over the grid {0.01, 0.03, 0.1, 0.3, 1, 3} (``tests/test_lr_find.py``,
``docs/lr_finder.md``).  :attr:`LRFinderResult.steepest`, the rate of the
steepest descent, is given as well (a more conservative choice).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fastmlp import _validation as V
from fastmlp.backends.contract import OptimizerState, plan_epoch
from fastmlp.optimizers import Optimizer, get_optimizer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastmlp.network import Network

__all__ = ["LRFinderResult", "lr_find", "smooth_losses"]

#: the loss has blown up once the smoothed loss exceeds this multiple of its minimum (after the minimum)
BLOWUP = 2.0
#: the turn is the last rate before the blow-up whose smoothed loss is within this fraction of the minimum
VALLEY_TOL = 0.3
#: without a blow-up: the floor starts where the loss is within this fraction of its descent below chance
FLOOR_TOL = 0.1
#: losses below this fraction of the starting (or chance) loss count as zero for the blow-up test
ZERO_LOSS = 0.01
#: the steepest-descent search leaves out the first this-many decades of the sweep (a handful of noisy batches)
STEEPEST_SKIP_DECADES = 0.5


def smooth_losses(lrs: np.ndarray, losses: np.ndarray, width: float) -> np.ndarray:
    """Centred Gaussian smoothing of ``losses`` on the ``log10(lrs)`` axis (no lag).

    Parameters
    ----------
    lrs : ndarray (n,)
        Positive, increasing rates.
    losses : ndarray (n,)
        Finite losses.
    width : float
        Standard deviation of the kernel in decades of the rate (0: no smoothing).

    Returns
    -------
    ndarray (n,)
        ``s_i = Σ_j w_ij ℓ_j / Σ_j w_ij`` with ``w_ij = exp(-½ ((log10 lr_i − log10 lr_j) / width)²)``
        (neighbours beyond four widths are left out).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if width == 0 or losses.size < 2:
        return losses.copy()
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    out = np.empty_like(losses)
    reach = 4 * width + 1e-9  # a neighbour exactly four widths away counts on both sides alike
    lo = np.searchsorted(x, x - reach, side="left")
    hi = np.searchsorted(x, x + reach, side="right")
    for i in range(x.size):
        w = np.exp(-0.5 * ((x[lo[i] : hi[i]] - x[i]) / width) ** 2)
        out[i] = float(np.dot(w, losses[lo[i] : hi[i]]) / w.sum())
    return out


@dataclass(repr=False)
class LRFinderResult:
    """Outcome of :func:`lr_find`; unpacks as ``lrs, losses`` (the smoothed losses).

    Attributes
    ----------
    lrs : ndarray (n_iter,)
        Learning rate of each step taken.
    raw_losses : ndarray (n_iter,)
        The loss of each step's minibatch (before its update).
    losses : ndarray (n_iter,)
        The lag-free smoothed losses (:func:`smooth_losses` of ``raw_losses``).
    stopped_early : bool
        The sweep stopped before ``end`` because the loss diverged (exceeded
        ``diverge`` × its lowest running median, or became non-finite).
    chance : float or None
        The loss of predicting the class frequencies (``None`` for regression).
    i_min, min_lr : int, float
        Index and rate of the minimum of the smoothed loss.
    turned : bool
        The loss blew up after its minimum (the smoothed loss exceeded
        :data:`BLOWUP` × the minimum), so the lecture's rule applies.
    divergence_lr : float or None
        The divergence point: the first rate after the minimum where the
        smoothed loss exceeds :data:`BLOWUP` × its minimum (``None`` if it never did).
    turn_lr : float
        Where the loss turns up: the last rate before the divergence point whose
        smoothed loss is within :data:`VALLEY_TOL` of the minimum.  When the loss
        never turned, the rate where it reached its floor instead (see the module
        docstring).
    suggestion : float
        ``turn_lr / 2``: the lecture's rule.
    steepest : float
        Rate of the steepest descent of the smoothed loss against ``log10(lr)``
        before the minimum (the first :data:`STEEPEST_SKIP_DECADES` decades left out).
    """

    lrs: np.ndarray
    raw_losses: np.ndarray
    stopped_early: bool = False
    smooth: float = 0.1
    chance: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lrs = np.asarray(self.lrs, dtype=np.float64)
        self.raw_losses = np.asarray(self.raw_losses, dtype=np.float64)
        if self.lrs.size == 0 or self.lrs.shape != self.raw_losses.shape:
            raise ValueError("an LR range test needs at least one step, with one loss per rate")
        lrs = self.lrs
        finite = np.isfinite(self.raw_losses)
        n_ok = int(np.argmin(finite)) if not finite.all() else finite.size  # a non-finite loss ends the usable part
        raw = self.raw_losses[: max(n_ok, 1)]
        s = smooth_losses(lrs[: raw.size], np.where(np.isfinite(raw), raw, np.finfo(np.float64).max), self.smooth)
        self.losses = np.concatenate([s, np.full(lrs.size - s.size, np.inf)])
        i = int(np.argmin(s))
        m = float(s[i])
        self.i_min, self.min_lr = i, float(lrs[i])
        ref = self.chance if self.chance is not None and self.chance > m else float(s[0])
        # a loss that went to (nearly) zero blows up when it rises well above a hundredth of where it started
        m_up = max(m, ZERO_LOSS * ref)
        up = np.nonzero(s[i:] > BLOWUP * m_up)[0]
        if n_ok < lrs.size and not up.size:  # a non-finite loss right after the minimum: that is the blow-up
            up = np.array([s.size - i])
        self.turned = bool(up.size)
        if self.turned:
            k = i + int(up[0])
            self.i_div: int | None = min(k, lrs.size - 1)
            self.divergence_lr: float | None = float(lrs[self.i_div])
            ok = np.nonzero(s[i:k] <= (1.0 + VALLEY_TOL) * m_up)[0]
            self.i_turn = i + int(ok[-1])
        else:
            self.i_div, self.divergence_lr = None, None
            self.i_turn = int(np.argmax(s <= m + FLOOR_TOL * (ref - m))) if ref > m else i
        self.turn_lr = float(lrs[self.i_turn])
        self.suggestion = self.turn_lr / 2.0
        x = np.log10(lrs[: i + 1])
        first = int(np.searchsorted(x, x[0] + STEEPEST_SKIP_DECADES)) if x.size else 0
        if i - first >= 2:
            slope = np.gradient(s[first : i + 1], x[first:])
            self.i_steepest = first + int(np.argmin(slope))
        else:
            self.i_steepest = i
        self.steepest = float(lrs[self.i_steepest])

    @property
    def diverged(self) -> bool:
        """The loss diverged: it blew up after its minimum, or the sweep had to stop early."""
        return self.turned or self.stopped_early

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.lrs, self.losses))

    def __len__(self) -> int:
        return int(self.lrs.size)

    def plot(self, path: str | os.PathLike[str] | None = None, ax: Any = None) -> Any:
        """Raw and smoothed loss against the rate (log axis), suggestion, divergence and steepest descent marked.

        See :func:`fastmlp.plotting.plot_lr_find`; returns the matplotlib Figure (Jupyter shows it).
        """
        from fastmlp.plotting import plot_lr_find

        return plot_lr_find(self, path=path, ax=ax)

    def __repr__(self) -> str:
        div = "none" if self.divergence_lr is None else f"{self.divergence_lr:.4g}"
        return (f"LRFinderResult({self.lrs.size} steps, lr {self.lrs[0]:.3g}..{self.lrs[-1]:.3g}, "
                f"suggestion={self.suggestion:.4g}, turn_lr={self.turn_lr:.4g}, divergence_lr={div}, "
                f"min_lr={self.min_lr:.4g}, steepest={self.steepest:.4g}, turned={self.turned})")  # fmt: skip


def _chance_loss(net: Network, Y: np.ndarray, target: str) -> float | None:
    """Mean loss of predicting the mean target (the class frequencies); None for regression."""
    from fastmlp.backends import reference as _ref
    from fastmlp.backends.contract import ACT_CODES, LOSS_CODES

    if net.is_regressor or (target == "dense" and net.output in ("identity", "exp")):
        return None
    T = _ref.target_matrix(Y[:10_000], net.n_outputs, net.dtype).astype(np.float64)
    A = np.ascontiguousarray(np.broadcast_to(T.mean(axis=0), T.shape))
    if net.output == "softmax":
        A = A / max(float(A[0].sum()), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        loss = float(np.mean(_ref.sample_losses(A, T, ACT_CODES[net.output], LOSS_CODES[net.loss])))
    return loss if math.isfinite(loss) and loss > 0 else None


def lr_find(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    start: float = 1e-5,
    end: float = 10.0,
    num_iter: int = 100,
    batch_size: int | None = 100,
    smooth: float = 0.1,
    diverge: float = 4.0,
    seed: int | None = None,
    optimizer: str | Optimizer | None = None,
    warn: bool = True,
) -> LRFinderResult:
    """Learning-rate range test: an exponential sweep of one minibatch step per rate, and the lecture's rule.

    Step ``i`` trains one minibatch (rows in a shuffled order, reshuffled after
    each pass over the data) at ``lr_i = start · (end/start)^(i/(num_iter−1))``
    through the backend's compiled epoch (no dropout, no penalty; the data are
    validated once) and records that minibatch's loss before its update.  The
    sweep stops early once the running median of the last few losses exceeds
    ``diverge`` × its lowest value (or a loss is not finite).  The network's
    weights, biases and step counter are restored afterwards (also on error); its
    optimizer state, history and epoch count are never touched.  The suggestion
    is computed as the module docstring describes: half the rate where the
    lag-free smoothed loss turns up.

    Parameters
    ----------
    net : Network
    X : array-like (n_samples, n_features)
        Scaled as the fit will see it (the suggestion is for that data).
    y : array-like
        Class labels ``(n_samples,)`` or dense targets, as :meth:`fastmlp.Network.fit` takes them.
    start, end : float
        First and last learning rate of the sweep, ``0 < start < end <= 1e6`` (the lecture's 1e-5 and 10).
    num_iter : int
        Steps of the full sweep (>= 2); the suggestion depends little on it.
    batch_size : int or None
        Rows per step (``None``: all rows); use the fit's.
    smooth : float
        Width of the centred smoothing, in decades of the rate, in ``[0, 0.5]`` (0: none).
    diverge : float
        Stop when the running median loss exceeds this multiple of its lowest value
        (> :data:`BLOWUP`, so that the blow-up the rule looks for is recorded).
    seed : int, optional
        Seed of the row order.
    optimizer : str or Optimizer, optional
        Sweep with the fit's optimizer (``'adam'``, ``Adam(...)``, ...; fresh
        state); default plain SGD, the lecture's.
    warn : bool
        Warn (``RuntimeWarning``) when the loss never blew up in the range, so that
        the suggestion comes from the floor of the loss instead of its turn.

    Returns
    -------
    LRFinderResult
        ``suggestion``, ``turn_lr``, ``divergence_lr``, ``steepest``, the raw and
        smoothed ``losses`` and ``plot()``.

    Examples
    --------
    >>> res = fastmlp.lr_find(net, X_train, y_train)  # doctest: +SKIP
    >>> net.fit(X_train, y_train, epochs=5, lr=res.suggestion)  # doctest: +SKIP
    """
    start = V.check_float(start, "start", low=0.0, low_open=True)
    end = V.check_float(end, "end", low=start, low_open=True)
    if end > 1e6:
        raise ValueError(f"end must be at most 1e6 (a learning rate past which every network diverges), got {end:g}; "
                         "the range test's usual end is 10")  # fmt: skip
    num_iter = V.check_int(num_iter, "num_iter", minimum=2)
    smooth = V.check_float(smooth, "smooth (the smoothing width in decades of the rate)", low=0.0, high=0.5)
    diverge = V.check_float(diverge, "diverge", low=BLOWUP, low_open=True)
    seed = V.check_seed(seed)
    opt = get_optimizer(optimizer)
    from fastmlp.training import as_targets

    net.check_parameters()
    Xc = V.as_features(X, net.dtype, "X", n_features=net.n_features)
    target, Y = as_targets(net, y, Xc.shape[0], "y")
    n = Xc.shape[0]
    bs = n if batch_size is None else min(V.check_int(batch_size, "batch_size", minimum=1), n)

    lrs = start * (end / start) ** (np.arange(num_iter) / (num_iter - 1))
    rng = np.random.default_rng(seed)
    plan = plan_epoch(net.layers, net.dtype, batch_size=bs, hidden=net.activation, output=net.output, loss=net.loss,
                      target=target, l2=opt.weight_decay, **opt.plan_fields())  # fmt: skip
    state = OptimizerState.zeros(plan.optimizer, net.layers, net.dtype) if plan.n_slots else None
    epochs = net.backend.prepare(Xc, Y, plan)
    saved, saved_step = net.get_params(), net.step_
    window = max(3, math.ceil(num_iter / 60))  # about a tenth of a decade of the default sweep
    raw_losses: list[float] = []
    lowest, stopped, first = np.inf, False, None
    order = rng.permutation(n)
    pos = 0
    try:
        for lr in lrs:
            if pos + bs > n:
                order, pos = rng.permutation(n), 0
            idx = order[pos : pos + bs]
            pos += bs
            with np.errstate(over="ignore", invalid="ignore"):
                stats = epochs(idx, (net.weights, net.biases), state, float(lr))  # one minibatch: one step
            loss = stats.loss_sum / bs
            raw_losses.append(float(loss))
            if not math.isfinite(loss):
                stopped = True
                break
            if len(raw_losses) >= window:
                med = float(np.median(raw_losses[-window:]))
                if first is None:
                    first = med
                if med > diverge * max(lowest, ZERO_LOSS * first):
                    stopped = True
                    break
                lowest = min(lowest, med)
            # the next step needs finite parameters (the kernels assume them): a blown-up weight ends the sweep
            if not all(V.all_finite(a) for a in (*net.weights, *net.biases, *(state.arrays() if state else ()))):
                stopped = True
                break
    finally:
        net.set_params(*saved)
        net.step_ = saved_step
    params = {"start": start, "end": end, "num_iter": num_iter, "batch_size": bs, "smooth": smooth,
              "diverge": diverge, "seed": seed, "optimizer": repr(opt)}  # fmt: skip
    result = LRFinderResult(lrs[: len(raw_losses)], np.array(raw_losses), stopped, smooth, _chance_loss(net, Y, target),
                            params)  # fmt: skip
    if warn and not result.turned:
        warnings.warn(
            f"lr_find: the loss did not turn up (blow up) between lr={result.lrs[0]:.3g} and {result.lrs[-1]:.3g}, "
            f"so there is no turn to halve; suggestion={result.suggestion:.3g} is half the rate where the loss reached "
            f"its floor ({result.turn_lr:.3g}). Bounded losses (MSE on sigmoid outputs) may never blow up",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
