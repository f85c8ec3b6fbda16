"""Plots of a training :class:`~fastmlp.history.History` and of an LR range test.

matplotlib is imported only when a function here is called (``pip install
fastmlp[plot]``).  Figures are built with :class:`matplotlib.figure.Figure`
and rendered by the Agg canvas, never through ``pyplot``: saving works
headless and the global matplotlib backend of the caller is left alone.
Each function returns the Figure (it displays itself in Jupyter) and writes a
PNG when given ``path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fastmlp.history import History
    from fastmlp.lr_finder import LRFinderResult

__all__ = ["plot_history", "plot_lr_find"]

#: dots per inch of the saved PNGs
DPI = 110


def _mpl() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'fastmlp[plot]' (or matplotlib)") from exc
    return matplotlib


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig: Any, path: str | os.PathLike[str] | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=DPI, format="png")


def plot_history(history: History, path: str | os.PathLike[str] | None = None, title: str | None = None) -> Any:
    """Loss and accuracy curves of a fit, and the per-iteration learning rate when recorded.

    Panels: training loss (with penalty, and the data loss alone when they
    differ) and validation loss per epoch; training and validation accuracy
    per epoch (for regression, where a fit records no accuracy, the validation
    score, R² by default, when there is one), with the best epoch of early
    stopping marked; the learning
    rate of every minibatch step when a schedule recorded ``history.step_lr``
    (else the per-epoch rate when it changed).

    Parameters
    ----------
    history : History
        The record returned by ``fit`` (at least one epoch).
    path : str or path-like, optional
        Write a PNG there (``.png`` appended when missing; folders created).
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if len(history) == 0:
        raise ValueError("the history has no epochs to plot")
    ep = np.asarray(history.epoch)
    step_lr = history.iteration_lr()
    lr = np.asarray(history.lr)
    show_lr = step_lr.size > 0 or (lr.size > 1 and not np.all(lr == lr[0]))
    show_acc = history.train_acc is not None or history.valid_acc is not None
    show_score = not show_acc and history.valid_score is not None
    n_panels = 1 + (show_acc or show_score) + show_lr
    fig, axes = _new_figure(1, n_panels, ({1: 6.5, 2: 11.0, 3: 15.0}[n_panels], 4.2))
    ax = axes[0]
    ax.plot(ep, history.train_loss, "o-", ms=3, label="train loss")
    if not np.allclose(history.train_loss, history.train_data_loss, rtol=0, atol=0):
        ax.plot(ep, history.train_data_loss, "--", label="train data loss (no penalty)")
    if history.valid_loss is not None:
        ax.plot(ep, history.valid_loss, "s-", ms=3, label="valid loss")
    ax.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    if show_acc:
        ax = axes[1]
        if history.train_acc is not None:
            ax.plot(ep, 100 * np.asarray(history.train_acc), "o-", ms=3, label="train")
        if history.valid_acc is not None:
            ax.plot(ep, 100 * np.asarray(history.valid_acc), "s-", ms=3, label="valid")
        ax.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    elif show_score:
        ax = axes[1]
        ax.plot(ep, np.asarray(history.valid_score), "s-", ms=3, label="valid score")
        ax.set(title="Validation score per epoch", xlabel="epoch", ylabel="score (R² unless fit(score=...))")
    for a in axes[: 1 + (show_acc or show_score)]:
        if history.best_epoch is not None:
            a.axvline(history.best_epoch, color="gray", ls=":", label=f"best epoch {history.best_epoch}")
        if history.stopped_epoch is not None:
            a.axvline(history.stopped_epoch, color="red", ls=":", label=f"stopped after {history.stopped_epoch}")
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize="small")
    if show_lr:
        ax = axes[-1]
        if step_lr.size:
            it = np.arange(1, step_lr.size + 1)
            ax.plot(it, step_lr, lw=1.2, label="lr per iteration")
            ax.set(title="Learning rate per iteration", xlabel="iteration (minibatch step)", ylabel="learning rate")
        else:
            ax.plot(ep, lr, "o-", ms=3, label="lr per epoch")
            ax.set(title="Learning rate per epoch", xlabel="epoch", ylabel="learning rate")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


def plot_lr_find(
    result: LRFinderResult, path: str | os.PathLike[str] | None = None, ax: Any = None, title: str | None = None
) -> Any:
    """Smoothed (and raw) minibatch loss against the learning rate on a log axis, suggestion marked.

    Parameters
    ----------
    result : LRFinderResult
        From :func:`fastmlp.lr_find`.
    path : str or path-like, optional
        Write a PNG there (only when the function made the figure, i.e. ``ax`` is None,
        or also from the axes' figure when given).
    ax : matplotlib Axes, optional
        Draw into these axes instead of a new figure.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if ax is None:
        fig, axes = _new_figure(1, 1, (7.5, 4.8))
        ax = axes[0]
    else:
        fig = ax.get_figure()
    lrs, losses = result.lrs, result.losses
    ax.plot(lrs, result.raw_losses, color="0.75", lw=0.8, label="minibatch loss")
    ax.plot(lrs, losses, color="C0", lw=2, label="smoothed loss")
    ax.set_xscale("log")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggestion (min/2) = {result.suggestion:.3g}")
    ax.plot([result.min_lr], [losses[result.i_min]], "v", color="C3", label=f"minimum at lr = {result.min_lr:.3g}")
    ax.plot([result.steepest], [losses[result.i_steepest]], "o", color="C2", mfc="none", ms=9,
            label=f"steepest descent at lr = {result.steepest:.3g}")  # fmt: skip
    finite = losses[np.isfinite(losses)]
    if finite.size:  # keep the blow-up from flattening the interesting part
        lo, first = float(finite.min()), float(finite[0])
        hi = max(first, lo) + 0.15 * abs(max(first, lo) - lo) + 1e-12
        ax.set_ylim(lo - 0.1 * (hi - lo), hi)
    ax.set(title=title or "Learning-rate range test", xlabel="learning rate (log scale)", ylabel="training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)
    return fig
