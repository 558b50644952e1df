"""Self-attention, the token mixer of every block (registered as mixer "attention"): causal in
a language model, bidirectional in an encoder (ForwardContext.causal).

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.model.context import ForwardContext, Init
from burrow.model.positions import RelativePositionBias, apply_rotary


def project(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x through each of the linear layers `module.stackable` names, which all read x.

    One product per layer; or, where a decoding copy of the model has set `module.stacked`
    (infer/matvec.py), one product of their weights stacked, split again: fewer, larger
    products for a token at a time.
    """
    if module.stacked is None:
        return tuple(getattr(module, name)(x) for name in module.stackable)
    return module.stacked(x).split_with_sizes(module.stacked.output_sizes, dim=-1)


class Attention(nn.Module):
    """Multi-head attention with MHA, GQA or MQA (PaLM: one shared key/value head).

    softmax(q k^T / sqrt(D) + mask) v per head (Vaswani et al. 2017), through torch's fused
    scaled_dot_product_attention; keys and values are shared by groups of H / K query heads.
    """

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

    def init_weights(self, init: Init) -> None:
        for name in self.stackable:
            init.linear(getattr(self, name))
        init.linear(self.o_proj, residual=True)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(self, x)
        # Head counts are read from the projections, not the config: split by tensor
        # parallelism (parallel/tensor.py), a rank holds H / tp query and K / tp key heads.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if ctx.rotary is not None:
            q, k = apply_rotary(q, *ctx.rotary), apply_rotary(k, *ctx.rotary)
        if ctx.cache is not None:  # (B, K, S, D): the cached keys and values, these included
            k, v = ctx.cache.update(self.layer, ctx.start, k, v)
        mask, causal = ctx.visible, ctx.cache is None and ctx.causal
        if self.relative is not None:  # Transformer-XL: (q + u) k^T + (q + v) W_R r
            mask, causal = self.relative(q, ctx.positions, k.shape[2]), False
            q = q + self.relative.u
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.n_heads,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
