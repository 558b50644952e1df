"""The parts of a transformer block: norms, positions, attention, MLPs, the KV cache.

Each class is one idea from a paper; `forward` follows the paper's equations. Shapes use
B batch, T query length, S key length, H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight (Zhang & Sennrich 2019), with its gradient written out.

    On a CPU, torch's RMSNorm is a chain of small operators that autograd walks back through:
    about four passes over x forward and ten backward. Here forward is one norm and two
    products, and backward seven passes: x_hat = x / rms, gx = g * x_hat, <gx, weight> (which
    equals <g * weight, x_hat>), grad_weight = sum over rows of gx, and
    grad_x = (g * weight - x_hat <gx, weight> / d) / rms in three.
    Statistics are taken in float32 or wider whatever the input's dtype; y has the input's
    dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        exact = x.to(torch.promote_types(x.dtype, torch.float32))
        mean_square = torch.linalg.vector_norm(exact, dim=-1, keepdim=True).square_() / x.shape[-1]
        inverse_rms = torch.rsqrt(mean_square.add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, inverse_rms)
        return (exact * inverse_rms * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, inverse_rms = ctx.saved_tensors
        x_hat = x.to(inverse_rms.dtype) * inverse_rms
        grad_y = grad_y.to(inverse_rms.dtype)
        scaled = grad_y * x_hat  # its row sums are grad_weight, its rows . weight the projection
        projection = (scaled @ weight.to(scaled.dtype)).unsqueeze(-1).div_(x.shape[-1])
        grad_weight = scaled.reshape(-1, x.shape[-1]).sum(0)
        grad_x = (grad_y * weight).addcmul_(x_hat, projection, value=-1).mul_(inverse_rms)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Gopher, Llama); no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        # Without a gradient, torch's kernel: an autograd.Function's call costs ~6 us more,
        # which decoding one token at a time pays at every norm.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (Gopher, Llama) or LayerNorm (GPT-3, PaLM; bias only when cfg.bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def make_dropout(p: float) -> nn.Module:
    """Dropout with probability p; with p = 0 nothing, not even a call that returns its input
    (~2 us, paid at every block when decoding a token at a time)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's tables (Su et al. 2021) for integer `positions`, each (T, D): the cosines of the
    angles, and their sines with the first half negated, as `apply_rotary` uses them."""
    half = cfg.head_size // 2
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
    inverse_frequency = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    angles = torch.arange(length, device=device).float()[:, None] * inverse_frequency[None, :]
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


def project(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x through each of the linear layers `module.stackable` names, which all read x.

    One product per layer; or, where decoding has set `module.stacked` (model/matvec.py), one
    product of their weights stacked, split again: fewer, larger products for a token at a time.
    """
    if module.stacked is None:
        return tuple(getattr(module, name)(x) for name in module.stackable)
    return module.stacked(x).split_with_sizes(module.stacked.output_sizes, dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with MHA, GQA or MQA (PaLM: one shared key/value head)."""

    stackable = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.dropout = layer, cfg.dropout
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        inner, kv_inner = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.relative = RelativePositionBias(cfg) if cfg.positions == "relative" else None
        self.stacked: nn.Module | None = None  # see `project`

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                positions: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, visible: torch.Tensor | None = None
                ) -> torch.Tensor:
        # positions (T,): the absolute positions of x's tokens, from `start`; with a cache,
        # visible is cache.visible(start, positions), made once for all layers
        B, T, _ = x.shape
        q, k, v = project(self, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        mask, causal = visible, cache is None
        if self.relative is not None:
            mask, causal = self.relative(q, positions, k.shape[2]), False
            q = q + self.relative.u
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.n_heads,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """Shazeer 2020's gated MLP, as in PaLM: down(silu(gate(x)) * up(x))."""

    stackable = ("gate_proj", "up_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.d_model, bias=cfg.bias)
        self.stacked: nn.Module | None = None  # see `project`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, x)
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """The two-layer MLP of GPT-2/3 and Gopher: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The dense feed-forward layer chosen by cfg.ffn."""
    return SwiGLU(cfg) if cfg.ffn == "swiglu" else GeluMLP(cfg)
