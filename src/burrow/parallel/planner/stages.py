"""The outer loops' configurations and the problems they pose (Galvatron, Miao et al., VLDB
2023, §4): a pipeline degree p, a number of micro-batches m, the layers cut into p stages of
balanced time, and for each stage its layers' candidate strategies with what each costs (time
per micro-batch, time per step, memory in bytes and in units of the budget) and what changing
strategy between two layers costs. search.py solves them.

Memory is counted in MEMORY_UNITS units of the stage's budget, each layer's memory rounded up,
so a plan found always fits; Galvatron counts in MB, which at 80 GB is 80,000 units and too
slow here, while 2,048 units leaves at most one unit per layer (~4% of the budget over 82
layers) unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from burrow.errors import UserError
from burrow.parallel.planner.costmodel import (
    LayerCost,
    Step,
    Strategy,
    layer_cost,
    p2p_seconds,
    transition_seconds,
)
from burrow.parallel.planner.hardware import CostInputs
from burrow.parallel.planner.layers import LayerShape, model_layers
from burrow.units import format_bytes

if TYPE_CHECKING:
    from burrow.config import ModelConfig

# Units a stage's memory budget is counted in (see above).
MEMORY_UNITS = 2048
# Memory the plan leaves alone: Galvatron keeps 20% of a large GPU for PyTorch's caching
# allocator; here 10%, for fragmentation and the transient buffers the cost model does not
# count (FSDP's gathered weights of the layer computing, a checkpointed layer's recomputed
# activations), and 1 GiB for the CUDA context and NCCL's buffers.
RESERVED_FRACTION = 0.1
CONTEXT_BYTES = 2**30


@dataclass(frozen=True)
class Job:
    """What to plan: a model, its step, and the GPUs."""

    cfg: ModelConfig
    world_size: int
    # Sequences per step.
    global_batch: int
    seq_len: int
    preset: str | None = None
    precision: str = "bf16"
    flash_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("world_size", "global_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class StageProblem:
    """One pipeline stage's layers, their candidate strategies and what each costs."""

    names: list[str]
    strategies: list[Strategy]
    micro_batches: int
    # (layers, strategies): seconds per micro-batch, seconds per step of sync, bytes, units.
    per_micro_batch: np.ndarray
    sync: np.ndarray
    memory: np.ndarray
    units: np.ndarray
    # (strategies, strategies): seconds per micro-batch to change strategy between two layers.
    transition: np.ndarray
    budget_units: int
    # Seconds per micro-batch of pipeline sends into and out of the stage.
    p2p: float

    @property
    def objective(self) -> np.ndarray:
        """The stage's time per step that a layer's strategy adds (the programme's c)."""
        return self.micro_batches * self.per_micro_batch + self.sync


@dataclass(frozen=True)
class StageChoice:
    """One stage's strategies (indices into its problem's) and what they cost."""

    choice: list[int]
    per_micro_batch: float
    sync: float
    memory: float
    units: int


def evaluate(problem: StageProblem, choice: list[int]) -> StageChoice:
    """The cost of giving layer i of the stage strategy choice[i]."""
    rows, picked = np.arange(len(choice)), np.array(choice)
    switches = problem.transition[picked[:-1], picked[1:]].sum()
    return StageChoice(list(choice),
                       float(problem.per_micro_batch[rows, choice].sum() + switches + problem.p2p),
                       float(problem.sync[rows, choice].sum()),
                       float(problem.memory[rows, choice].sum()) + CONTEXT_BYTES,
                       int(problem.units[rows, choice].sum()))


def candidates(cfg: ModelConfig, devices: int, gpus_per_node: int) -> list[Strategy]:
    """The strategies a stage of `devices` GPUs considers: Galvatron's decision trees (§3)
    with its pruning. TP degrees are powers of two within one node (TP talks most) that divide
    the GPUs, the heads and the MLP width; the data-parallel degree takes the rest, as plain
    replicas or as shards, alternatives for a layer as on Galvatron's trees, not mixed; each
    with checkpointing off or on. Checkpointing off comes first, so ties go to it."""
    found = []
    for checkpoint in (False, True):
        tp = 1
        while tp <= min(devices, gpus_per_node):
            if devices % tp == 0 and cfg.n_heads % tp == 0 and cfg.ffn_size % tp == 0:
                dp = devices // tp
                kinds = [(dp, 1), (1, dp)] if dp > 1 else [(1, 1)]
                found += [Strategy(tp, replicas, shards, checkpoint) for replicas, shards in kinds]
            tp *= 2
    return found


def balanced_split(weights: list[float], stages: int) -> list[int]:
    """Layer counts of `stages` contiguous non-empty stages whose heaviest total weight is least
    (bisection on that total; at each try the stages are filled in order)."""
    low, high = max(weights, default=0.0), sum(weights)
    for _ in range(60):
        middle = (low + high) / 2
        if _fill(weights, middle, stages) is None:
            low = middle
        else:
            high = middle
    counts = _fill(weights, high, stages)
    assert counts is not None  # the total of all weights always admits a split
    return counts


def _fill(weights: list[float], limit: float, stages: int) -> list[int] | None:
    """Stages filled in order up to `limit` each, each cut early enough that every later stage
    still gets a layer; None if that takes more than `stages` stages or one layer exceeds."""
    limit *= 1 + 1e-12  # bisection's rounding must not refuse the exact optimum
    counts, run, total = [], 0, 0.0
    for index, weight in enumerate(weights):
        if run and (total + weight > limit or len(weights) - index < stages - len(counts)):
            counts.append(run)
            run, total = 0, 0.0
        run, total = run + 1, total + weight
        if total > limit:
            return None
    counts.append(run)
    return counts if len(counts) == stages else None


@dataclass(frozen=True)
class Config:
    """One turn of the outer loops: a pipeline degree, a number of micro-batches, and the
    stages' problems under the split they give."""

    pipeline: int
    micro_batches: int
    micro_batch_size: int
    split: list[int]
    stages: list[StageProblem]

    def step_seconds(self, chosen: list[StageChoice]) -> float:
        """1F1B's step: sum(t_i) + (m - 1) max(t_i) + max(sync_i)."""
        times = [stage.per_micro_batch for stage in chosen]
        return (sum(times) + (self.micro_batches - 1) * max(times)
                + max(stage.sync for stage in chosen))

    def lower_bound(self) -> float:
        """A step time no choice of strategies beats: each layer at its fastest, no switches."""
        chosen = [StageChoice([], float(p.per_micro_batch.min(axis=1).sum()) + p.p2p,
                              float(p.sync.min(axis=1).sum()), 0.0, 0) for p in self.stages]
        return self.step_seconds(chosen)


def stage_budget(inputs: CostInputs) -> float:
    """Bytes per GPU the layers may use: the memory less the reserve and the context."""
    usable = inputs.memory_bytes * (1 - RESERVED_FRACTION) - CONTEXT_BYTES
    if usable <= 0:
        raise UserError(f"{format_bytes(inputs.memory_bytes)} per GPU leaves nothing for the "
                        f"model once {format_bytes(CONTEXT_BYTES)} of context and "
                        f"{RESERVED_FRACTION:.0%} headroom are set aside; give more --memory")
    return usable


def configure(job: Job, inputs: CostInputs, pipeline: int, micro_batches: int) -> Config | None:
    """The stages' problems for (pipeline, micro_batches); None if no strategy suits the
    micro-batch (its size must be a multiple of every data-parallel degree)."""
    devices = job.world_size // pipeline
    size = job.global_batch // micro_batches
    options = [s for s in candidates(job.cfg, devices, inputs.gpus_per_node) if size % s.dp == 0]
    if not options:
        return None
    layers = model_layers(job.cfg, job.seq_len, precision=job.precision,
                          flash_attention=job.flash_attention, shared_head=pipeline == 1)
    step = Step(job.seq_len, size, micro_batches, 1, devices, job.precision)
    cache: dict = {}
    weights = [min(cost.step_seconds(micro_batches)
                   for cost in _costs(layer, options, step, inputs, cache)) for layer in layers]
    split = balanced_split(weights, pipeline)
    boundary = layers[0].boundary_bytes_per_token
    switch = np.array([[transition_seconds(a, b, step, boundary, inputs) for b in options]
                       for a in options])
    # Boundary b (after stage b) is between nodes when stages are whole nodes or it falls on a
    # node's edge.
    nodes = inputs.gpus_per_node
    sends = [p2p_seconds(step, boundary, job.world_size > nodes and (
        devices >= nodes or (b + 1) * devices % nodes == 0), inputs) for b in range(pipeline - 1)]
    unit = stage_budget(inputs) / MEMORY_UNITS
    stages, first = [], 0
    for index, count in enumerate(split):
        stage_step = replace(step, in_flight=min(pipeline - index, micro_batches))
        rows = [_costs(layer, options, stage_step, inputs, cache)
                for layer in layers[first:first + count]]
        memory = np.array([[c.memory_bytes for c in row] for row in rows])
        # activations out to the next stage, gradients back to the previous one
        p2p = (sends[index] if index < pipeline - 1 else 0.0) + (
            sends[index - 1] if index > 0 else 0.0)
        stages.append(StageProblem(
            [layer.name for layer in layers[first:first + count]], options, micro_batches,
            np.array([[c.forward_s + c.backward_s for c in row] for row in rows]),
            np.array([[c.sync_s for c in row] for row in rows]), memory,
            np.ceil(memory / unit).astype(np.int64), switch, MEMORY_UNITS, p2p))
        first += count
    return Config(pipeline, micro_batches, size, split, stages)


def _costs(layer: LayerShape, options: list[Strategy], step: Step, inputs: CostInputs,
           cache: dict) -> list[LayerCost]:
    """The layer's cost under each option; the blocks of one shape share one computation."""
    key = (replace(layer, name=""), step)
    if key not in cache:
        cache[key] = [layer_cost(layer, option, step, inputs) for option in options]
    return cache[key]


def configurations(job: Job, inputs: CostInputs) -> list[Config]:
    """Every (pipeline degree, micro-batches) the outer loops visit: pipeline degrees are powers
    of two dividing the GPUs with at least one layer per stage; micro-batch counts divide the
    global batch."""
    layers = job.cfg.n_layers + 2
    found = []
    pipeline = 1
    while pipeline <= min(job.world_size, layers):
        if job.world_size % pipeline == 0:
            for micro_batches in _divisors(job.global_batch):
                config = configure(job, inputs, pipeline, micro_batches)
                if config is not None:
                    found.append(config)
        pipeline *= 2
    if not found:
        raise UserError(f"a global batch of {job.global_batch} sequences cannot be split over "
                        f"{job.world_size} GPUs by any pipeline and tensor-parallel degree; "
                        "raise --global-batch")
    return found


def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return sorted(set(small + [number // d for d in small]))
