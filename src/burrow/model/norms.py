"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019; Gopher, Llama) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.model.context import Init


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

    def init_weights(self, init: Init) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        # Without a gradient, torch's kernel: an autograd.Function's call costs ~6 us more,
        # which decoding one token at a time pays at every norm.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """Ba et al. 2016's LayerNorm (GPT-3, PaLM), with a bias only when the model has biases."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__(dim, eps=eps, bias=bias)

    def init_weights(self, init: Init) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (Gopher, Llama) or LayerNorm (GPT-3, PaLM; bias only when cfg.bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def make_dropout(p: float) -> nn.Module:
    """Dropout with probability p; with p = 0 nothing, not even a call that returns its input
    (~2 us, paid at every block when decoding a token at a time)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()
