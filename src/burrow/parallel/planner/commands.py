"""`burrow plan-parallel`: Galvatron's plan for a preset on some GPUs, beside the best uniform
plan and pure FSDP and DDP, as a table or (--json) one JSON object. Arithmetic only: no torch,
unless this machine is to be measured (--profile, --hardware local, --profile-only: profile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow import presets
from burrow.errors import UserError
from burrow.flops import flops_per_token, mfu
from burrow.parallel.planner.executable import search_executable
from burrow.parallel.planner.hardware import EFFICIENCY, CostInputs, get_hardware
from burrow.parallel.planner.plan import Plan
from burrow.parallel.planner.search import Outcome, search
from burrow.parallel.planner.stages import Job
from burrow.paths import check_writable_dir
from burrow.units import format_bytes, format_count, parse_bytes

if TYPE_CHECKING:
    from burrow.config import ModelConfig

# Tokens per step when --global-batch is not given: 2^21, Gopher 7.1B's 2M-token batch (Rae et
# al. 2021, Table 1), rounded to whole sequences.
DEFAULT_BATCH_TOKENS = 2**21


def plan_parallel_command(args: argparse.Namespace) -> dict[str, Any]:
    """Search the plan, write it to --out, and return the report --json prints; with
    --profile-only, measure this machine and return its figures instead."""
    cfg = presets.get(args.preset)
    seq_len = args.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds {args.preset}'s context of "
                        f"{cfg.max_seq_len} tokens")
    memory = parse_bytes(args.memory, "--memory") if args.memory else None
    if args.profile_only:
        from burrow.parallel.planner.profile import profile_machine

        profile, key = profile_machine(cfg, seq_len, args.gpus, remeasure=True,
                                       path=args.profile or None, progress=_progress)
        return profile_report(profile, key, args)
    if args.profile is not None or args.hardware.lower() == "local":
        inputs, precision, peak = local_inputs(args, cfg, seq_len, memory)
        efficiency = None
    else:
        hardware = get_hardware(args.hardware)
        efficiency = EFFICIENCY if args.efficiency is None else args.efficiency
        inputs = CostInputs.from_hardware(hardware, memory_bytes=memory, efficiency=efficiency)
        precision, peak = args.precision or "bf16", hardware.peak_flops
    sequences = global_batch_sequences(args.global_batch, seq_len)
    if args.out:
        check_writable_dir(Path(args.out).parent, "folder of --out", "choose another --out")
    job = Job(cfg, args.gpus, sequences, seq_len, preset=args.preset, precision=precision)
    result = search(job, inputs)
    if getattr(args, "executable", False):  # the searched plan is the fastest burrow can run
        result = dataclasses.replace(result, best=search_executable(job, inputs))
    if args.out:
        result.best.save(args.out)
    step_flops = flops_per_token(cfg, seq_len) * sequences * seq_len

    def summary(plan: Plan) -> dict[str, Any]:
        tokens_per_second = sequences * seq_len / plan.predicted_step_s
        return {"predicted_step_s": plan.predicted_step_s,
                "peak_memory_bytes": plan.peak_memory_bytes,
                "tokens_per_second": tokens_per_second,
                "mfu": mfu(tokens_per_second, step_flops / (sequences * seq_len),
                           args.gpus * peak)}

    def outcome(found: Outcome) -> dict[str, Any]:
        if found.plan is None:
            return {"fits": False, "needs_bytes": found.needs_bytes}
        return {"fits": True, **summary(found.plan), "plan": found.plan.to_dict()}

    return {"plan": result.best.to_dict(), **summary(result.best),
            "uniform_best": outcome(result.uniform),
            "baselines": {name: outcome(found) for name, found in result.baselines.items()},
            "job": {"preset": args.preset, "gpus": args.gpus, "hardware": inputs.name,
                    "gpus_per_node": inputs.gpus_per_node, "memory_bytes": inputs.memory_bytes,
                    "seq_len": seq_len, "global_batch_sequences": sequences,
                    "precision": precision, "efficiency": efficiency,
                    "measured": inputs.measured is not None,
                    "executable": getattr(args, "executable", False)},
            "out": args.out}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def local_inputs(args: argparse.Namespace, cfg: ModelConfig, seq_len: int,
                 memory: float | None) -> tuple[CostInputs, str, float]:
    """CostInputs from this machine's profile (read from the cache or --profile PATH, measured
    where missing: torch is imported only then), the precision it was measured in, and the
    peak FLOP/s that MFU divides by (the trainer's: a datasheet's, or a CPU's timed matmul)."""
    from burrow.parallel.planner.measured import Profile, machine, model_key, profile_path

    path = Path(args.profile) if args.profile else profile_path(machine())
    profile = Profile.load(path) if path.exists() else None
    key = model_key(cfg, seq_len)
    degrees = profile and profile.models.get(key, {}).get("layers", {}).get("block", {})
    groups = {g for g in (2 ** i for i in range(1, args.gpus.bit_length())) if g <= args.gpus}
    if not degrees or (profile and not groups <= profile.group_sizes()):
        from burrow.parallel.planner.profile import profile_machine

        profile, key = profile_machine(cfg, seq_len, args.gpus, path=path, progress=_progress)
    if args.precision not in (None, profile.precision):
        raise UserError(f"the profile was measured in {profile.precision} (what this machine "
                        f"trains in); plan it with --precision {profile.precision}")
    return (profile.cost_inputs(key, args.gpus, memory), profile.precision,
            profile.models[key]["peak_flops"])


def profile_report(profile: Any, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """What --profile-only prints: the machine, the fitted lines of each layer and collective."""
    entry = profile.models[key]
    return {"profile_only": True, "machine": profile.machine, "precision": profile.precision,
            "memory_bytes": profile.memory_bytes, "preset": args.preset,
            "seq_len": entry["seq_len"], "flops_per_second": entry["flops_per_second"],
            "peak_flops": entry["peak_flops"],
            "layers": {kind: {tp: layer["fits"] for tp, layer in degrees.items()}
                       for kind, degrees in entry["layers"].items()},
            "collectives": {kind: {str(group): fits["fit"] for group, fits in groups.items()}
                            for kind, groups in profile.collectives.items()}}


def format_profile(result: dict[str, Any]) -> str:
    """The layers' and collectives' fitted lines, one row each."""
    spec = result["machine"]
    lines = [f"profile of {spec['count']} x {spec['name']} ({spec['device']}), torch "
             f"{spec['torch']}, {result['precision']}, {result['preset']} at "
             f"{result['seq_len']} tokens a sequence", "",
             f"{'layer':<10} {'tp':>3} {'forward':>21} {'backward':>12} {'+checkpoint':>12} "
             f"{'kept/token':>11}"]
    for kind, degrees in result["layers"].items():
        for tp, fits in degrees.items():
            lines.append(f"{kind:<10} {tp:>3} {fits['forward']['intercept'] * 1e6:>7.0f} us + "
                         f"{fits['forward']['slope'] * 1e9:>5.1f} ns/t "
                         f"{fits['backward']['slope'] * 1e9:>7.1f} ns/t "
                         f"{fits['backward_checkpointed']['slope'] * 1e9:>7.1f} ns/t "
                         f"{fits['activation']['slope']:>7.0f} B")
    lines += ["", f"{'collective':<15} {'group':>5} {'latency':>10} {'bandwidth':>12}"]
    for kind, groups in result["collectives"].items():
        for group, fit in groups.items():
            lines.append(f"{kind:<15} {group:>5} {fit['latency'] * 1e6:>7.1f} us "
                         f"{fit['bandwidth'] / 1e9:>8.3g} GB/s")
    rate = result["flops_per_second"]
    lines.append(f"\na block sustains {rate / 1e9:.3g} GFLOP/s of a peak of "
                 f"{result['peak_flops'] / 1e9:.3g}" if rate else "")
    return "\n".join(lines)


def global_batch_sequences(tokens: int | None, seq_len: int) -> int:
    """Sequences per step from --global-batch TOKENS (a whole number of sequences), or about
    DEFAULT_BATCH_TOKENS."""
    if tokens is None:
        return max(1, round(DEFAULT_BATCH_TOKENS / seq_len))
    if tokens % seq_len:
        below = tokens // seq_len
        options = " or ".join(f"{n * seq_len} ({n} sequences)" for n in (below, below + 1) if n)
        raise UserError(f"--global-batch {tokens} tokens is not a whole number of {seq_len}-token "
                        f"sequences; use {options}")
    return tokens // seq_len


def format_plan_parallel(result: dict[str, Any]) -> str:
    """The searched plan's stages and strategies, then the four plans side by side (or the
    profile's figures after --profile-only)."""
    if result.get("profile_only"):
        return format_profile(result)
    job, plan = result["job"], Plan.from_dict(result["plan"])
    lines = [f"{job['preset']} on {job['gpus']} x {job['hardware']} ({job['gpus_per_node']} per "
             f"node, {format_bytes(job['memory_bytes'])} each), "
             f"{job['global_batch_sequences']:,} sequences of {job['seq_len']:,} tokens a step",
             "", f"searched plan{' (executable)' if job.get('executable') else ''}: "
             f"{describe_shape(plan)}; mesh {describe_mesh(plan)}",
             *stage_lines(plan)]
    header = f"{'':<24} {'step':>9} {'tokens/s':>9} {'MFU':>6} {'memory/GPU':>11}"
    lines += ["", header, "-" * len(header),
              _row("searched (per layer)", {"fits": True, **result}),
              _row("best uniform", result["uniform_best"])]
    baselines = result["baselines"]
    lines += [_row(f"FSDP (dp_shard {job['gpus']})", baselines["fsdp"]),
              _row(f"DDP (dp_replicate {job['gpus']})", baselines["ddp"])]
    uniform = result["uniform_best"]
    if uniform["fits"]:
        best_uniform = Plan.from_dict(uniform["plan"])
        lines.append(f"\nbest uniform plan: {describe_shape(best_uniform)}, every layer "
                     f"{best_uniform.layers[0].strategy.label()}")
    if result.get("out"):
        lines.append(f"plan written to {result['out']}")
    return "\n".join(lines)


def describe_shape(plan: Plan) -> str:
    """'pp 2, 64 micro-batches of 16 sequences'."""
    return (f"pp {plan.pp}, {plan.micro_batches} micro-batches of {plan.micro_batch_size} "
            "sequences")


def describe_mesh(plan: Plan) -> str:
    """'pp 2 x dp_replicate 16 x tp 2': the mesh's dimensions above one."""
    return " x ".join(f"{dim} {size}" for dim, size in plan.mesh.items() if size > 1) or "1 GPU"


def stage_lines(plan: Plan, indent: str = "  ") -> list[str]:
    """Each pipeline stage's layer count, then its runs of layers that share a strategy."""
    lines, first = [], 0
    for index, count in enumerate(plan.stages):
        lines.append(f"{indent}stage {index}: {count} layers")
        for names, label in _runs(plan, first, first + count):
            lines.append(f"{indent}  {names:<24} {label}")
        first += count
    return lines


def _runs(plan: Plan, start: int, stop: int) -> list[tuple[str, str]]:
    """(layers, strategy) for each run of equal strategies in layers[start:stop]."""
    runs: list[tuple[list[str], str]] = []
    for layer in plan.layers[start:stop]:
        label = layer.strategy.label()
        if runs and runs[-1][1] == label:
            runs[-1][0].append(layer.name)
        else:
            runs.append(([layer.name], label))
    return [(_names(names), label) for names, label in runs]


def _names(names: list[str]) -> str:
    """['embedding', 'block 0', ..., 'block 5'] -> 'embedding, blocks 0-5'."""
    blocks = [int(name.split()[1]) for name in names if name.startswith("block ")]
    parts = [name for name in names if name == "embedding"]
    if blocks:
        parts.append(f"block {blocks[0]}" if len(blocks) == 1
                     else f"blocks {blocks[0]}-{blocks[-1]}")
    return ", ".join(parts + [name for name in names if name == "head"])


def _row(name: str, found: dict[str, Any]) -> str:
    if not found["fits"]:
        needs = found.get("needs_bytes")
        why = (f"does not fit: needs {format_bytes(needs)}" if needs is not None
               else "impossible for this batch")
        return f"{name:<24} {why}"
    return (f"{name:<24} {format_seconds(found['predicted_step_s']):>9} "
            f"{format_count(found['tokens_per_second']):>9}"
            f" {found['mfu']:>6.1%} {format_bytes(found['peak_memory_bytes']):>11}")


def format_seconds(value: float) -> str:
    """2.98 -> '2.98 s', 0.0123 -> '12.3 ms', 0.000194 -> '194 us'."""
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value / 1e-6:.3g} us"
