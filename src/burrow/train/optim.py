"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from burrow.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, none on vectors (norms, biases) and on
    the matrices a module declares in its `no_weight_decay()` (Transformer-XL's u and v,
    Switch routers: see each module for why).

    Gopher trained with Adam, which is AdamW with weight_decay=0; Chinchilla with AdamW.
    """
    exempt = {id(parameter) for module in model.modules()
              if hasattr(module, "no_weight_decay") for parameter in module.no_weight_decay()}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            is_matrix = parameter.dim() >= 2 and id(parameter) not in exempt
            (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step `step` (0-based).

    Warmup: linear from warmup_init_lr (Gopher: 1e-7) to lr over warmup_steps. Then
    cosine: half a cosine from lr down to min_lr_ratio * lr at max_steps (Gopher: 10%);
    constant: lr; wsd: lr until the last decay_fraction of the steps, then linear to the floor;
    rsqrt: lr * sqrt(warmup_steps / step), not below the floor. rsqrt is T5's inverse square
    root (Raffel et al. 2020, §3.1.2), the pre-training schedule of the T5 code base Switch
    Transformer is built on; it does not depend on max_steps, so runs of different lengths
    follow the same rate step by step and a curve can be read at any step.
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "rsqrt":
        return max(floor, cfg.lr * math.sqrt(max(1, cfg.warmup_steps) / max(1, step)))
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, round(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (floor - cfg.lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
