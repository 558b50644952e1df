"""Adafactor as PaLM trained with it: not factored, with momentum and parameter scaling.

PaLM (Chowdhery et al. 2022, §5 "Training setup", Optimizer) used "the Adafactor optimizer
without factorization. This is effectively equivalent to Adam with parameter scaling": each
update is scaled by the root mean square of the parameter it changes, so that matrices of any
shape move by the same relative amount. Its settings, all defaults here: beta1 = 0.9; beta2 at
step t = 1 - t^-0.8 (no bias correction needed: beta2 = 0 at the first step); epsilon1 = 1e-30
inside the second moment, epsilon2 = 1e-3 as the floor of the parameter scale; update clipping
at 1.0 (the root mean square of each update is capped at d = 1); dynamic weight decay lr^2.

The algorithm is Shazeer & Stern's (2018, Algorithm 4 without the factored second moment, with
the momentum of §5 applied to the scaled update, as the Adafactor of tensor2tensor and T5X do):

    v_t = beta2_t v_{t-1} + (1 - beta2_t) (g_t^2 + eps1)
    u_t = g_t / sqrt(v_t);   u_t /= max(1, RMS(u_t) / d)            update clipping
    s_t = max(eps2, RMS(theta_{t-1})) * lr_t * u_t                   parameter scaling
    m_t = beta1 m_{t-1} + (1 - beta1) s_t
    theta_t = theta_{t-1} - m_t - decay_t * theta_{t-1}

decay_t is the group's `weight_decay` times lr_t (torch's AdamW convention); the trainer sets
it each step, which is how PaLM's lr^2 is expressed (weight_decay = lr_t). torch's own
`torch.optim.Adafactor` always factors matrices and has no beta1, so it is not PaLM's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class Adafactor(torch.optim.Optimizer):
    """Unfactored Adafactor with momentum, parameter scaling and update clipping (PaLM §5)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta1: float = 0.9,
                 beta2_decay: float = 0.8, eps1: float = 1e-30, eps2: float = 1e-3,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if lr < 0 or not 0.0 <= beta1 < 1.0 or beta2_decay <= 0:
            raise ValueError(f"Adafactor: lr {lr}, beta1 {beta1}, beta2_decay {beta2_decay}")
        defaults = {"lr": lr, "beta1": beta1, "beta2_decay": beta2_decay, "eps1": eps1,
                    "eps2": eps2, "clip_threshold": clip_threshold, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # torch.optim.Optimizer.step signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                # statistics in float32 at least (bf16 parameters keep fp32 moments)
                dtype = torch.promote_types(parameter.dtype, torch.float32)
                grad = parameter.grad.to(dtype)
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["second_moment"] = torch.zeros_like(grad)
                    if group["beta1"] > 0:
                        state["momentum"] = torch.zeros_like(grad)
                state["step"] += 1
                t = float(state["step"])
                beta2 = 1.0 - t ** -group["beta2_decay"]
                second = state["second_moment"]
                second.mul_(beta2).add_(grad.square().add_(group["eps1"]), alpha=1.0 - beta2)
                update = grad / second.sqrt()
                rms = update.square().mean().sqrt()
                update.div_(torch.clamp(rms / group["clip_threshold"], min=1.0))
                scale = torch.clamp(parameter.to(dtype).square().mean().sqrt(),
                                    min=group["eps2"])
                update.mul_(scale * group["lr"])
                if group["beta1"] > 0:
                    momentum = state["momentum"]
                    momentum.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
                    update = momentum
                if group["weight_decay"]:
                    parameter.mul_(1.0 - group["lr"] * group["weight_decay"])
                parameter.sub_(update.to(parameter.dtype))
        return loss
