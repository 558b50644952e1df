"""The batch as a function of the optimiser step: train.batch_tokens, then train.batch_ramp.

PaLM (Chowdhery et al. 2022, §5, "Batch size") trained its 540B model on 512 sequences of 2,048
tokens (1M tokens) per step until step 50k, 1,024 (2M) until step 115k and 2,048 (4M) until the
end at step 255k, the smaller models on similar schedules: small batches are more
sample-efficient early, large ones give better gradient estimates later and larger matrix
multiplications. Gopher 280B (Rae et al. 2021, §3 and Table 1) went from 3M to 6M tokens per
batch during training and Chinchilla 70B from 1.5M to 3M (Hoffmann et al. 2022, Table 4, whose
caption says both doubled midway through training).

The micro-batch stays micro_batch_size sequences; a step's batch is how many of them it
accumulates. The data order is kept by one invariant: the loader is a single seeded stream of
windows, and step s takes the next accumulation(s) x micro_batch_size x data-parallel ranks of
them, so that after step s the stream has given micro_batches(0, s) x micro_batch_size x ranks
windows, in order, whatever the ramp. A checkpoint holds the stream's position and the step; the
step fixes the accumulation of every step after it, so a resume on either side of a change reads
and sums exactly what the run that did not stop does.
"""

from __future__ import annotations

from dataclasses import dataclass

from burrow.config import TrainConfig
from burrow.errors import UserError


@dataclass(frozen=True)
class BatchSchedule:
    """Micro-batches per optimiser step, from each change's first step on."""

    # Tokens of one micro-batch over all data-parallel ranks.
    micro_tokens: int
    # (first step, micro-batches per step), steps increasing, the first at step 0.
    changes: tuple[tuple[int, int], ...]

    @classmethod
    def for_train(cls, train: TrainConfig, data_parallel: int) -> BatchSchedule:
        """The schedule train's batch_tokens and batch_ramp give on `data_parallel` ranks.

        Without a ramp, batch_tokens is rounded to whole micro-batches, as it always was; with
        one, every batch (batch_tokens included) must be whole micro-batches, or UserError: a
        ramp that names its batches means them exactly.
        """
        micro_tokens = train.micro_batch_size * train.seq_len * data_parallel
        ramp = train.batch_changes()
        if not ramp:
            return cls(micro_tokens, ((0, max(1, round(train.batch_tokens / micro_tokens))),))
        for step, tokens in [(0, train.batch_tokens), *ramp]:
            if tokens % micro_tokens:
                name = ("train.batch_tokens" if step == 0 else
                        f"train.batch_ramp's batch from step {step}")
                raise UserError(
                    f"{name} ({tokens:,} tokens) is not a whole number of micro-batches of "
                    f"{micro_tokens:,} tokens (micro_batch_size {train.micro_batch_size} x "
                    f"seq_len {train.seq_len} x {data_parallel} data-parallel rank(s)); with "
                    f"--batch-ramp make every batch a multiple of {micro_tokens:,}")
        return cls(micro_tokens, tuple((step, tokens // micro_tokens)
                                       for step, tokens in [(0, train.batch_tokens), *ramp]))

    @classmethod
    def constant(cls, micro_tokens: int, accumulation: int) -> BatchSchedule:
        """The same `accumulation` micro-batches every step."""
        return cls(micro_tokens, ((0, accumulation),))

    @property
    def ramped(self) -> bool:
        return len(self.changes) > 1

    def accumulation(self, step: int) -> int:
        """Micro-batches of optimiser step `step` (0-based)."""
        return next(count for first, count in reversed(self.changes) if first <= step)

    def tokens(self, step: int) -> int:
        """Tokens of optimiser step `step`, all data-parallel ranks together."""
        return self.accumulation(step) * self.micro_tokens

    def micro_batches(self, start: int, end: int) -> int:
        """Micro-batches of the steps start, ..., end - 1 together."""
        bounds = [first for first, _ in self.changes[1:]] + [max(end, start)]
        return sum(count * max(0, min(end, last) - max(start, first))
                   for (first, count), last in zip(self.changes, bounds))

    def tokens_between(self, start: int, end: int) -> int:
        """Tokens of the steps start, ..., end - 1 together."""
        return self.micro_batches(start, end) * self.micro_tokens

    def describe(self) -> str:
        """The changes, for the line a run starts with: '2,048 from step 10, 4,096 from step
        20' ('' without a ramp)."""
        return ", ".join(f"{count * self.micro_tokens:,} from step {first:,}"
                         for first, count in self.changes[1:])
