"""Positions: rotary embeddings (Su et al. 2021; PaLM) and Transformer-XL's relative attention
(Dai et al. 2019, §3.3; Gopher). Learned absolute positions are a table in the Transformer."""

from __future__ import annotations

import math

import torch
from torch import nn

from burrow.config import ModelConfig
from burrow.model.context import Init


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor, head_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's tables (Su et al. 2021) for integer `positions`, each (T, D): the cosines of the
    angles, and their sines with the first half negated, as `apply_rotary` uses them. D is
    `head_size`, default the model's."""
    half = (head_size or cfg.head_size) // 2
    exponents = torch.arange(half, device=positions.device, dtype=torch.float32) / half
    inverse_frequency = cfg.rope_theta ** -exponents
    angles = positions.float()[:, None] * inverse_frequency[None, :]  # (T, D/2)
    sines = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sines, sines], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, heads, T, D) by its position's angle.

    Llama's rotate-half layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as
    x cos + (x2, x1) signed_sin, where (x2, x1) is x rolled by D/2: three passes over x forward
    and three backward (a roll's gradient is the opposite roll).
    """
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)  # (x2, x1)
    rotated = torch.addcmul(x * cos, swapped, signed_sin)  # float32 tables promote bf16 x
    return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)


def sinusoid_table(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal encodings (Vaswani et al.) of 0..length-1, as in Transformer-XL: (L, dim)."""
    return sinusoids(torch.arange(length, device=device), dim)


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encodings of integer `positions` (L,), negative ones too: (L, dim)."""
    exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
    inverse_frequency = 1.0 / (10000 ** exponents)
    angles = positions.float()[:, None] * inverse_frequency[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativePositionBias(nn.Module):
    """Transformer-XL relative attention (Dai et al. 2019, §3.3), as Gopher uses it.

    score(i, j) = (q_i + u) . k_j + (q_i + v) . W_R r_{i-j}, with r the sinusoidal encoding of
    the distance i - j. The first term is ordinary attention on q + u; this module returns the
    second term, scaled like the first, as an additive bias over the (T, S) score matrix.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.d_model = cfg.n_heads, cfg.head_size, cfg.d_model
        self.W_R = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_size, bias=False)
        self.u = nn.Parameter(torch.zeros(cfg.n_heads, 1, cfg.head_size))
        self.v = nn.Parameter(torch.zeros(cfg.n_heads, 1, cfg.head_size))

    def init_weights(self, init: Init) -> None:
        init.linear(self.W_R)
        nn.init.zeros_(self.u)
        nn.init.zeros_(self.v)

    def no_weight_decay(self) -> list[nn.Parameter]:
        """u and v are biases of the attention scores, not weight matrices."""
        return [self.u, self.v]

    def forward(self, q: torch.Tensor, query_pos: torch.Tensor, key_length: int) -> torch.Tensor:
        # q: (B, H, T, D) for the absolute positions query_pos (T,)
        T = q.shape[2]
        encodings = sinusoid_table(key_length, self.d_model, q.device).to(q.dtype)
        r = self.W_R(encodings).view(key_length, self.n_heads, self.head_dim)  # (S, H, D)
        by_distance = torch.einsum("bhtd,shd->bhts", q + self.v, r)  # column s = distance s
        distance = query_pos[:, None] - torch.arange(key_length, device=q.device)[None, :]
        index = distance.clamp(min=0).expand(*by_distance.shape[:2], T, key_length)
        bias = by_distance.gather(-1, index) / math.sqrt(self.head_dim)
        return bias.masked_fill(distance < 0, float("-inf"))  # causal: no future keys
