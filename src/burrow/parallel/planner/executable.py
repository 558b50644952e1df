"""Plans burrow can execute: `burrow train --plan plan.json` and `plan-parallel --executable`.

burrow's trainer gives every layer of a job (the embedding, each block, the head) one
tensor-parallel degree (inside pipeline stages too) and one pipeline, and lets each layer lay
its weights on the stage's data-parallel ranks its own way: any dp_replicate x dp_shard of the
same data-parallel degree (parallel/layouts.py: FSDP2 per layer), and recompute its
activations or not (blocks only: the embedding keeps no activations to recompute, and
burrow's fused loss keeps no logits, so the head's flag changes nothing). `executable_problem`
says what a plan asks beyond that, `search_executable` is Galvatron's search restricted to it
(at each tensor-parallel degree, the dynamic programme chooses each layer's data-parallel
layout and checkpointing), and `apply_plan` turns a plan into the train config's fields.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from burrow.errors import UserError
from burrow.parallel.limits import check_tensor_parallel, pipeline_refusal
from burrow.parallel.planner.hardware import CostInputs
from burrow.parallel.planner.plan import Plan
from burrow.parallel.planner.search import NoPlanFits, make_plan, solve_stage
from burrow.parallel.planner.stages import (
    Config,
    Job,
    StageProblem,
    configurations,
    evaluate,
)

if TYPE_CHECKING:
    from burrow.config import RunConfig

_FIX = "make the plan with burrow plan-parallel --executable"


def executable_problem(plan: Plan) -> str | None:
    """Why burrow cannot run `plan` as it is, naming the layer and what to change; None if
    it can."""
    reference = plan.layers[1]  # block 0
    for layer in plan.layers:
        if layer.tp != reference.tp:
            return (f"{layer.name} is spread as {layer.strategy.label()}, block 0 as "
                    f"{reference.strategy.label()}; burrow gives every layer one "
                    f"tensor-parallel degree: give {layer.name} tp {reference.tp}, or {_FIX}")
    return None


def plan_blocks_per_stage(plan: Plan) -> list[int]:
    """Blocks per pipeline stage: the plan's layer counts less the embedding (first stage)
    and the head (last stage)."""
    counts = list(plan.stages)
    counts[0] -= 1
    counts[-1] -= 1
    return counts


def apply_plan(cfg: RunConfig, plan: Plan, world_size: int) -> RunConfig:
    """`cfg` with the train fields `plan` sets: seq_len and the global batch, the degrees
    (pp, dp_replicate, dp_shard, tp), each layer's layout where they differ, the stage split,
    the micro-batches and the checkpointed blocks; UserError for a plan of another model or
    world size, or one burrow cannot run.

    The plan's micro_batch_size counts sequences per micro-batch over a stage's data-parallel
    ranks; TrainConfig.micro_batch_size is per rank: the plan's divided by dp_replicate x
    dp_shard (which the plan guarantees divides it). Layers laid out alike run as today's
    uniform jobs (ddp for replicas without tensor parallelism); layers laid out differently
    run under fsdp with train.layer_layouts, the job's own degrees block 0's."""
    seq_len = plan.model["seq_len"]
    if seq_len > cfg.model.max_seq_len:
        raise UserError(f"the plan trains on sequences of {seq_len} tokens, above this model's "
                        f"model.max_seq_len={cfg.model.max_seq_len}; make the plan with "
                        f"--seq-len {cfg.model.max_seq_len} or raise model.max_seq_len")
    plan.check(cfg.model, world_size, seq_len)
    problem = executable_problem(plan)
    if problem:
        raise UserError(f"burrow cannot execute the plan: {problem}")
    block = plan.layers[1]
    dp = block.dp_replicate * block.dp_shard
    layouts = [(layer.dp_replicate, layer.dp_shard) for layer in plan.layers]
    uniform = len(set(layouts)) == 1
    mode = ("none" if dp == 1 else "ddp" if uniform and block.dp_shard == 1 and block.tp == 1
            else "fsdp")
    checkpointed = [str(index) for index, layer in enumerate(plan.layers[1:-1])
                    if layer.checkpoint]
    pipelined = plan.pp > 1
    train = dataclasses.replace(
        cfg.train, seq_len=seq_len, batch_tokens=plan.global_batch * seq_len,
        micro_batch_size=plan.micro_batch_size // dp, parallel=mode,
        tensor_parallel=block.tp, pipeline_parallel=plan.pp,
        data_parallel_replicate=block.dp_replicate if mode != "none" else 0,
        data_parallel_shard=block.dp_shard if mode != "none" else 0,
        layer_layouts="none" if uniform else ",".join(f"{r}x{s}" for r, s in layouts),
        pipeline_split=",".join(map(str, plan_blocks_per_stage(plan))) if pipelined else "",
        pipeline_microbatches=plan.micro_batches if pipelined else 0,
        checkpoint_layers=",".join(checkpointed) or "none")
    result = dataclasses.replace(cfg, train=train)
    result.validate()
    return result


def _restricted(problem: StageProblem, tp: int) -> StageProblem:
    """The stage's problem with only the strategies of tensor-parallel degree `tp`: every
    data-parallel layout, checkpointing on or off."""
    keep = [index for index, strategy in enumerate(problem.strategies) if strategy.tp == tp]
    return dataclasses.replace(
        problem, strategies=[problem.strategies[index] for index in keep],
        per_micro_batch=problem.per_micro_batch[:, keep], sync=problem.sync[:, keep],
        memory=problem.memory[:, keep], units=problem.units[:, keep],
        transition=problem.transition[np.ix_(keep, keep)])


def _runs(job: Job, config: Config, tp: int) -> bool:
    """Whether burrow trains `job` as `config` says with tensor parallelism tp inside each
    stage (parallel/limits.py): the model splits over the stages and the tp ranks, and a
    pipeline has a micro-batch for each stage, which the trainer's 1F1B schedule needs (the
    schedule a plan runs under, and the one the cost model times)."""
    pp = config.pipeline
    if pp > 1 and (config.micro_batches < pp or pipeline_refusal(job.cfg, job.seq_len, tp)):
        return False
    try:
        check_tensor_parallel(job.cfg, tp)
    except UserError:
        return False
    return True


def search_executable(job: Job, inputs: CostInputs) -> Plan:
    """The fastest plan burrow can execute that fits: for each configuration of the outer
    loops (search.py) and each tensor-parallel degree burrow's tensor and pipeline
    parallelism can split the model with, Galvatron's programme choosing each layer's
    data-parallel layout and checkpointing. UserError when none fits."""
    best = None
    for config in sorted(configurations(job, inputs), key=Config.lower_bound):
        if best is not None and config.lower_bound() >= best.predicted_step_s:
            break
        for tp in sorted({strategy.tp for strategy in config.stages[0].strategies}):
            if not _runs(job, config, tp):
                continue
            problems = [_restricted(problem, tp) for problem in config.stages]
            choices = [solve_stage(problem) for problem in problems]
            if any(choice is None for choice in choices):
                continue
            chosen = [evaluate(problem, choice) for problem, choice in zip(problems, choices)]
            plan = make_plan(job, inputs, dataclasses.replace(config, stages=problems), chosen)
            if best is None or plan.predicted_step_s < best.predicted_step_s:
                best = plan
    if best is None:
        raise NoPlanFits("no plan burrow can execute fits (one tensor-parallel degree for "
                         "every layer, a micro-batch for each pipeline stage)",
                         ", or drop --executable for the full search")
    return best
