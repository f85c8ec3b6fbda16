"""Progress of a fit, the way Keras shows it: ``verbose=1`` a bar per epoch, ``2`` one line per epoch, ``0`` nothing.

``verbose=1`` draws a ``tqdm.auto`` bar for each epoch: a text bar on a
terminal (on stderr), an ipywidgets bar in Jupyter.  It counts minibatch steps
and shows the running training loss and accuracy, then, once the epoch is
evaluated, the validation numbers; each epoch's finished bar stays on screen.

The compiled epoch runs every minibatch in one call, so a bar cannot move step
by step.  With a bar the fit therefore runs an epoch in a few *chunks* of
consecutive steps, each one compiled call (same rows, same rates, same dropout
masks, same weights as one call: the steps do not depend on how they are
grouped).  A call has a fixed cost besides its steps (checks of the parameters,
the kernel's set-up: from well under a millisecond for 784-256-10 to ~0.15 s for
784-1024-1024-10 on the Cython backend), so the chunk size is planned from the
calls' measured times ``t = F + S·steps`` (least squares over this fit's calls;
the first epoch starts with a short probe so that both are known): a chunk takes
at least :data:`CHUNK_SECONDS` and at least ``(1/OVERHEAD - 1)·F/S`` steps, so the
extra calls cost at most :data:`OVERHEAD` (1 %) of an epoch; an epoch shorter than
two chunks runs in one call and its bar fills at once.  ``verbose=0`` and
``verbose=2`` never chunk.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fastmlp.history import History

__all__ = ["CHUNK_SECONDS", "EpochProgress", "epoch_line"]

#: wall time a chunk of an epoch should take when a bar is shown
CHUNK_SECONDS = 0.25
#: the most chunks an epoch is cut into
MAX_CHUNKS = 100
#: the first epoch (no timing yet) starts with a probe of this fraction of its steps
PROBE_FRACTION = 1 / 50
#: the most the extra calls of a chunked epoch may cost, as a fraction of its time
OVERHEAD = 0.01


def epoch_line(hist: History, total: int) -> str:
    """The one line per epoch of ``verbose=2`` (the classic notebook's format, plus the validation loss)."""
    e = hist.epoch[-1]
    width = max(3, len(str(total)))
    line = f"Epoch: {e:0{width}d}/{total:0{width}d} | Train loss: {hist.train_loss[-1]:.4f}"
    if hist.train_acc is not None:
        line += f" | Train Acc: {100 * hist.train_acc[-1]:.2f}%"
    if hist.valid_loss is not None:
        line += f" | Valid loss: {hist.valid_loss[-1]:.4f}"
        if hist.valid_acc is not None:
            line += f" | Valid Acc: {100 * hist.valid_acc[-1]:.2f}%"
        else:
            line += f" | Valid score: {hist.valid_score[-1]:.4f}"  # type: ignore[index]
    line += f" | {hist.seconds[-1]:.2f}s"
    return line


def _tqdm() -> Any:
    """``tqdm.auto.tqdm`` (widgets in Jupyter, text elsewhere), or None when tqdm cannot be imported."""
    try:
        import warnings

        with warnings.catch_warnings():  # "IProgress not found": tqdm.auto falls back to text by itself
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm


class EpochProgress:
    """What a fit shows while it runs, for ``verbose`` 0, 1 or 2.

    Parameters
    ----------
    verbose : int
        0 nothing, 1 a bar per epoch, 2 one line per epoch.
    total : int
        The last epoch number this fit reaches (epochs continue across fits).
    n_steps : int
        Minibatch steps per epoch.
    """

    def __init__(self, verbose: int, total: int, n_steps: int) -> None:
        self.verbose, self.total, self.n_steps = int(verbose), int(total), int(n_steps)
        self.tqdm = _tqdm() if self.verbose == 1 else None
        if self.verbose == 1 and self.tqdm is None:  # pragma: no cover - tqdm is a dependency
            self.verbose = 2
        self.bar: Any = None
        self.step_seconds: float | None = None  # S: measured wall time of one step
        self.call_seconds = 0.0  # F: the fixed cost of a call
        self._timings: list[tuple[int, float]] = []

    @property
    def chunked(self) -> bool:
        """Whether epochs are cut into chunks (only under a bar)."""
        return self.verbose == 1

    # ------------------------------------------------------------------ chunks
    def first_chunk(self) -> int:
        """Steps of an epoch's first call: all of them when the step time is known, else a short probe."""
        if not self.chunked or self.n_steps <= 1:
            return self.n_steps
        if self.step_seconds is None:
            return max(1, math.ceil(self.n_steps * PROBE_FRACTION))
        return self.next_chunk(0)

    def next_chunk(self, done: int) -> int:
        """Steps of the next call after ``done`` steps of this epoch."""
        left = self.n_steps - done
        if not self.chunked or self.step_seconds is None or self.step_seconds <= 0:
            return left
        if len({k for k, _ in self._timings}) < 2:  # a second probe, of another size: F and S apart
            probe = 2 * self._timings[-1][0]
            return left if left < 2 * probe else probe
        S, F = self.step_seconds, self.call_seconds
        size = max(1, math.ceil(self.n_steps / MAX_CHUNKS), math.ceil(CHUNK_SECONDS / S),
                   math.ceil((1 / OVERHEAD - 1) * F / S))  # fmt: skip
        return left if left < 2 * size else size

    def timed(self, steps: int, seconds: float) -> None:
        """Record that a call of ``steps`` steps took ``seconds``; refit ``seconds = F + S·steps``."""
        if steps <= 0:
            return
        self._timings.append((steps, seconds))
        k = np.array([t[0] for t in self._timings], dtype=np.float64)
        t = np.array([t[1] for t in self._timings], dtype=np.float64)
        if np.ptp(k) > 0:
            S, F = np.polyfit(k, t, 1)
            if S > 0 and F >= 0:
                self.step_seconds, self.call_seconds = float(S), float(F)
                return
            if S > 0:  # a negative fixed cost is noise: no fixed cost
                self.step_seconds, self.call_seconds = float(t.sum() / k.sum()), 0.0
                return
        if self.step_seconds is None:
            self.step_seconds = float(t.sum() / k.sum())

    # ------------------------------------------------------------------ display
    def start_epoch(self, number: int) -> None:
        if self.verbose == 1:
            width = len(str(self.total))
            self.bar = self.tqdm(total=self.n_steps, desc=f"Epoch {number:{width}d}/{self.total}", unit="step",
                                 leave=True, dynamic_ncols=True, mininterval=0.1)  # fmt: skip

    def update(self, steps: int, rows: int, loss_sum: float, n_correct: int | None) -> None:
        """After a chunk: ``steps`` more steps done; running means over the ``rows`` trained so far."""
        if self.bar is None:
            return
        post = {"loss": f"{loss_sum / max(rows, 1):.4f}"}
        if n_correct is not None:
            post["accuracy"] = f"{n_correct / max(rows, 1):.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(steps)

    def end_epoch(self, hist: History) -> None:
        """The epoch is committed: final numbers (with validation) on its bar, or its line."""
        if self.verbose == 2:
            print(epoch_line(hist, self.total), flush=True)
        elif self.bar is not None:
            post = {"loss": f"{hist.train_loss[-1]:.4f}"}
            if hist.train_acc is not None:
                post["accuracy"] = f"{hist.train_acc[-1]:.4f}"
            if hist.valid_loss is not None:
                post["val_loss"] = f"{hist.valid_loss[-1]:.4f}"
                if hist.valid_acc is not None:
                    post["val_accuracy"] = f"{hist.valid_acc[-1]:.4f}"
                elif hist.valid_score is not None:
                    post["val_score"] = f"{hist.valid_score[-1]:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.n = self.n_steps
            self.bar.refresh()
            self.close()

    def close(self) -> None:
        """Close an open bar (end of an epoch, an interrupt, a divergence)."""
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.close()
