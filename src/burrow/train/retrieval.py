"""The neighbours a RETRO run trains and evaluates with (Borgeaud et al. 2021, §2.3-2.4).

Retrieval is frozen, so the neighbours of every chunk of the prepared data are looked up once
(retrieval/neighbours.py, stored in the database directory) before the first step. A training
window starts at a multiple of the chunk size m (BatchLoader(align=m)), so its C = T / m chunks
are chunks start/m ... start/m + C - 1 of the split's stream, and their neighbours are read off
the stored table and turned into tokens (each the neighbour chunk and its continuation, r tokens)
for `Transformer.forward(..., neighbours=(B, C, k, r))`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from burrow.config import RunConfig
from burrow.errors import UserError
from burrow.retrieval import check_database_fits, open_database, retrieved_tokens
from burrow.retrieval.neighbours import DEFAULT_K, compute_neighbours, open_neighbours


class Retrieval:
    """A run's database and the stored neighbours of its prepared splits."""

    def __init__(self, cfg: RunConfig, prepared: Path, *, splits: Sequence[str] = ("train", "val"),
                 is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                 progress: bool = True):
        retro = cfg.model.retro
        if retro is None or cfg.data.retro_db is None:
            raise UserError("retrieval needs a RETRO model (model.retro) and --retro-db")
        self.db = open_database(cfg.data.retro_db)
        check_database_fits(self.db, retro)
        self.chunk_size, self.k = retro.chunk_size, retro.neighbours
        stored = max(DEFAULT_K, self.k)
        if is_main:  # one process looks them up (or finds them stored); the others read them
            for split in splits:
                compute_neighbours(self.db, prepared, split, k=stored,
                                   chunk_tokens=retro.chunk_size, progress=progress)
        barrier()
        self.ids = {split: open_neighbours(self.db, prepared, split) for split in splits}

    def neighbour_ids(self, split: str, starts: Sequence[int], seq_len: int,
                      k: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """(B, C, k) database ids of the neighbours of each window's chunks; `rows` (one per
        chunk of the split) reads chunk c's neighbours from row rows[c] of the table instead
        (the evaluation's control with other chunks' neighbours)."""
        k = self.k if k is None else k
        table = self.ids[split]
        if k > table.shape[1]:
            raise UserError(f"{k} neighbours asked for but {table.shape[1]} are stored per chunk")
        starts = np.asarray(starts, dtype=np.int64)
        if np.any(starts % self.chunk_size):
            raise ValueError(f"window starts {starts.tolist()} are not whole chunks")
        chunks = starts[:, None] // self.chunk_size + np.arange(seq_len // self.chunk_size)
        # A window's last chunks may lie past the split's end (an evaluation's padded tail):
        # what they retrieve reaches only padded positions, so any stored row serves.
        chunks = np.minimum(chunks, len(table) - 1)
        return np.asarray(table[chunks if rows is None else rows[chunks]][..., :k])

    def batch(self, split: str, starts: Sequence[int], seq_len: int, k: int | None = None,
              device: torch.device | str = "cpu", rows: np.ndarray | None = None
              ) -> dict[str, torch.Tensor]:
        """The model's retrieval inputs for windows starting at `starts`: {"neighbours":
        (B, C, k, r) int64 token ids}."""
        tokens = retrieved_tokens(self.db, self.neighbour_ids(split, starts, seq_len, k, rows))
        return {"neighbours": torch.from_numpy(tokens.astype(np.int64)).to(device)}
