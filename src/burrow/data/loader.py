"""Batches of token windows: a resumable, rank-aware sampler for training, and in-order
windows for evaluation.

Training draws windows of seq_len + 1 tokens at starts offset + i * seq_len. Every epoch has its
own random offset in [0, seq_len) and its own permutation of the windows, both from a numpy
generator seeded with (seed, epoch), so that the order is a pure function of the seed and
successive epochs cut the text at different places. The ranks of a distributed job walk the same
permutation in steps of world_size, rank r taking entry position + r: each reads different data,
and the position is the same on every rank, so any rank's state resumes any rank (even under
another world size).

With `align` (RETRO's chunk length), the windows start at multiples of it, so that each
window is whole chunks of the stream and chunk c is always tokens [c * align, (c + 1) * align):
the chunks whose neighbours were precomputed. align = 1 draws exactly what it always did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from burrow.data.shards import TokenDataset
from burrow.errors import UserError

IGNORE_INDEX = -100  # targets with this value are padding, left out of the loss


class BatchLoader:
    """Endless (inputs, targets) batches of shape (batch_size, seq_len), targets shifted by one."""

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        align: int = 1,
    ):
        if align < 1 or seq_len % align:
            raise UserError(f"the sequence length {seq_len} must be a multiple of the chunk "
                            f"length {align}")
        if batch_size < 1 or seq_len < 1 or seed < 0 or not 0 <= rank < world_size:
            raise UserError(
                f"bad loader settings: batch_size={batch_size}, seq_len={seq_len}, seed={seed}, "
                f"rank={rank}, world_size={world_size}; sizes must be positive, the seed "
                "non-negative and 0 <= rank < world_size"
            )
        # the fewest windows an epoch can have is at offset seq_len - 1
        if (dataset.num_tokens - seq_len) // seq_len < world_size:
            raise UserError(
                f"the {dataset.split} split has {dataset.num_tokens} tokens, too few for windows "
                f"of {seq_len + 1} tokens on {world_size} rank(s); use a shorter sequence "
                "length or more data"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.align = align
        self.epoch = 0
        self.position = 0  # permutation entries consumed by all ranks together in this epoch
        self._starts = self._window_starts(0)

    def _window_starts(self, epoch: int) -> np.ndarray:
        """Start of every window of an epoch, in the order the epoch visits them."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = self.align * int(rng.integers(self.seq_len // self.align))
        count = (self.dataset.num_tokens - 1 - offset) // self.seq_len
        return offset + self.seq_len * rng.permutation(count)

    def _next_start(self) -> int:
        if self.position + self.world_size > len(self._starts):
            self.epoch += 1
            self.position = 0
            self._starts = self._window_starts(self.epoch)
        start = int(self._starts[self.position + self.rank])
        self.position += self.world_size
        return start

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), int64 tensors of shape (batch_size, seq_len)."""
        starts = [self._next_start() for _ in range(self.batch_size)]
        self.last_starts = starts  # where the batch's windows begin: retrieval reads them
        windows = np.stack([self.dataset.window(s, self.seq_len + 1) for s in starts])
        windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def skip_batches(self, count: int) -> None:
        """Move past `count` batches without reading them (PaLM's skip after a loss spike)."""
        for _ in range(count * self.batch_size):
            self._next_start()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, as plain ints and strings."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "fingerprint": self.dataset.fingerprint,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "align": self.align,
        }

    def load_state_dict(self, state: dict[str, Any], *, allow_data_change: bool = False) -> None:
        """Continue exactly where the loader that saved state stopped.

        The seed comes from the state. The rank, world size and batch size may differ from the
        saved ones: the position counts windows, whichever rank reads them. Raises UserError
        when the state belongs to other data (unless allow_data_change, which keeps the epoch
        and position and reads them in this data) or to another sequence length.
        """
        if state["fingerprint"] != self.dataset.fingerprint and not allow_data_change:
            raise UserError(
                f"checkpoint was trained on other data (fingerprint {state['fingerprint']}, "
                f"this data {self.dataset.fingerprint}); pass --allow-data-change to continue "
                "on this data anyway"
            )
        if state["seq_len"] != self.seq_len:
            raise UserError(
                f"checkpoint's data loader used sequence length {state['seq_len']}, this run "
                f"uses {self.seq_len}; resume with --seq-len {state['seq_len']}"
            )
        if state.get("align", 1) != self.align:
            raise UserError(
                f"checkpoint's data loader cut windows at multiples of {state.get('align', 1)} "
                f"tokens, this run at {self.align}; resume with the chunk length it had"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._starts = self._window_starts(self.epoch)


def eval_batches(
    dataset: TokenDataset, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows over the split in order, for evaluation.

    Every token after the first is a target exactly once (the first max_tokens of them when
    max_tokens is set). The last window may be partial: its missing inputs are </s> and its
    missing targets IGNORE_INDEX (-100); the last batch may have fewer rows.
    """
    num_targets = max(0, dataset.num_tokens - 1)
    if max_tokens is not None:
        num_targets = min(num_targets, max_tokens)
    starts = range(0, num_targets, seq_len)
    for first in range(0, len(starts), batch_size):
        rows = starts[first : first + batch_size]
        inputs = np.full((len(rows), seq_len), dataset.eos_id, dtype=np.int64)
        targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
        for row, start in enumerate(rows):
            length = min(seq_len, num_targets - start)
            window = dataset.window(start, length + 1)
            inputs[row, :length] = window[:-1]
            targets[row, :length] = window[1:]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
