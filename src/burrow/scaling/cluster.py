"""From a budget to a wall clock on a cluster: `burrow plan --cluster 64xh100`.

`burrow plan` alone turns a budget into the law's N_opt and D_opt and the nearest architecture;
with `--cluster COUNTxGPU` it also searches that model's parallel plan on those GPUs
(Galvatron's planner, Miao et al. VLDB 2023: burrow.parallel.planner) and reads the wall clock
off the plan's predicted step: tokens/s = tokens per step / step time, days = D / tokens/s /
86400, GPU-hours = days x 24 x GPUs.

A budget in GPU-hours needs an MFU to become FLOPs (C = hours x 3600 x peak x MFU), and the MFU
depends on the model, which depends on C. So the rounds go: guess the MFU (`--mfu`, default
0.4), apply the law to the C it gives, build the shape, plan it, take the plan's MFU, and
apply the law again to the C that MFU gives. They stop at a fixed point, when that C builds
the shape just planned: the plan, its MFU, C and the law agree. Neighbouring shapes can plan
at quite different MFUs (47 heads of 128 admit no tensor parallelism, 46 do), so the rounds
may instead return to a shape planned before; they stop then, or after MAX_ROUNDS, and keep
the shape visited that the law predicts the lowest loss for, L(N, D) with D the tokens its
plan trains in the hours given; the report says there was no fixed point. Either way the
result is one consistent pair, a shape planned and the C its own plan's MFU implies, so the
GPU-hours it takes are the GPU-hours given, and the law's N_opt at that C is the shape's N
within one step of the shape builder.

The MFU that turns hours into C counts FLOPs as the law does, C = 6ND: tokens/s x 6N / peak,
N the weights a token meets (flops.matmul_params). PaLM's MFU (appendix B), which adds the
attention FLOPs and which the trainer's log and `burrow plan-parallel` print, is reported
beside it as mfu_with_attention. Arithmetic only: no torch.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.flops import flops_per_token, matmul_params, mfu
from burrow.parallel.planner import CostInputs, Hardware, Job, Plan, get_hardware, search
from burrow.parallel.planner.commands import (
    describe_mesh,
    describe_shape,
    format_seconds,
    global_batch_sequences,
    stage_lines,
)
from burrow.parallel.planner.executable import search_executable
from burrow.parallel.planner.layers import PRECISIONS
from burrow.parallel.planner.search import NoPlanFits
from burrow.scaling import plan as planning
from burrow.scaling.laws import ScalingLaw, get_law
from burrow.scaling.shapes import choose_shape
from burrow.units import format_bytes, format_count, format_duration, parse_bytes

# Rounds of law -> shape -> plan -> MFU before giving up on a fixed point. From the default
# guess of 0.4 the first plan moves the MFU by tens of percent and N_opt by about 0.45 times
# as much (N_opt ∝ C^0.45 under Chinchilla's approach 3); later rounds move both by a few
# percent, and the shape settles in two or three rounds in most cases.
MAX_ROUNDS = 6
SECONDS_PER_DAY = 86_400.0
_CLUSTER = re.compile(r"^\s*(\d+)\s*x\s*(\S.*?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Cluster:
    """GPUs of one kind training together, and the step they run."""

    gpus: int
    hardware: Hardware
    # Memory per GPU the plan may use, bytes.
    memory_bytes: float
    # Sequences per step.
    global_batch: int
    seq_len: int = planning.PLAN_SEQ_LEN
    # "bf16" (mixed precision) or "fp32".
    precision: str = "bf16"
    # Search only plans `burrow train --plan` runs (one tensor-parallel degree for every
    # layer, a data-parallel layout per layer): what an emitted config's launch line starts
    # (parallel/planner/executable.py).
    executable: bool = False

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.hardware.gpus_per_node)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def describe(self) -> dict[str, Any]:
        """The JSON form: what was planned for."""
        return {"gpus": self.gpus, "hardware": self.hardware.name, "nodes": self.nodes,
                "gpus_per_node": min(self.gpus, self.hardware.gpus_per_node),
                "peak_flops": self.hardware.peak_flops, "memory_bytes": self.memory_bytes,
                "seq_len": self.seq_len, "global_batch_sequences": self.global_batch,
                "global_batch_tokens": self.tokens_per_step, "precision": self.precision,
                "executable": self.executable}


def parse_cluster(text: str, *, memory: str | None = None, global_batch: int | None = None,
                  precision: str = "bf16", executable: bool = False) -> Cluster:
    """'64xh100' -> 64 GPUs of the planner's h100 row; `memory` ('80GB') defaults to its HBM,
    `global_batch` (tokens) to plan-parallel's 2^21."""
    found = _CLUSTER.match(text)
    if found is None:
        raise UserError(f"--cluster {text!r} is not COUNTxGPU; write e.g. --cluster 64xh100")
    count, name = int(found.group(1)), found.group(2)
    try:
        hardware = get_hardware(name)
    except UserError as error:
        raise UserError(f"--cluster {text}: {error}") from None
    per_node = hardware.gpus_per_node
    if count < 1:
        raise UserError(f"--cluster {text}: the number of GPUs must be at least 1")
    # torchrun starts the same number of processes on every node.
    if count > per_node and count % per_node:
        whole = count // per_node * per_node
        raise UserError(f"--cluster {text}: more than one node must be whole nodes of "
                        f"{per_node} {hardware.name}; use {whole} or {whole + per_node}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision} is not one the parallel planner models; with "
                        f"--cluster use {' or '.join(PRECISIONS)}")
    memory_bytes = parse_bytes(memory, "--memory") if memory else hardware.memory_bytes
    # Sequences of the shape builder's 2048-token context (Gopher's and Chinchilla's). Without
    # --global-batch, plan-parallel's 2^21 tokens a step: Gopher 7.1B's 2M batch (Rae et al.
    # 2021, Table 1), between the 1.5M and 3M tokens Chinchilla 70B trained with (Hoffmann et
    # al. 2022, Table 4).
    seq_len = planning.PLAN_SEQ_LEN
    sequences = global_batch_sequences(global_batch, seq_len)
    return Cluster(count, hardware, memory_bytes, sequences, seq_len, precision, executable)


@dataclass(frozen=True)
class Speed:
    """A model's searched plan on a cluster and what it predicts."""

    plan: Plan
    tokens_per_second: float
    # tokens/s x 6N / peak: the share of the peak that C = 6ND counts (the budget's MFU).
    mfu: float
    # PaLM appendix B's MFU, attention included (the trainer's log, plan-parallel).
    mfu_with_attention: float


def plan_speed(cfg: ModelConfig, cluster: Cluster) -> Speed:
    """Search the fastest plan of `cfg` on `cluster` and its throughput."""
    inputs = CostInputs.from_hardware(cluster.hardware, memory_bytes=cluster.memory_bytes)
    job = Job(cfg, cluster.gpus, cluster.global_batch, cluster.seq_len,
              precision=cluster.precision)
    try:
        best = (search_executable(job, inputs) if cluster.executable
                else search(job, inputs).best)
    except NoPlanFits as error:  # here the GPUs come from --cluster
        raise UserError(error.advice("more --memory, more GPUs in --cluster or a smaller "
                                     "--global-batch")) from None
    tokens_per_second = cluster.tokens_per_step / best.predicted_step_s
    peak = cluster.gpus * cluster.hardware.peak_flops
    return Speed(best, tokens_per_second,
                 mfu(tokens_per_second, 6.0 * matmul_params(cfg), peak),
                 mfu(tokens_per_second, flops_per_token(cfg, cluster.seq_len), peak))


def converge(gpu_hours: float, cluster: Cluster, law: ScalingLaw, *, arch: str, vocab_size: int,
             first_mfu: float) -> tuple[float, ModelConfig, Speed, list[dict[str, Any]], bool]:
    """The rounds of the module docstring: (C, the shape kept, its Speed, one record per round,
    whether they reached a fixed point)."""
    peak_hours = gpu_hours * planning.SECONDS_PER_HOUR * cluster.hardware.peak_flops
    flops, assumed = peak_hours * first_mfu, first_mfu
    cfg = shape_for(flops, law, arch=arch, vocab_size=vocab_size)
    # Each shape planned, its Speed, and the C its plan's MFU implies for the hours given.
    visited: list[tuple[ModelConfig, Speed, float]] = []
    rounds: list[dict[str, Any]] = []
    for number in range(1, MAX_ROUNDS + 1):
        speed = plan_speed(cfg, cluster)
        implied = peak_hours * speed.mfu
        visited.append((cfg, speed, implied))
        rounds.append({"round": number, "mfu_assumed": assumed, "flops": flops,
                       "params": matmul_params(cfg), "n_layers": cfg.n_layers,
                       "d_model": cfg.d_model, "mfu": speed.mfu, "flops_implied": implied})
        following = shape_for(implied, law, arch=arch, vocab_size=vocab_size)
        if following == cfg:
            return implied, cfg, speed, rounds, True
        if any(following == shape for shape, _, _ in visited):
            break
        flops, assumed, cfg = implied, speed.mfu, following
    # A cycle (or MAX_ROUNDS): neighbouring shapes plan at different MFUs, e.g. one whose head
    # count admits tensor parallelism and one whose does not, and none is the nearest shape to
    # the N_opt of the C its own plan implies. Every shape visited spends exactly the hours
    # given; keep the one whose tokens in those hours the law predicts the lowest loss for.
    cfg, speed, implied = min(visited, key=lambda seen: _rank(law, seen[0], seen[2]))
    return implied, cfg, speed, rounds, False


def _rank(law: ScalingLaw, cfg: ModelConfig, flops: float) -> float:
    """The law's loss of `cfg` trained on `flops`; for a law without a loss, how far its N is
    from N_opt (log ratio)."""
    n_params = matmul_params(cfg)
    loss = law.loss(n_params, flops / (6.0 * n_params))
    return abs(math.log(n_params / law.optimal(flops)[0])) if loss is None else loss


def shape_for(flops: float, law: ScalingLaw, *, arch: str, vocab_size: int) -> ModelConfig:
    """The nearest architecture to the law's N_opt at `flops`."""
    n_opt, _ = law.optimal(flops)
    return choose_shape(n_opt, vocab_size=vocab_size, max_seq_len=planning.PLAN_SEQ_LEN,
                        arch=arch)


def plan_on_cluster(cluster: Cluster, *, flops: float | None = None,
                    gpu_hours: float | None = None, preset: str | None = None,
                    tokens: float | None = None, law: str = "chinchilla", arch: str = "llama",
                    vocab_size: int = 32_000,
                    first_mfu: float = 0.4) -> dict[str, Any]:
    """`burrow plan`'s result for the budget (its "budget" included) with the cluster's plan,
    its speed and wall clock added. A budget in GPU-hours goes through `converge`; one in
    FLOPs (or a preset's) is planned once."""
    chosen = get_law(law)
    guess = _device(cluster, first_mfu)
    spent = planning.budget(flops=flops, gpu_hours=gpu_hours, preset=preset, tokens=tokens,
                            device=guess)
    if gpu_hours is None:
        total = spent["flops"]
        cfg = shape_for(total, chosen, arch=arch, vocab_size=vocab_size)
        speed = plan_speed(cfg, cluster)
        rounds = [{"round": 1, "mfu_assumed": None, "flops": total,
                   "params": matmul_params(cfg), "n_layers": cfg.n_layers,
                   "d_model": cfg.d_model, "mfu": speed.mfu, "flops_implied": None}]
        converged = True
    else:
        total, cfg, speed, rounds, converged = converge(
            gpu_hours, cluster, chosen, arch=arch, vocab_size=vocab_size, first_mfu=first_mfu)
        spent = planning.budget(gpu_hours=gpu_hours, device=_device(cluster, speed.mfu))
    result = planning.plan(total, law=law, arch=arch, vocab_size=vocab_size)
    # The shape planned; the law's N_opt rounds to it unless the rounds stopped unconverged.
    result["model"] = planning.describe_model(cfg, total, arch)
    train_tokens = result["model"]["tokens"]
    if train_tokens < cluster.tokens_per_step:
        raise UserError(f"the budget buys {format_count(train_tokens)} tokens, less than one "
                        f"step of {cluster.tokens_per_step:,} tokens on {cluster.gpus} "
                        f"{cluster.hardware.name}; raise the budget or lower --global-batch")
    result["time"] = planning.wall_clock(total, _device(cluster, speed.mfu), cluster.gpus)
    days = train_tokens / speed.tokens_per_second / SECONDS_PER_DAY
    result.update({
        "plan": speed.plan.to_dict(), "predicted_step_s": speed.plan.predicted_step_s,
        "peak_memory_bytes": speed.plan.peak_memory_bytes,
        "tokens_per_second": speed.tokens_per_second, "mfu": speed.mfu,
        "mfu_with_attention": speed.mfu_with_attention, "days": days,
        "gpu_hours": days * 24 * cluster.gpus, "cluster": cluster.describe(),
        "rounds": rounds, "converged": converged, "budget": spent})
    return result


def _device(cluster: Cluster, utilisation: float) -> planning.Hardware:
    """The cluster's GPU as `burrow plan`'s Hardware: bf16 dense peak at this MFU."""
    return planning.Hardware(cluster.hardware.name, "bf16", cluster.hardware.peak_flops,
                             utilisation)


def train_batch(result: dict[str, Any]) -> dict[str, int]:
    """run_config's batch for the plan: its global batch, and the sequences one rank's forward
    pass holds (a micro-batch over the mesh's data-parallel ranks)."""
    plan = Plan.from_dict(result["plan"])
    ranks = plan.mesh["dp_replicate"] * plan.mesh["dp_shard"]
    return {"batch_tokens": result["cluster"]["global_batch_tokens"],
            "micro_batch_size": max(1, plan.micro_batch_size // ranks)}


def emit_plan(result: dict[str, Any], config_path: Path) -> dict[str, str]:
    """Write the plan beside the run config (PATH.yaml -> PATH.plan.json) and return its path
    and the torchrun command that starts the run."""
    plan_path = config_path.with_suffix(".plan.json")
    Plan.from_dict(result["plan"]).save(plan_path)
    cluster = result["cluster"]
    if cluster["nodes"] == 1:
        where = "--standalone"
    else:  # run on every node; HOST is the first node's address
        where = "--rdzv_backend c10d --rdzv_endpoint HOST:29500"
    launch = (f"torchrun --nnodes {cluster['nodes']} --nproc_per_node "
              f"{cluster['gpus_per_node']} {where} -m burrow train --config "
              f"{shlex.quote(str(config_path))} --plan {shlex.quote(str(plan_path))}")
    return {"emitted_plan": str(plan_path), "launch": launch}


def format_cluster(result: dict[str, Any]) -> list[str]:
    """The text report's lines about the cluster: the plan, its speed, the wall clock."""
    cluster, plan = result["cluster"], Plan.from_dict(result["plan"])
    lines = [f"cluster   {cluster['gpus']} x {cluster['hardware']} ({cluster['nodes']} node"
             f"{'s' if cluster['nodes'] > 1 else ''} of {cluster['gpus_per_node']}, "
             f"{format_bytes(cluster['memory_bytes'])} each), "
             f"{cluster['global_batch_sequences']:,} sequences of {cluster['seq_len']:,} "
             "tokens a step",
             f"plan      {describe_shape(plan)}; mesh {describe_mesh(plan)}"
             + (" (one tensor-parallel degree for every layer: burrow train --plan runs it)"
                if cluster.get("executable") else ""),
             *stage_lines(plan, indent=" " * 10),
             f"speed     {format_seconds(result['predicted_step_s'])} a step, "
             f"{format_count(result['tokens_per_second'])} tokens/s, MFU "
             f"{result['mfu']:.1%} counting 6N per token as C = 6ND does "
             f"({result['mfu_with_attention']:.1%} with attention, PaLM appendix B), "
             f"{format_bytes(result['peak_memory_bytes'])} a GPU",
             f"train     D = {format_count(result['model']['tokens'])} tokens in "
             f"{_days(result['days'])} on {cluster['gpus']} GPUs = "
             f"{_hours(result['gpu_hours'])} GPU-hours "
             "(predicted by the cost model, not measured)"]
    if len(result["rounds"]) > 1 or result["rounds"][0]["mfu_assumed"] is not None:
        lines.append("rounds    " + _rounds_text(result["rounds"], result["converged"],
                                                   result["model"]))
    return lines


def _days(days: float) -> str:
    """32.552 -> '32.6 days'; under a day '5h07m', under a minute '310 ms'."""
    seconds = days * SECONDS_PER_DAY
    if days >= 1:
        return f"{days:.3g} days"
    return format_duration(seconds) if seconds >= 60 else format_seconds(seconds)


def _hours(hours: float) -> str:
    """50000.0 -> '50,000'; 0.0123 -> '0.0123'."""
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def _rounds_text(rounds: list[dict[str, Any]], converged: bool, model: dict[str, Any]) -> str:
    steps = [f"MFU {rounds[0]['mfu_assumed']:.1%} assumed"]
    for row in rounds:
        steps.append(f"{row['n_layers']} x {row['d_model']} ({format_count(row['params'])}) "
                     f"plans at {row['mfu']:.1%}")
    if converged:
        return " -> ".join(steps) + f": fixed point after {len(rounds)} rounds"
    return (" -> ".join(steps) + f": no fixed point in {len(rounds)} rounds; kept "
            f"{model['n_layers']} x {model['d_model']}, the shape the law predicts the lowest "
            "loss for in the hours given")
