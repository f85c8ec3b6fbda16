"""Plots of a training :class:`~fastmlp.history.History` and of an LR range test.

matplotlib is imported only when a function here is called (``pip install
fastmlp[plot]``).  Figures are built with :class:`matplotlib.figure.Figure`
and rendered by the Agg canvas, never through ``pyplot``: saving works
headless and the global matplotlib backend of the caller is left alone.
Each function returns the Figure and writes a PNG when given ``path``.  The
Figure has a ``_repr_png_``, so Jupyter renders it when it is a cell's last
expression with no ``%matplotlib`` magic and no ``pyplot`` (elsewhere in a cell,
``IPython.display.display(fig)``); a script shows nothing and opens no window.
"""

from __future__ import annotations

import io
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


_FIGURE_CLASS: Any = None


def _figure_class() -> Any:
    """A matplotlib Figure that renders itself as PNG in Jupyter (made once, when matplotlib is first needed)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        from matplotlib.figure import Figure

        class NotebookFigure(Figure):
            """A :class:`matplotlib.figure.Figure` with ``_repr_png_``: IPython displays it without a magic."""

            def _repr_png_(self) -> bytes:
                buf = io.BytesIO()
                self.savefig(buf, format="png", dpi=DPI)
                return buf.getvalue()

        NotebookFigure.__module__ = __name__
        NotebookFigure.__qualname__ = "NotebookFigure"
        _FIGURE_CLASS = NotebookFigure
    return _FIGURE_CLASS


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure_class()(figsize=size, layout="constrained")
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
        Jupyter shows it when it is a cell's last expression.
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
    """Raw and smoothed minibatch loss against the learning rate, with the rule's points marked.

    Both curves are drawn whole and in frame (a log loss axis when they span more
    than a decade, so that the valley stays visible beside the blow-up), with the
    suggestion (half the turn), the turn, the divergence point and the steepest
    descent marked, and the chance level (the loss of predicting the class
    frequencies) as a reference line.

    Parameters
    ----------
    result : LRFinderResult
        From :func:`fastmlp.lr_find`.
    path : str or path-like, optional
        Write a PNG there (``.png`` appended when missing; folders created).
    ax : matplotlib Axes, optional
        Draw into these axes instead of a new figure.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Jupyter shows it when it is a cell's last expression.
    """
    if ax is None:
        fig, axes = _new_figure(1, 1, (7.5, 4.8))
        ax = axes[0]
    else:
        fig = ax.get_figure()
    lrs, raw, s = result.lrs, result.raw_losses, result.losses
    ok_raw, ok_s = np.isfinite(raw), np.isfinite(s)
    ax.plot(lrs[ok_raw], raw[ok_raw], color="0.6", lw=0.8, alpha=0.8, label="minibatch loss (raw)")
    ax.plot(lrs[ok_s], s[ok_s], color="C0", lw=2, label=f"smoothed (centred, {result.smooth:g} decade)")
    ax.set_xscale("log")
    ax.axvline(result.suggestion, color="C3", ls="--", lw=1.5, label=f"suggestion = turn / 2 = {result.suggestion:.3g}")
    turn_label = "turn (loss turns up)" if result.turned else "floor reached (no turn)"
    ax.plot([result.turn_lr], [s[result.i_turn]], "^", color="C3", ms=8, label=f"{turn_label} at {result.turn_lr:.3g}")
    if result.divergence_lr is not None and result.i_div is not None:
        y_div = s[result.i_div] if np.isfinite(s[result.i_div]) else float(np.nanmax(s[ok_s]))
        ax.plot([result.divergence_lr], [y_div], "X", color="k", ms=8,
                label=f"divergence at {result.divergence_lr:.3g}")  # fmt: skip
    ax.plot([result.steepest], [s[result.i_steepest]], "o", color="C2", mfc="none", ms=9, mew=2,
            label=f"steepest descent at {result.steepest:.3g}")  # fmt: skip
    if result.chance is not None:
        ax.axhline(result.chance, color="0.4", ls=":", lw=1, label=f"chance level {result.chance:.3g}")
    vals = np.concatenate([raw[ok_raw], s[ok_s]] + ([np.array([result.chance])] if result.chance else []))
    vals = vals[vals > 0] if (vals > 0).any() else vals
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.15, hi * 1.15)
        else:
            pad = 0.05 * (hi - lo) + 1e-12
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(lrs[0] / 1.2, lrs[-1] * 1.2)
    ax.set(title=title or "Learning-rate range test", xlabel="learning rate (log scale)", ylabel="training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)
    return fig
