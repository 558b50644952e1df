"""Galvatron's claim, executed: the plan the search gives each layer, run by `burrow train
--plan` on 4 CPU processes, is at least as fast as the best uniform plan run the same way.

Galvatron (Miao et al., VLDB 2023, §5) reports its per-layer plans against the best plan of
one strategy for every layer. This script checks that on this machine, by execution:

1. profile this machine (bench/planner_accuracy.py's profile: the micro preset's layers
   timed, collectives over 2 and 4 gloo processes; cached), and plan 4 processes with the
   executable search (`plan-parallel --executable`: one tensor-parallel degree, each layer's
   data-parallel layout and each block's checkpointing its own);
2. the best uniform plan among the same plans burrow can run (search.py's `uniform` over the
   executable search's configurations);
3. a memory budget per process: on 4 processes of a machine of many GB the micro model fits
   replicated everywhere, every layer wants the same layout and the search returns a uniform
   plan. With --memory auto the budget is scanned from the uncapped plan's need downwards
   (the planner's --memory, which the cost model enforces and a CPU does not) and the one
   where the search predicts its largest gain over the uniform plan, with layers laid out
   differently, is kept: Galvatron's case, where memory binds;
4. both plans written as plan files and trained for --steps steps each with `torchrun
   --nproc_per_node 4 -m burrow train --plan ...` on the test corpus, alternating (searched,
   uniform, then uniform, searched, ...) for --rounds rounds so that a change in the
   machine's load falls on both; a round's time is the median step after --warmup steps
   (metrics.jsonl).

Prints one JSON object (also written to --out): each plan's layers, its predicted and
measured step, the searched/uniform ratio measured (median over rounds) and predicted, and a
verdict.

    .venv/bin/python bench/plan_executed.py --out bench/results/plan_executed.json
    .venv/bin/python bench/plan_executed.py --quick --out /tmp/plan_executed.json  # runs?
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from planner_accuracy import (
    CORPUS,
    ROOT,
    VAL_FRACTION,
    burrow_env,
    log,
    model_config,
    prepare_data,
    step_seconds,
)

from burrow.errors import UserError
from burrow.parallel.planner.commands import _runs as layers_alike
from burrow.parallel.planner.commands import describe_mesh, describe_shape
from burrow.parallel.planner.executable import _restricted, search_executable
from burrow.parallel.planner.executable import _runs as burrow_runs
from burrow.parallel.planner.plan import Plan
from burrow.parallel.planner.search import NoPlanFits, uniform
from burrow.parallel.planner.stages import (
    CONTEXT_BYTES,
    RESERVED_FRACTION,
    Job,
    configurations,
)
from burrow.units import format_bytes, parse_bytes

PROCESSES = 4
# --memory auto: each budget tried is this fraction of the one before, from the uncapped
# plan's need down to where nothing fits.
SHRINK = 0.85
CLAIM = ("the searched plan for 4 CPU processes, executed, is at least as fast as the best "
         "uniform plan executed the same way")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each plan, alternating")
    parser.add_argument("--quick", action="store_true",
                        help="2 steps, 1 round: checks the script runs")
    parser.add_argument("--memory", default="auto",
                        help="bytes per process the plans may use (1.3GB), 'none' for the "
                             "machine's, or 'auto' (default): the budget where the search "
                             "predicts its largest gain with a plan that is not uniform")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="the micro preset's own (default %(default)s)")
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "plan_executed.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 1
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    return args


def uniform_executable(job: Job, inputs: Any) -> Plan | None:
    """The fastest plan that gives every layer one strategy among those burrow runs: search.py's
    `uniform` over the executable search's configurations, each (pipeline, micro-batches)
    restricted to each tensor-parallel degree burrow splits the model with. None if none fits."""
    configs = [dataclasses.replace(config, stages=[_restricted(problem, tp)
                                                   for problem in config.stages])
               for config in configurations(job, inputs)
               for tp in sorted({strategy.tp for strategy in config.stages[0].strategies})
               if burrow_runs(job, config, tp)]
    return uniform(job, inputs, configs).plan


def mixes(plan: Plan) -> bool:
    """Whether the plan's layers run differently: their layouts differ, or some blocks are
    checkpointed and others not (the embedding's and head's checkpoint flags change nothing in
    burrow's trainer: executable.py)."""
    layouts = {(layer.tp, layer.dp_replicate, layer.dp_shard) for layer in plan.layers}
    checkpoints = {layer.checkpoint for layer in plan.layers if layer.name.startswith("block ")}
    return len(layouts) > 1 or len(checkpoints) > 1


def layer_lines(plan: Plan) -> list[str]:
    """'stage 0: 2 layers', 'embedding, block 0: dp_replicate 2', ...: plan-parallel's table
    of each stage's runs of layers that share a strategy (commands.py)."""
    lines, first = [], 0
    for index, count in enumerate(plan.stages):
        lines.append(f"stage {index}: {count} layers")
        lines += [f"{names}: {label}" for names, label in layers_alike(plan, first, first + count)]
        first += count
    return lines


def plans_at(job: Job, inputs: Any) -> tuple[Plan, Plan | None]:
    """The executable search's plan and the best uniform executable plan for `inputs`."""
    return search_executable(job, inputs), uniform_executable(job, inputs)


def scan_memory(job: Job, inputs_for: Any) -> list[dict[str, Any]]:
    """(memory, searched plan, uniform plan) at no cap, then at budgets for the layers from the
    uncapped plan's need down by SHRINK until no plan fits; memory is what --memory would be
    (the layers' budget plus the planner's context bytes and headroom: stages.py)."""
    searched, uniform_plan = plans_at(job, inputs_for(None))
    rows = [{"memory": None, "searched": searched, "uniform": uniform_plan}]
    budget = searched.peak_memory_bytes - CONTEXT_BYTES
    while True:
        memory = (CONTEXT_BYTES + budget) / (1 - RESERVED_FRACTION)
        try:
            searched, uniform_plan = plans_at(job, inputs_for(memory))
        except NoPlanFits:
            return rows
        rows.append({"memory": memory, "searched": searched, "uniform": uniform_plan})
        budget *= SHRINK


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The scanned budget where the search predicts its largest gain over the uniform plan
    with layers that run differently; the uncapped one when no budget gives such a plan."""
    mixed = [row for row in rows if row["uniform"] is not None and mixes(row["searched"])]
    if not mixed:
        return rows[0]
    return max(mixed, key=lambda row: (row["uniform"].predicted_step_s
                                       / row["searched"].predicted_step_s))


def scan_report(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per budget scanned: the two plans' predictions and shapes."""
    def line(plan: Plan | None) -> str | None:
        if plan is None:
            return None
        runs = [text for text in layer_lines(plan) if not text.startswith("stage ")]
        return f"{describe_shape(plan)} | " + " | ".join(runs)

    return [{"memory_bytes": row["memory"],
             "searched_predicted_step_s": row["searched"].predicted_step_s,
             "uniform_predicted_step_s": row["uniform"] and row["uniform"].predicted_step_s,
             "searched_mixes": mixes(row["searched"]), "searched": line(row["searched"]),
             "uniform": line(row["uniform"])} for row in rows]


def train_command(plan_path: Path, args: argparse.Namespace, run: Path) -> list[str]:
    """`torchrun --nproc_per_node 4 -m burrow train --plan ...` for --steps logged steps; the
    plan sets the sequence length, batch, degrees, layouts and checkpointing."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(PROCESSES), "-m", "burrow", "train", "--plan", str(plan_path), "--preset",
            "micro", "--data", str(args.data), "--set", f"model.vocab_size={args.vocab_size}",
            "--set", f"data.val_fraction={VAL_FRACTION}", "--max-steps", str(args.steps),
            "--warmup-steps", "1", "--eval-every", "0", "--eval-tokens", "1024",
            "--log-every", "1", "--device", "cpu", "--out", str(run)]


def train_plan(plan_path: Path, args: argparse.Namespace, run: Path) -> float:
    """Train the plan once; the median step's seconds after the warm-up."""
    done = subprocess.run(train_command(plan_path, args, run), capture_output=True, text=True,
                          env=burrow_env())
    if done.returncode:
        raise RuntimeError(f"train --plan {plan_path.name} failed:\n{done.stderr[-3000:]}")
    return statistics.median(step_seconds(run, args.warmup))


def alternate(paths: dict[str, Path], args: argparse.Namespace,
              folder: Path) -> dict[str, list[float]]:
    """Each plan's median step per round, in the order searched, uniform, then uniform,
    searched, ...: a drift in the machine's load falls on both."""
    measured: dict[str, list[float]] = {name: [] for name in paths}
    for index in range(args.rounds):
        order = list(paths) if index % 2 == 0 else list(paths)[::-1]
        for name in order:
            measured[name].append(train_plan(paths[name], args, folder / f"{name}-{index}"))
            log(f"bench: round {index + 1}/{args.rounds} {name}: "
                f"{measured[name][-1] * 1e3:.1f} ms a step")
    return measured


def describe(plan: Plan, measured: list[float]) -> dict[str, Any]:
    return {"shape": describe_shape(plan), "mesh": describe_mesh(plan),
            "layers": layer_lines(plan), "mixes_layers": mixes(plan),
            "predicted_step_s": plan.predicted_step_s,
            "predicted_peak_memory_bytes": plan.peak_memory_bytes,
            "measured_step_s": measured, "measured_median_step_s": statistics.median(measured),
            "plan": plan.to_dict()}


def verdict(ratios: list[float], predicted: float, same_plan: bool) -> str:
    """One line: whether the searched plan's step was at most the uniform plan's."""
    median = statistics.median(ratios)
    numbers = (f"searched/uniform step {median:.2f} measured (rounds {min(ratios):.2f}-"
               f"{max(ratios):.2f}), {predicted:.2f} predicted")
    if same_plan:
        return f"no test: the search chose the uniform plan itself; {numbers}"
    if max(ratios) <= 1:
        return f"holds: the searched plan was faster in every round; {numbers}"
    if min(ratios) > 1:
        return f"fails: the searched plan was slower in every round; {numbers}"
    return f"unclear: the rounds disagree; {numbers}"


def memory_choice(args: argparse.Namespace, job: Job, inputs_for: Any
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The budget planned for (a scan's row) and the scan (empty unless --memory auto)."""
    if args.memory == "auto":
        rows = scan_memory(job, inputs_for)
        return choose(rows), rows
    memory = None if args.memory == "none" else parse_bytes(args.memory, "--memory")
    searched, uniform_plan = plans_at(job, inputs_for(memory))
    return {"memory": memory, "searched": searched, "uniform": uniform_plan}, []


def main() -> None:
    args = parse_args()
    from burrow.parallel.planner.profile import profile_machine

    started = time.perf_counter()
    cfg = model_config(args.vocab_size)
    profile, key = profile_machine(cfg, args.seq_len, PROCESSES, progress=log)
    job = Job(cfg, PROCESSES, args.global_batch, args.seq_len, preset="micro",
              precision=profile.precision)
    chosen, rows = memory_choice(args, job,
                                 lambda memory: profile.cost_inputs(key, PROCESSES, memory))
    searched, uniform_plan = chosen["searched"], chosen["uniform"]
    if uniform_plan is None:
        raise UserError("no uniform plan fits this memory budget; give a larger --memory")
    memory = chosen["memory"]
    log(f"bench: memory {format_bytes(memory) if memory else 'uncapped'}; searched "
        f"{describe_shape(searched)}: {'; '.join(layer_lines(searched))}; uniform "
        f"{describe_shape(uniform_plan)}: {uniform_plan.layers[0].strategy.label()}")
    prepare_data(args.data, args.vocab_size)
    with tempfile.TemporaryDirectory(prefix="burrow-plan-executed-") as name:
        folder = Path(name)
        paths = {"searched": folder / "searched.json", "uniform": folder / "uniform.json"}
        searched.save(paths["searched"])
        uniform_plan.save(paths["uniform"])
        measured = alternate(paths, args, folder)
        command = train_command(Path("PLAN.json"), args, Path("RUN"))
    ratios = [s / u for s, u in zip(measured["searched"], measured["uniform"])]
    predicted = searched.predicted_step_s / uniform_plan.predicted_step_s
    report = {
        "claim": CLAIM, "machine": profile.machine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0], "model": "micro",
        "vocab_size": args.vocab_size, "seq_len": args.seq_len,
        "global_batch_sequences": args.global_batch, "processes": PROCESSES,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "command": "torchrun " + " ".join(command[command.index("--standalone"):])
                   .replace(f"{ROOT}/", ""),
        "memory": {"mode": args.memory, "memory_bytes": memory,
                   "layer_budget_bytes": memory and memory * (1 - RESERVED_FRACTION)
                   - CONTEXT_BYTES, "scan": scan_report(rows)},
        "searched": describe(searched, measured["searched"]),
        "uniform": describe(uniform_plan, measured["uniform"]),
        "ratio_searched_to_uniform": {"measured_rounds": ratios,
                                      "measured": statistics.median(ratios),
                                      "predicted": predicted},
        "verdict": verdict(ratios, predicted, searched == uniform_plan),
        "wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"bench: {report['verdict']}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a plan that cannot be made: one line, as burrow's CLI does
        log(f"error: {error}")
        raise SystemExit(2) from None
