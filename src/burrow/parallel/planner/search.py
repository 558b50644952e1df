"""Galvatron's search (Miao et al., VLDB 2023, §4): the fastest per-layer plan that fits memory.

Outer loops, as Galvatron's: the pipeline degree p (powers of two dividing the GPUs, PP across
nodes) and the number of micro-batches m (dividing the global batch); stages.py turns each
(p, m) into one problem per pipeline stage. Each stage's strategies are chosen by a dynamic
programme over (layer, memory used, strategy of the layer): the least time of the first l
layers within memory E, with layer l under strategy S, is

    C(l, E, S) = c(l, S) + min over S' of [C(l - 1, E - o(l, S), S') + R(S', S)]

with c the layer's time, o its memory and R the cost of handing the activation from S' to S
(costmodel.py).

Each stage's programme minimises the stage's own time per step, m x (its time per micro-batch)
+ (its gradient synchronisation); the step time of a plan is 1F1B's: the first micro-batch
passes every stage, the other m - 1 follow at the pace of the slowest, then the slowest stage's
gradient synchronisation: sum(t_i) + (m - 1) max(t_i) + max(sync_i). The same numbers give the
best uniform plan (one strategy for every layer) and the pure DDP and FSDP baselines, so the
three are compared on equal terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from burrow.errors import UserError
from burrow.parallel.planner.hardware import CostInputs
from burrow.parallel.planner.plan import LayerPlan, Plan, mesh_of, model_fingerprint
from burrow.parallel.planner.stages import (
    CONTEXT_BYTES,
    RESERVED_FRACTION,
    Config,
    Job,
    StageChoice,
    StageProblem,
    configurations,
    evaluate,
    stage_budget,
)
from burrow.units import format_bytes


def solve_stage(problem: StageProblem) -> list[int] | None:
    """Galvatron's dynamic programme over (layer, memory units, strategy); None if nothing fits.

    best[u, s] is the least time of the layers so far within u units with the last one under
    strategy s; back[l, u, s] the strategy of layer l - 1 on that path.
    """
    budget, cost, units = problem.budget_units, problem.objective, problem.units
    layers, count = units.shape
    switch = problem.micro_batches * problem.transition
    best = np.full((budget + 1, count), np.inf)
    for s in range(count):
        if units[0, s] <= budget:
            best[units[0, s]:, s] = cost[0, s]
    back = np.zeros((layers, budget + 1, count), dtype=np.int16)
    for layer in range(1, layers):
        new = np.full_like(best, np.inf)
        for s in range(count):
            width = units[layer, s]
            if width > budget:
                continue
            prior = best[:budget + 1 - width] + switch[:, s]  # (memory left, strategy before)
            arg = prior.argmin(axis=1)
            new[width:, s] = np.take_along_axis(prior, arg[:, None], 1)[:, 0] + cost[layer, s]
            back[layer, width:, s] = arg
        best = new
    s = int(best[budget].argmin())
    if not np.isfinite(best[budget, s]):
        return None
    choice, left = [s], budget
    for layer in range(layers - 1, 0, -1):
        s, left = int(back[layer, left, s]), left - int(units[layer, s])
        choice.append(s)
    return choice[::-1]


class NoPlanFits(UserError):
    """No plan fits in memory. The message names plan-parallel's flags; `advice(changes)`
    words it for a command whose GPUs come from elsewhere (`burrow plan --cluster`)."""

    def __init__(self, reason: str, note: str = ""):
        self.reason, self.note = reason, note
        super().__init__(self.advice("more --memory, more --gpus or a smaller --global-batch"))

    def advice(self, changes: str) -> str:
        return f"{self.reason}; give {changes}{self.note}"


@dataclass(frozen=True)
class Outcome:
    """The best plan of one kind (searched, uniform, a baseline), or what the leanest needs."""

    plan: Plan | None
    # Without a plan: the memory a GPU would need for the leanest plan of the kind, its peak
    # plus the headroom RESERVED_FRACTION (None: no plan of the kind exists for this job, e.g.
    # a batch too small to split over all GPUs).
    needs_bytes: float | None = None


@dataclass(frozen=True)
class SearchResult:
    best: Plan
    uniform: Outcome
    # "fsdp": every layer sharded over all GPUs; "ddp": every layer replicated on all GPUs.
    baselines: dict[str, Outcome]


def search(job: Job, inputs: CostInputs) -> SearchResult:
    """The fastest plan for `job` that fits, the best uniform plan, and the DDP and FSDP
    baselines. Configurations are visited from the lowest lower bound up, and the visit stops
    when no remaining one can beat the best plan found."""
    configs = sorted(configurations(job, inputs), key=Config.lower_bound)
    best, best_seconds = None, math.inf
    for config in configs:
        if config.lower_bound() >= best_seconds:
            break
        chosen = []
        for problem in config.stages:
            choice = solve_stage(problem)
            if choice is None:
                break
            chosen.append(evaluate(problem, choice))
        else:
            seconds = config.step_seconds(chosen)
            if seconds < best_seconds:
                best, best_seconds = make_plan(job, inputs, config, chosen), seconds
    if best is None:
        raise no_fit_error(configs, inputs)
    world = job.world_size
    baselines = {"fsdp": uniform(job, inputs, configs, (1, 1, world)),
                 "ddp": uniform(job, inputs, configs, (1, world, 1))}
    return SearchResult(best, uniform(job, inputs, configs), baselines)


def uniform(job: Job, inputs: CostInputs, configs: list[Config],
            degrees: tuple[int, int, int] | None = None) -> Outcome:
    """The fastest plan that gives every layer one strategy; with `degrees` (tp, dp_replicate,
    dp_shard) only those, on one pipeline stage, checkpointing on or off, as a baseline."""
    best, leanest = None, math.inf
    for config in configs:
        if degrees is not None and config.pipeline != 1:
            continue
        for index, strategy in enumerate(config.stages[0].strategies):
            if degrees not in (None, (strategy.tp, strategy.dp_replicate, strategy.dp_shard)):
                continue
            chosen = [evaluate(p, [index] * len(p.names)) for p in config.stages]
            if any(c.units > p.budget_units for c, p in zip(chosen, config.stages)):
                leanest = min(leanest, max(c.memory for c in chosen))
                continue
            plan = make_plan(job, inputs, config, chosen)
            if best is None or plan.predicted_step_s < best.predicted_step_s:
                best = plan
    needs = None if best or leanest == math.inf else leanest / (1 - RESERVED_FRACTION)
    return Outcome(best, needs)


def make_plan(job: Job, inputs: CostInputs, config: Config, chosen: list[StageChoice]) -> Plan:
    """The Plan of a configuration and its stages' choices."""
    names, strategies = [], []
    for problem, stage in zip(config.stages, chosen):
        names += problem.names
        strategies += [problem.strategies[index] for index in stage.choice]
    return Plan(model=model_fingerprint(job.cfg, job.seq_len, job.preset),
                world_size=job.world_size, mesh=mesh_of(strategies, config.pipeline),
                stages=tuple(config.split), micro_batches=config.micro_batches,
                micro_batch_size=config.micro_batch_size,
                layers=tuple(LayerPlan.of(n, s) for n, s in zip(names, strategies)),
                predicted_step_s=config.step_seconds(chosen),
                peak_memory_bytes=max(stage.memory for stage in chosen), hardware=inputs.name)


def no_fit_error(configs: list[Config], inputs: CostInputs) -> NoPlanFits:
    """Why nothing fits, in one line: the leanest configuration's heaviest stage, and the
    layer in it that needs most under its leanest strategy."""
    def heaviest(config: Config) -> tuple[float, int]:
        totals = [p.memory.min(axis=1).sum() for p in config.stages]
        return max(totals), int(np.argmax(totals))

    config = min(configs, key=lambda c: heaviest(c)[0])
    total, index = heaviest(config)
    problem = config.stages[index]
    leanest = problem.memory.min(axis=1)
    layer = int(leanest.argmax())
    strategy = problem.strategies[int(problem.memory[layer].argmin())]
    usable = stage_budget(inputs)
    where = (f"(pp {config.pipeline}, {config.micro_batches} micro-batches of "
             f"{config.micro_batch_size})")
    held = (f"{format_bytes(usable)} a GPU has for layers ({format_bytes(inputs.memory_bytes)} "
            f"less {RESERVED_FRACTION:.0%} headroom and {format_bytes(CONTEXT_BYTES)} of context)")
    if leanest[layer] > usable:
        found = (f"{problem.names[layer]} alone needs {format_bytes(leanest[layer])} at its "
                 f"leanest ({strategy.label()}, {where}), above the {held}")
    else:
        found = (f"at the leanest {where} stage {index} needs {format_bytes(total)} for its "
                 f"{len(problem.names)} layers, above the {held}; its largest is "
                 f"{problem.names[layer]} at {format_bytes(leanest[layer])} "
                 f"({strategy.label()})")
    return NoPlanFits(f"no plan fits: {found}")
