"""The parity task: a sequence over {-1, 0, +1}; its label is the number of +1s modulo 2.

The reference generator (scenic, scenic/projects/adatape/dataset/parity_dataset.py) draws every
element independently and uniformly from (+1, 0, -1), labels a sequence by
`sum(sample == 1) % 2`, and feeds one-hot vectors of `sample + 1`; its default length is 32, its
training stream comes from PRNGKey(0) and its evaluation stream from PRNGKey(42), and it counts
num_train_examples // 10 = 6,400 evaluation examples. Token ids here are the same `value + 1`:

    id 0 -> -1,   id 1 -> 0,   id 2 -> +1

`sampling="graves"` is the older form of the task (Graves 2016, ACT, §3.1: a random number, 1 to
the length, of the elements set to +1 or -1, the rest 0): difficulty then varies from one input
to the next, where under "uniform" the count of non-zeros stays near two thirds of the length.

Seeds: the training stream of seed s draws from a torch.Generator seeded 2s, the held-out set of
seed h from one seeded 2h + 1, so that no training seed ever replays the held-out draws.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from burrow.errors import UserError

VOCAB_SIZE = 3
TOKEN_VALUES = (-1, 0, 1)  # the value of token id 0, 1, 2
PLUS_ONE = 2  # the id of +1, whose count the label is the parity of
ZERO = 1
SAMPLINGS = ("uniform", "graves")
DEFAULT_LENGTH = 32  # scenic's parity_dataset.py: seq_len defaults to 32
HELD_OUT_SEED = 42  # scenic's evaluation stream: PRNGKey(42)
HELD_OUT_SIZE = 6400  # scenic: num_train_examples // 10 with its default 64,000


def check_task(length: int, sampling: str = "uniform") -> None:
    """UserError unless `length` is a positive whole number and `sampling` one of SAMPLINGS."""
    if not isinstance(length, int) or length < 1:
        raise UserError(f"parity sequence length must be at least 1, got {length}; "
                        "give e.g. --length 32")
    if sampling not in SAMPLINGS:
        raise UserError(f"unknown parity sampling {sampling!r}; choose {' or '.join(SAMPLINGS)}")


def parity_labels(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) long: the number of +1s (id 2) in each row of `tokens` (B, T), modulo 2."""
    return (tokens == PLUS_ONE).sum(-1).remainder(2)


def plus_ones(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) long: how many +1s each sequence holds (the count whose parity is the label)."""
    return (tokens == PLUS_ONE).sum(-1)


def non_zeros(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) long: how many elements of each sequence are +1 or -1 (Graves's difficulty)."""
    return (tokens != ZERO).sum(-1)


def sample(n: int, length: int, generator: torch.Generator,
           sampling: str = "uniform") -> torch.Tensor:
    """(n, length) long token ids drawn from `generator` (on the CPU, so the same everywhere)."""
    if sampling == "uniform":
        return torch.randint(0, VOCAB_SIZE, (n, length), generator=generator)
    # Graves §3.1: k ~ U{1..length} non-zeros at random places, each +1 or -1 with equal odds
    count = torch.randint(1, length + 1, (n, 1), generator=generator)
    rank = torch.rand(n, length, generator=generator).argsort(-1).argsort(-1)
    sign = torch.randint(0, 2, (n, length), generator=generator) * 2  # id 0 (-1) or 2 (+1)
    return torch.where(rank < count, sign, torch.full_like(sign, ZERO))


def training_batches(length: int, batch_size: int, seed: int = 0,
                     sampling: str = "uniform") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (tokens (B, T), labels (B,)) batches, the same for the same seed."""
    check_task(length, sampling)
    generator = torch.Generator().manual_seed(2 * seed)
    while True:
        tokens = sample(batch_size, length, generator, sampling)
        yield tokens, parity_labels(tokens)


def held_out(length: int, size: int = HELD_OUT_SIZE, sampling: str = "uniform",
             seed: int = HELD_OUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set: (tokens (size, T), labels (size,)), independent of the training
    seed; drawn from a generator no training stream uses (the module's docstring)."""
    check_task(length, sampling)
    tokens = sample(size, length, torch.Generator().manual_seed(2 * seed + 1), sampling)
    return tokens, parity_labels(tokens)
