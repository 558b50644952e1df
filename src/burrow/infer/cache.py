"""The KV cache of a generation: keys and values of the tokens seen so far, per layer.

The model's attention calls `update` (model/attention.py); the model asks `rotary_at` and
`visible` once per pass (model/transformer.py). A RETRO model's cache also holds a RetroCache
(`retro`), which chunked cross-attention reads and writes (model/retro.py). Nothing here is
trained.
"""

from __future__ import annotations

import torch

from burrow.config import ModelConfig
from burrow.model.positions import rotary_tables
from burrow.model.retro import RetroCache


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_length` positions.

    A forward pass writes its keys at positions start..start+T-1. With `start` an int (eager
    decoding), attention then reads the positions written so far, 0..start+T-1. With `start` a
    0-dim tensor (a compiled decode step, whose shapes must not depend on the position), it
    reads the whole buffers, and the mask from `visible` hides the positions not written yet.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_length: int):
        self.cfg = cfg
        self.shape = (batch_size, cfg.kv_heads, max_length, cfg.head_size)
        # Each layer's buffers are made at its first write, in the device and dtype its keys
        # come in: under autocast or FSDP's mixed precision that is not the parameters' dtype.
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # see rotary_at
        # A RETRO model's chunked cross-attention keeps its own state across passes
        # (model/retro.py): the unfinished chunk's H_u and the last chunk's encoded neighbours.
        self.retro = RetroCache() if cfg.retro is not None else None

    def rotary_at(self, start: int | torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's tables (T, D) at `positions` (T,), which start at `start`.

        The tables of every position the cache holds are made at the first call, on the
        positions' device: a decode step that made its own would spend ~10 operators on them.
        """
        if self.rotary is None or self.rotary[0].device != positions.device:
            every = torch.arange(self.shape[2], device=positions.device)
            self.rotary = rotary_tables(self.cfg, every)
        if isinstance(start, int):
            return tuple(table[start:start + len(positions)] for table in self.rotary)
        return tuple(table[positions] for table in self.rotary)

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) from position `start`; return the keys and values (B, K, S, D)
        attention reads."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(start, int):
            end = start + k.shape[2]
            keys[:, :, start:end], values[:, :, start:end] = k, v
            return keys[:, :, :end], values[:, :, :end]
        positions = start + torch.arange(k.shape[2], device=k.device)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        return keys, values

    def visible(self, start: int | torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """(T, S): which of the keys `update` returns each query at `positions` (T,) may attend
        to: the past and itself. None where that is all of them (one query, an int start).
        The same for every layer."""
        if isinstance(start, int) and len(positions) == 1:
            return None
        length = start + len(positions) if isinstance(start, int) else self.shape[2]
        keys = torch.arange(length, device=positions.device)
        return keys[None, :] <= positions[:, None]
