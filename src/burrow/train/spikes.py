"""PaLM's answer to loss spikes (Chowdhery et al. 2022, §5.1).

PaLM saw ~20 loss spikes while training the 540B model, at irregular intervals, even with
gradient clipping. What fixed them: "restart training from a checkpoint roughly 100 steps before
the spike started, and skip roughly 200-500 data batches that occurred before and during the
spike". The spike was a product of particular batches with a particular model state, so with
other batches from the same state it does not recur.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path


class SpikeDetector:
    """A loss is a spike when it exceeds `factor` x the mean of the last `window` losses."""

    def __init__(self, factor: float, window: int, history: list[float] | None = None):
        self.factor = factor
        self.losses: deque[float] = deque(history or [], maxlen=window)

    def threshold(self) -> float | None:
        """The loss above which the next step is a spike; None until the window is a quarter
        full (the first steps of a run fall fast and are never spikes)."""
        if not self.factor or len(self.losses) < max(2, self.losses.maxlen // 4):
            return None
        return self.factor * sum(self.losses) / len(self.losses)

    def observe(self, loss: float) -> float | None:
        """Record a step's loss; return the threshold it crossed, or None if no spike."""
        limit = self.threshold()
        if limit is not None and loss > limit:
            return limit  # a spike does not enter the history it is judged against
        self.losses.append(loss)
        return None

    def reset(self) -> None:
        self.losses.clear()


def rollback_target(checkpoints: list[Path], spike_step: int, rollback: int) -> Path | None:
    """The newest checkpoint at least `rollback` steps before the spike, else the oldest one."""
    steps = [(int(path.name.split("_")[1]), path) for path in checkpoints]
    before = [path for step, path in steps if step <= spike_step - rollback]
    if before:
        return before[-1]
    return steps[0][1] if steps else None
