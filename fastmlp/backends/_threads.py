"""Measured choice between splitting an epoch over threads and running it on one.

On a machine busy with other work a split epoch can be many times slower than a
one-thread epoch (every step waits for the other thread, which may not be
running).  Both compiled backends cut each minibatch into blocks that depend on
the shape only, so the thread count never changes the result; this module
times epochs with both now and then and keeps the faster.
"""

from __future__ import annotations

#: the slower choice is measured again every this many epochs (four times as rarely when it was
#: more than three times slower)
PROBE_EVERY = 16


class ThreadChoice:
    """Per-key record of seconds per sample by thread count, and the choice it implies."""

    def __init__(self) -> None:
        #: last measured seconds per sample, per key (shape, batch size, dtype) and thread count
        self.speed: dict[tuple, dict[int, float]] = {}
        self.calls: dict[tuple, int] = {}

    def choose(self, key: tuple, n_blocks: int) -> int:
        """Threads for the next epoch of ``key``: ``n_blocks``, unless one thread was measured faster."""
        if n_blocks < 2:
            return 1
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        seen = self.speed.get(key, {})
        if n_blocks not in seen:
            return n_blocks
        if 1 not in seen:
            return 1
        best, other = (1, n_blocks) if seen[1] < seen[n_blocks] else (n_blocks, 1)
        every = PROBE_EVERY * (4 if seen[other] > 3 * seen[best] else 1)
        return other if calls % every == 0 else best

    def record(self, key: tuple, n_threads: int, seconds: float, n_samples: int) -> None:
        """Note that an epoch of ``key`` over ``n_samples`` took ``seconds`` on ``n_threads`` threads."""
        self.speed.setdefault(key, {})[n_threads] = seconds / max(1, n_samples)
