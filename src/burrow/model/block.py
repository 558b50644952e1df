"""A transformer block: its parts (blocks.py), each behind a norm, added to the residual stream.

serial:   x = x + attn(norm1(x)); x = x + extra(norm(x)) ...; x = x + ffn(norm2(x))
parallel: x = x + attn(norm(x)) + extra(norm(x)) ... + ffn(norm(x))   (PaLM §2: ~15% faster
          at scale, one norm shared by every part)

The parts are chosen once, when the block is built, from the layer's LayerSpec; forward treats
them all alike. Parameter names stay those of a plain block (attn_norm, attn, mlp_norm, mlp;
extras and extra_norms), so checkpoints and Hugging Face names do not depend on the kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from burrow import blocks
from burrow.config import ModelConfig
from burrow.model.context import ForwardContext
from burrow.model.norms import make_dropout, make_norm


def build_part(cfg: ModelConfig, layer: int, role: str, name: str) -> nn.Module:
    return blocks.kind(role, name).module_class()(cfg, layer)


class Block(nn.Module):
    """The parts of block `layer` and their norms: one per part in a serial block, one shared
    by all of them in a parallel one (registered in this order, which the checkpoints keep)."""

    serial = True

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        spec = cfg.layer_spec(layer)
        self.attn_norm = make_norm(cfg)
        self.attn = build_part(cfg, layer, "mixer", spec.mixer)
        if self.serial:
            self.extra_norms = nn.ModuleList(make_norm(cfg) for _ in spec.extras)
        self.extras = nn.ModuleList(build_part(cfg, layer, "extra", name) for name in spec.extras)
        if self.serial:
            self.mlp_norm = make_norm(cfg)
        self.mlp = build_part(cfg, layer, "ffn", spec.ffn)
        self.dropout = make_dropout(cfg.dropout)


class SerialBlock(Block):
    """Each part in turn reads the normalised residual stream and adds its output to it."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), ctx))
        for norm, part in zip(self.extra_norms, self.extras):
            x = x + self.dropout(part(norm(x), ctx))
        return x + self.dropout(self.mlp(self.mlp_norm(x), ctx))


class ParallelBlock(Block):
    """Every part reads the same normalised input; their outputs are added together (PaLM §2)."""

    serial = False

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, ctx))
        for part in self.extras:
            x = x + self.dropout(part(h, ctx))
        return x + self.dropout(self.mlp(h, ctx))


def make_block(cfg: ModelConfig, layer: int) -> nn.Module:
    """The block cfg.block names, with the parts cfg.layer_spec(layer) names."""
    return ParallelBlock(cfg, layer) if cfg.block == "parallel" else SerialBlock(cfg, layer)
