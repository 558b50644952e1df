"""Training AdaTape, a Transformer and a Universal Transformer on parity, and measuring them.

The three models share the width-independent shape (layers, heads) and the parameter budget:
AdaTape is built at --d-model, and the Transformer's and the Universal Transformer's widths are
the ones whose parameter counts come closest to AdaTape's. Each trains with AdamW on the same
seeded stream, a linear warmup then cosine decay of the learning rate, and is evaluated on one
fixed held-out set every `eval_every` steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from burrow.adatape import parity
from burrow.adatape.settings import ParityConfig
from burrow.config import ModelConfig
from burrow.flops import flops_per_token
from burrow.model.encoder import EncoderClassifier
from burrow.model.universal import UniversalTransformer

EVAL_BATCH = 512


@dataclass
class Evaluation:
    """One pass over the held-out set: accuracy, mean cross-entropy, and each example's tape
    length (AdaTape) or the ponder steps N averaged over every position of every example
    (the Universal Transformer)."""

    accuracy: float
    cross_entropy: float
    tape_lengths: torch.Tensor | None = None  # (N,) long
    ponder_steps: float | None = None


@dataclass
class ModelRun:
    """What training one model measured."""

    name: str
    params: int
    d_model: int
    history: list[dict] = field(default_factory=list)  # {step, loss, accuracy, ...} per eval
    seconds: float = 0.0
    final: Evaluation | None = None


def model_config(cfg: ParityConfig, d_model: int, adatape: bool) -> ModelConfig:
    """The encoder's shape at width `d_model`: the three token ids, learned positions for the
    class token and the sequence (tape tokens take none: model/encoder.py), ViT's LayerNorm
    and GELU MLP (scenic's AdaTape is a ViT)."""
    return ModelConfig(vocab_size=parity.VOCAB_SIZE, d_model=d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, positions="learned", ffn="gelu", norm="layernorm",
                       max_seq_len=cfg.length + 1,
                       adatape=cfg.adatape_config() if adatape else None)


def build(name: str, cfg: ParityConfig, d_model: int) -> nn.Module:
    """The model `name` at width `d_model`."""
    if name == "universal_transformer":
        shape = dataclasses.replace(model_config(cfg, d_model, False), n_layers=1)
        return UniversalTransformer(shape, num_classes=2, max_steps=cfg.ut_max_steps,
                                    ponder_cost=cfg.ponder_cost, epsilon=cfg.act_epsilon)
    return EncoderClassifier(model_config(cfg, d_model, name == "adatape"), num_classes=2,
                             whole_input=cfg.length if cfg.input == "whole" else None)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_width(name: str, cfg: ParityConfig, target: int) -> int:
    """The width (a multiple of 2 x heads, up to 4 x --d-model) whose parameter count is
    closest to `target`."""
    step = 2 * cfg.n_heads
    with torch.device("meta"):
        counts = {width: count_params(build(name, cfg, width))
                  for width in range(step, 4 * cfg.d_model + 1, step)}
    return min(counts, key=lambda width: abs(counts[width] - target))


def widths(cfg: ParityConfig) -> dict[str, int]:
    """Each model's width: AdaTape's is --d-model, the others match its parameter count."""
    target = param_counts(cfg, {"adatape": cfg.d_model})["adatape"]
    return {name: cfg.d_model if name == "adatape" else matched_width(name, cfg, target)
            for name in cfg.models}


def learning_rate(cfg: ParityConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine decay to 0 at cfg.steps (scenic's
    'constant * cosine_decay * linear_warmup')."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(1, cfg.warmup)
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, device: str
             ) -> Evaluation:
    """Accuracy and cross-entropy of `model` on (tokens, labels), in batches."""
    was_training = model.training
    model.eval()
    right, loss, lengths, steps = 0, 0.0, [], []
    for start in range(0, len(tokens), EVAL_BATCH):
        x = tokens[start:start + EVAL_BATCH].to(device)
        y = labels[start:start + EVAL_BATCH].to(device)
        out = model(x, y)
        right += int((out.logits.argmax(-1) == y).sum())
        loss += float(out.cross_entropy) * len(y)
        if out.tape_lengths is not None:
            lengths.append(out.tape_lengths.cpu())
        steps += [float(term.value) * len(y) for term in out.aux if term.name == "ponder_steps"]
    model.train(was_training)
    n = len(tokens)
    return Evaluation(right / n, loss / n, torch.cat(lengths) if lengths else None,
                      sum(steps) / n if steps else None)


def forward_flops(name: str, model: nn.Module, cfg: ParityConfig,
                  evaluation: Evaluation) -> float:
    """Forward FLOPs per held-out example (docs/adatape.md, "FLOPs"): PaLM's appendix-B count
    (flops.py: 2 per weight multiply-add, 4·H·Q·S per token for attention over S keys) for the
    S positions each model's blocks see, plus the head; AdaTape at each example's own tape
    length, the Universal Transformer at its measured mean ponder steps."""
    shape = model.cfg
    head = 2 * shape.d_model * 2
    S = cfg.positions(name)
    if name == "universal_transformer":
        step = S * (flops_per_token(shape, S, embeddings=False, training=False)
                    + 2 * shape.d_model)  # + the halting unit
        return evaluation.ponder_steps * step + head
    # a whole input's embedding is a matmul of its T one-hot vectors: 2 FLOPs per weight
    embed = 2 * model.embed.weight.numel() if cfg.input == "whole" else 0
    if name == "transformer":
        return S * flops_per_token(shape, S, embeddings=False, training=False) + head + embed
    return adatape_flops(model, cfg, evaluation.tape_lengths) + head + embed


def adatape_flops(model: nn.Module, cfg: ParityConfig, tape_lengths: torch.Tensor) -> float:
    """AdaTape's blocks over the class token, the sequence and each example's own tape (the
    tape tokens' MLP is as large as the inputs'), averaged over the examples: attention grows
    with the square of the length, so the mean length alone would undercount. Each reading
    step adds its scores against the bank's N entries (2·N·Q, keys one head wide) and the
    weighted sum of its top-k entries (2·k·d)."""
    shape, tape = model.cfg, model.cfg.adatape
    plain = dataclasses.replace(shape, adatape=None)
    entries = cfg.length if tape.bank == "input" else tape.bank_size
    reading = 2 * entries * shape.head_size + 2 * tape.top_k * shape.d_model
    S = cfg.positions("adatape")
    totals = [(S + length) * flops_per_token(plain, S + length, embeddings=False,
                                             training=False)
              + length * reading for length in tape_lengths.tolist()]
    return sum(totals) / len(totals)


Log = Callable[[str, dict], None]


def train_model(name: str, model: nn.Module, cfg: ParityConfig, held_out: tuple,
                log: Log | None = None) -> ModelRun:
    """Train `model` on cfg's stream for cfg.steps; evaluate every cfg.evaluate_every steps."""
    torch.manual_seed(cfg.seed)
    model.to(cfg.device).train()
    run = ModelRun(name, count_params(model), model.cfg.d_model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)
    stream = parity.training_batches(cfg.length, cfg.batch_size, cfg.seed, cfg.sampling)
    # the cross-entropy summed on the device between evaluations: no host sync per step
    started, loss_sum, summed, evaluating = time.perf_counter(), 0.0, 0, 0.0
    for step in range(1, cfg.steps + 1):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(cfg, step)
        tokens, labels = next(stream)
        out = model(tokens.to(cfg.device), labels.to(cfg.device))
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimiser.step()
        loss_sum, summed = loss_sum + out.cross_entropy.detach(), summed + 1
        if step % cfg.evaluate_every == 0 or step == cfg.steps:
            before = time.perf_counter()
            run.final = evaluate(model, *held_out, cfg.device)
            evaluating += time.perf_counter() - before
            elapsed = time.perf_counter() - started
            entry = {"step": step, "loss": float(loss_sum) / summed,
                     "accuracy": run.final.accuracy, **summary(run.final),
                     "seconds": round(elapsed, 2),
                     "examples_per_second": round(step * cfg.batch_size
                                                  / (elapsed - evaluating), 1)}
            run.history.append(entry)
            loss_sum, summed = 0.0, 0
            if log:
                log(name, entry)
    run.seconds = time.perf_counter() - started
    return run


def summary(evaluation: Evaluation) -> dict:
    """The mean tape length or ponder steps of an evaluation, where the model has one."""
    if evaluation.tape_lengths is not None:
        return {"mean_tape_length": float(evaluation.tape_lengths.float().mean())}
    if evaluation.ponder_steps is not None:
        return {"mean_ponder_steps": evaluation.ponder_steps}
    return {}


def param_counts(cfg: ParityConfig, widths: dict[str, int]) -> dict[str, int]:
    """Each model's parameter count at its width (built on the meta device)."""
    with torch.device("meta"):
        return {name: count_params(build(name, cfg, width)) for name, width in widths.items()}


def report(name: str, run: ModelRun, model: nn.Module, cfg: ParityConfig) -> dict:
    """A model's entry in result.json: final accuracy, size, adaptive depth, FLOPs, history."""
    return {"accuracy": run.final.accuracy, "params": run.params, "d_model": run.d_model,
            **summary(run.final),
            "flops_per_example": forward_flops(name, model, cfg, run.final),
            "seconds": round(run.seconds, 2),
            "examples_per_second": run.history[-1]["examples_per_second"],
            "history": run.history}


def compare(cfg: ParityConfig, widths: dict[str, int], log: Log | None = None
            ) -> tuple[dict[str, ModelRun], dict[str, nn.Module], tuple]:
    """Train each model of `widths` (see `widths`) at its width; the runs, the trained models
    and the held-out set (tokens, labels). cfg.device "auto" becomes cuda where there is one."""
    cfg.validate()
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    held_out = parity.held_out(cfg.length, cfg.eval_size, cfg.sampling)
    runs, models = {}, {}
    for name, width in widths.items():
        torch.manual_seed(cfg.seed)
        models[name] = build(name, cfg, width)
        runs[name] = train_model(name, models[name], cfg, held_out, log)
    return runs, models, held_out
