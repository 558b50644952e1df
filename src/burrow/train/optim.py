"""The optimisers (AdamW; PaLM's Adafactor) with decoupled weight decay on matrices only, the
learning-rate schedules, and the per-step hyperparameters the trainer sets."""

from __future__ import annotations

import math

import torch
from torch import nn

from burrow.config import TrainConfig
from burrow.train.stochastic_rounding import round_stochastically


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adafactor (`cfg.optimizer`); weight decay on matrices and embeddings, none on
    vectors (norms, biases) and on the matrices a module declares in its `no_weight_decay()`
    (Transformer-XL's u and v, Switch routers: see each module for why).

    Gopher trained with Adam, which is AdamW with weight_decay=0; Chinchilla with AdamW; PaLM
    with Adafactor, not factored (train/adafactor.py). With cfg.param_dtype "bf16" the model's
    parameters are bf16 and each step is rounded back into them stochastically (Gopher 7.1B and
    280B), its moments float32.
    """
    exempt = {id(parameter) for module in model.modules()
              if hasattr(module, "no_weight_decay") for parameter in module.no_weight_decay()}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            is_matrix = parameter.dim() >= 2 and id(parameter) not in exempt
            (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decays": True},
              {"params": no_decay, "weight_decay": 0.0, "decays": False}]
    if cfg.optimizer == "adafactor":
        from burrow.train.adafactor import Adafactor

        optimizer = Adafactor(groups, lr=cfg.lr, beta1=cfg.beta1, beta2_decay=cfg.beta2_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      eps=cfg.eps)
    if cfg.param_dtype == "bf16":  # Gopher 7.1B and 280B (train/stochastic_rounding.py)
        optimizer = round_stochastically(optimizer, cfg.seed)
    return optimizer


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set the rate of optimiser step `step` (0-based) on every group, and, with
    weight_decay_lr_power p > 0, the matrices' decay to lr^p a step (PaLM's lr^2): both
    optimisers multiply a parameter by 1 - lr * weight_decay, so weight_decay = lr^(p - 1).
    Returns the rate."""
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if cfg.weight_decay_lr_power > 0 and group.get("decays"):
            group["weight_decay"] = lr ** (cfg.weight_decay_lr_power - 1.0)
    return lr


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step `step` (0-based).

    Warmup: linear from warmup_init_lr (Gopher: 1e-7) to lr over warmup_steps. Then, over the
    schedule's length (schedule_steps, or max_steps when 0; the floor after it),
    cosine: half a cosine from lr down to min_lr_ratio * lr at the end (Gopher: 10%);
    constant: lr; wsd: lr until the last decay_steps (or decay_fraction of the steps), then
    linear to the floor; warmup_rsqrt: lr * sqrt(warmup_steps / step), not below the floor.

    rsqrt has no linear warmup and no floor: lr * sqrt(k / max(step, k)) with k = warmup_steps,
    T5's inverse square root 1 / sqrt(max(n, k)) exactly when lr = 1 / sqrt(k) (Raffel et al.
    2020, §3.1.2: 0.01 for the first 10^4 steps), the pre-training schedule of the T5 code base
    Switch Transformer is built on, and PaLM's (§5: 1e-2 for 10,000 steps, then 1/sqrt(step)).
    The rsqrt schedules do not depend on max_steps, so runs of different lengths follow the same
    rate step by step and a curve can be read at any step.
    """
    if cfg.schedule == "rsqrt":
        k = max(1, cfg.warmup_steps)
        return cfg.lr * math.sqrt(k / max(step, k))
    if step < cfg.warmup_steps:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "warmup_rsqrt":
        return max(floor, cfg.lr * math.sqrt(max(1, cfg.warmup_steps) / max(1, step)))
    end = schedule_length(cfg)
    if cfg.schedule == "wsd":
        decay = cfg.decay_steps or round(end * cfg.decay_fraction)
        decay_start = max(cfg.warmup_steps, end - decay)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, end - decay_start)
        return cfg.lr + (floor - cfg.lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def schedule_length(cfg: TrainConfig) -> int:
    """The steps the cosine and wsd schedules span: schedule_steps, or else max_steps."""
    return cfg.schedule_steps or cfg.max_steps


SCHEDULE_FIELDS = ("lr", "schedule", "warmup_steps", "warmup_init_lr", "min_lr_ratio",
                   "decay_fraction", "decay_steps", "schedule_steps", "max_steps")


def schedule_change(before: TrainConfig, after: TrainConfig, step: int) -> str | None:
    """One line on what resuming at `step` with `after` instead of `before` does to the
    learning rate, or None when no field of the schedule changed."""
    changed = [name for name in SCHEDULE_FIELDS if getattr(before, name) != getattr(after, name)]
    if not changed:
        return None
    old, new = learning_rate(step, before), learning_rate(step, after)
    rate = (f"the rate at step {step} goes from {old:.2e} to {new:.2e}" if old != new
            else f"the rate at step {step} stays {new:.2e}")
    if changed == ["max_steps"]:
        what = f"--max-steps {after.max_steps} (was {before.max_steps})"
        if after.schedule in ("constant", "rsqrt", "warmup_rsqrt") or after.schedule_steps:
            return f"note: {what}: the {after.schedule} schedule does not depend on it; {rate}"
        return (f"note: {what}: the {after.schedule} schedule is recomputed over "
                f"{after.max_steps} steps; {rate} (--schedule-steps {before.max_steps} keeps "
                "the old schedule)")
    what = ", ".join(f"train.{name} {getattr(before, name)} -> {getattr(after, name)}"
                     for name in changed)
    return f"note: {what}: {rate}"
