"""The dense feed-forward layer (registered as ffn "mlp"): SwiGLU or the GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.model.attention import project
from burrow.model.context import ForwardContext, Init


class SwiGLU(nn.Module):
    """Shazeer 2020's gated MLP, as in PaLM: down(silu(gate(x)) * up(x))."""

    stackable = ("gate_proj", "up_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.d_model, bias=cfg.bias)
        self.stacked: nn.Module | None = None  # see attention.project

    def init_weights(self, init: Init) -> None:
        init.linear(self.gate_proj)
        init.linear(self.up_proj)
        init.linear(self.down_proj, residual=True)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        gate, up = project(self, x)
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """The two-layer MLP of GPT-2/3 and Gopher: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.d_model, bias=cfg.bias)

    def init_weights(self, init: Init) -> None:
        init.linear(self.up_proj)
        init.linear(self.down_proj, residual=True)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def dense_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The dense feed-forward layer cfg.ffn chooses."""
    return SwiGLU(cfg) if cfg.ffn == "swiglu" else GeluMLP(cfg)
