"""The papers' training recipes as data, beside their shapes (presets.py).

A recipe is how a paper trained: optimiser, learning rate and schedule, batch and its ramp,
clipping, weight decay, the loss's extra terms, each value with its source. `burrow train
--recipe NAME` applies one to any model; `burrow presets --recipes` prints them.

A recipe is written at the paper's scale (batches of millions of tokens, runs of 10^5 steps)
and applied at the run's: the optimiser's numbers (rates, betas, decay, clipping) are kept as
the paper gives them, while everything counted in steps or tokens is scaled. The run's
`--batch-tokens` stands for the paper's first batch and a ramp keeps the paper's multiples of
it; the run's `--max-steps` stands for the paper's run length, and the warmup and the ramp's
boundaries keep their fraction of it. `scale()` says what it did in lines the trainer prints.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from burrow import presets
from burrow.errors import UserError

GOPHER = "Rae et al. 2021 (Gopher), §3 and Table 1"
CHINCHILLA = "Hoffmann et al. 2022 (Chinchilla), §4.1, Table 4, Appendices B, D.1 and G"
PALM = "Chowdhery et al. 2022 (PaLM), §5 'Training setup'"
SWITCH = "Fedus et al. 2021 (Switch Transformer), §2.4 and §4.1; Raffel et al. 2020 (T5), §3.1.2"

SEQUENCE = 2048  # Gopher, Chinchilla and PaLM trained on 2,048-token sequences


@dataclass(frozen=True)
class Recipe:
    """How a paper trained a model, at the paper's scale."""

    name: str
    # Paper and sections the values come from.
    source: str
    # One line: what the recipe is.
    description: str
    # TrainConfig fields as the paper sets them (counts in steps are the paper's steps).
    train: dict[str, Any]
    # The paper's first batch, in tokens.
    batch_tokens: int
    # The paper's run length in optimiser steps (what warmup and ramp steps are fractions of).
    steps: int
    # (paper step, batch as a multiple of the first) where the batch changes.
    ramp: tuple[tuple[int, int], ...] = ()
    # ModelConfig fields the recipe sets (loss terms, dropout), not the model's shape.
    model: dict[str, Any] = field(default_factory=dict)
    # "bf16": the paper kept its parameters in bfloat16, updated with stochastic rounding
    # (train.param_dtype=bf16 on CUDA; float32 master weights elsewhere, said when applied).
    parameters: str = "fp32"
    # What the paper leaves open and burrow chose, or what burrow does differently.
    notes: str = ""


def _gopher(name: str, lr: float, batch_tokens: int, clip: float,
            parameters: str = "fp32", ramp: tuple[tuple[int, int], ...] = (),
            steps: int | None = None) -> Recipe:
    """Gopher §3: Adam (AdamW without decay), warmup from 1e-7 over 1,500 steps, cosine decay
    by 10x over the run, 300B tokens; Table 1: the size's maximum rate and batch; gradients
    clipped at 1.0, at 0.25 for 7.1B and Gopher."""
    return Recipe(
        name, GOPHER, f"Gopher family, {name.split('-')[1].upper()} row of Table 1",
        train={"optimizer": "adamw", "lr": lr, "schedule": "cosine", "warmup_steps": 1500,
               "warmup_init_lr": 1e-7, "min_lr_ratio": 0.1, "weight_decay": 0.0,
               "beta1": 0.9, "beta2": 0.95, "grad_clip": clip},
        batch_tokens=batch_tokens, steps=steps or round(300e9 / batch_tokens), ramp=ramp,
        parameters=parameters,
        notes="beta2 0.95: not in the paper; burrow's default, as GPT-3 used")


# Gopher 280B: batch 3M -> 6M "midway through training" (Chinchilla Table 4 caption), read as
# halfway through its 300B tokens: 150B / 3M-token steps, then 150B / 6M-token steps.
_G280_FIRST = round(150e9 / (1536 * SEQUENCE))
_G280_STEPS = _G280_FIRST + round(150e9 / (3072 * SEQUENCE))
# Chinchilla 70B: 1.5M -> 3M tokens halfway through its 1.4T tokens, likewise.
_C70_FIRST = round(0.7e12 / (768 * SEQUENCE))
_C70_STEPS = _C70_FIRST + round(0.7e12 / (1536 * SEQUENCE))

RECIPES: tuple[Recipe, ...] = (
    _gopher("gopher-44m", 6e-4, 128 * SEQUENCE, 1.0),
    _gopher("gopher-117m", 6e-4, 128 * SEQUENCE, 1.0),
    _gopher("gopher-417m", 2e-4, 128 * SEQUENCE, 1.0),
    _gopher("gopher-1.4b", 2e-4, 128 * SEQUENCE, 1.0),
    _gopher("gopher-7.1b", 1.2e-4, 1024 * SEQUENCE, 0.25, parameters="bf16"),
    _gopher("gopher-280b", 4e-5, 1536 * SEQUENCE, 0.25, parameters="bf16",
            ramp=((_G280_FIRST, 2),), steps=_G280_STEPS),
    Recipe(
        "chinchilla-70b", CHINCHILLA,
        "Chinchilla 70B: Gopher's setup with AdamW, a cosine cycle the length of the run",
        train={"optimizer": "adamw", "lr": 1e-4, "schedule": "cosine", "warmup_steps": 1500,
               "warmup_init_lr": 1e-7, "min_lr_ratio": 0.1, "weight_decay": 0.1,
               "beta1": 0.9, "beta2": 0.95, "grad_clip": 0.25, "schedule_steps": 0},
        batch_tokens=768 * SEQUENCE, steps=_C70_STEPS, ramp=((_C70_FIRST, 2),),
        notes=("the paper gives no weight-decay value (burrow's 0.1) and no clipping value "
               "(Gopher's 0.25 for its large models, as Chinchilla 'uses the same training setup "
               "as Gopher'); the cosine cycle is the run's own length (Appendix B: longer "
               "cycles cost loss); a float32 copy of the weights as the paper's Appendix G")),
    Recipe(
        "palm", PALM,
        "PaLM: Adafactor unfactored, 1e-2 then 1/sqrt(step), lr^2 weight decay, batch ramp",
        train={"optimizer": "adafactor", "lr": 1e-2, "schedule": "rsqrt",
               "warmup_steps": 10_000, "beta1": 0.9, "beta2_decay": 0.8,
               "weight_decay": 0.0, "weight_decay_lr_power": 2.0, "grad_clip": 1.0},
        batch_tokens=512 * SEQUENCE, steps=255_000, ramp=((50_000, 2), (115_000, 4)),
        model={"z_loss": 1e-4, "dropout": 0.0},
        notes=("the same for 8B, 62B and 540B; 255k steps is the 540B run (780B tokens); "
               "parameter scaling floor 1e-3, epsilon 1e-30, update clipping 1.0 "
               "(train/adafactor.py)")),
    Recipe(
        "switch", SWITCH,
        "Switch-Base pre-training: T5's Adafactor and inverse square root, 2^20-token batches",
        train={"optimizer": "adafactor", "lr": 1e-2, "schedule": "rsqrt",
               "warmup_steps": 10_000, "beta1": 0.0, "beta2_decay": 0.8,
               "weight_decay": 0.0, "grad_clip": 0.0},
        batch_tokens=2 ** 20, steps=550_000,
        model={"init": "switch", "moe.init_scale": 0.1, "moe.jitter": 0.01,
               "moe.capacity_factor": 1.25, "moe.eval_capacity_factor": 2.0,
               "moe.balance_loss": 0.01, "moe.router_z_loss": 0.0},
        notes=("§4.1: 2^20 tokens a batch for 550k steps; the paper names no optimiser: "
               "Switch is built on T5, whose pre-training used Adafactor (factored, without "
               "momentum: here unfactored with beta1 = 0) and 1/sqrt(max(n, 10^4)); "
               "no gradient clipping (Adafactor clips its updates); init: every weight matrix "
               "from a normal of variance 0.1 / fan-in truncated at 2 sigma (§2.4); router "
               "input jitter 0.01 (Appendix C; the value is Mesh TensorFlow's); no router "
               "z-loss (ST-MoE's addition, Zoph et al. 2022, not Switch's)")),
)

_BY_NAME = {recipe.name: recipe for recipe in RECIPES}
# `--recipe gopher` picks the Table 1 row nearest the model's size (the rows are named after
# the presets, whose published sizes they are).
FAMILIES = {"gopher": [r for r in RECIPES if r.name.startswith("gopher-")]}


def names() -> list[str]:
    return [*FAMILIES, *_BY_NAME]


def get(name: str, num_params: int | None = None) -> Recipe:
    """The recipe called `name`; a family name ("gopher") picks the row nearest num_params
    (in log size). UserError with suggestions for an unknown name."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in FAMILIES:
        params = num_params or 44e6
        return min(FAMILIES[name], key=lambda r: abs(
            math.log(presets.info(r.name).published_params / params)))
    close = difflib.get_close_matches(name, names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown recipe {name!r}{hint} (`burrow presets --recipes` lists them)")


@dataclass
class Scaled:
    """A recipe at a run's scale: the TrainConfig and ModelConfig fields to set, and lines
    saying what was scaled."""

    train: dict[str, Any]
    model: dict[str, Any]
    lines: list[str]


def scale(recipe: Recipe, *, batch_tokens: int, max_steps: int, granularity: int,
          keep: frozenset[str] = frozenset(), device_type: str = "cpu",
          sharded: bool = False) -> Scaled:
    """The recipe's fields for a run of `max_steps` steps whose first batch is `batch_tokens`.

    Fields named in `keep` (set on the command line) are left to the run. Step counts
    (warmup, ramp boundaries) keep their fraction of the paper's run, rounded, at least 1
    where the paper's is; the ramp's batches are the run's first batch times the paper's
    multiples, rounded down to a multiple of `granularity` (a micro-batch's tokens).
    """
    ratio = max_steps / recipe.steps
    train = {key: value for key, value in recipe.train.items() if key not in keep}
    lines = [f"recipe {recipe.name} ({recipe.source}): {recipe.description}"]
    if train.get("warmup_steps"):
        paper = train["warmup_steps"]
        train["warmup_steps"] = max(1, round(paper * ratio))
        lines.append(f"  warmup {paper:,} of the paper's {recipe.steps:,} steps -> "
                     f"{train['warmup_steps']:,} of {max_steps:,}")
    if recipe.ramp and "batch_ramp" not in keep:
        stages = []  # the batch before the first change is batch_tokens
        for step, multiple in recipe.ramp:
            tokens = batch_tokens * multiple
            tokens -= tokens % granularity
            stages.append(f"{max(1, round(step * ratio))}:{tokens}")
        train["batch_ramp"] = ",".join(stages)
        paper = ", ".join(f"x{multiple} at step {step:,}" for step, multiple in recipe.ramp)
        lines.append(f"  batch {recipe.batch_tokens:,} tokens ({paper}) -> {batch_tokens:,} "
                     f"tokens, ramp {train['batch_ramp']}")
    else:
        lines.append(f"  batch {recipe.batch_tokens:,} tokens -> {batch_tokens:,} (the run's)")
    model = {key: value for key, value in recipe.model.items() if f"model.{key}" not in keep}
    if recipe.parameters == "bf16" and "param_dtype" not in keep:
        # Gopher §3: bfloat16 parameters updated with stochastic rounding (train.param_dtype).
        # Where the device has no bf16 arithmetic (this CPU build) or the layout shards
        # parameters, float32 master weights stand in, as Chinchilla's Appendix G keeps them.
        if device_type == "cuda" and not sharded:
            train["param_dtype"] = "bf16"
            lines.append("  parameters: bfloat16, updated with stochastic rounding (Gopher §3)")
        else:
            why = ("FSDP, tensor and pipeline parallelism shard the parameters" if sharded
                   else f"{device_type} has no bf16 arithmetic")
            lines.append(f"  parameters: the paper kept them in bfloat16 with stochastic "
                         f"rounding; {why}, so float32 (--param-dtype bf16 forces it)")
    if keep & set(recipe.train):
        kept = ", ".join(sorted(keep & set(recipe.train)))
        lines.append(f"  kept from the command line: {kept}")
    return Scaled(train, model, lines)


def table_rows() -> list[dict[str, Any]]:
    """One row per recipe for `burrow presets --recipes`."""
    rows = []
    for recipe in RECIPES:
        t = recipe.train
        decay = (f"lr^{t['weight_decay_lr_power']:g}" if t.get("weight_decay_lr_power")
                 else f"{t.get('weight_decay', 0):g}")
        batch = f"{recipe.batch_tokens / 1e6:.2f}M"
        for _, multiple in recipe.ramp:
            batch += f" -> {recipe.batch_tokens * multiple / 1e6:.2f}M"
        rows.append({"name": recipe.name, "optimizer": t["optimizer"], "lr": t["lr"],
                     "schedule": t["schedule"], "warmup_steps": t.get("warmup_steps", 0),
                     "weight_decay": decay, "grad_clip": t.get("grad_clip", 0.0),
                     "batch": batch, "steps": recipe.steps, "parameters": recipe.parameters,
                     "source": recipe.source, "notes": recipe.notes,
                     "model": dict(recipe.model)})
    return rows


def apply_model_fields(model: dict[str, Any], fields: dict[str, Any]) -> None:
    """Set a recipe's model fields in a config's model section (a dict, RunConfig.to_dict's);
    fields of a part the model does not have (moe.* without experts, a section that is null)
    are skipped."""
    for dotted, value in fields.items():
        head, _, rest = dotted.partition(".")
        if not rest:
            model[head] = value
        elif model.get(head) and (head != "moe" or model["moe"]["num_experts"]):
            model[head][rest] = value
