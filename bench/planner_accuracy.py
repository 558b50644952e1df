"""How well the planner predicts: its step time and memory for plans that run today, against
real training steps of the same plans on this machine's CPU processes (gloo).

This machine is profiled first (burrow.parallel.planner.profile: the model's layers timed,
collectives timed over 2 and 4 processes; the cached profile is reused). Then each plan below
trains the micro preset (vocabulary 512, on the test corpus) for --steps steps under torchrun,
and the cost model evaluates the same plan from the profile:

- step time: the median over the steps after --warmup of each step's seconds, from the run's
  metrics.jsonl (logged every step: tokens per step / tokens per second);
- peak memory per process: the resident set's high-water mark (VmHWM) less the resident set
  after torch and burrow are imported (VmRSS), the largest over the ranks. The planner counts
  model state and activations; the resident set also holds the data loader, gloo's buffers,
  the allocator's cached blocks and the end of the run (evaluation, checkpoint, sample), so a
  ratio below 1 is expected. It is used rather than saved-tensor bytes because it is what a
  memory budget must cover; the saved-tensor count of a block is checked exactly in
  tests/test_profile.py. The planner's 1 GiB CUDA context is left out of the prediction.

Prints one JSON object (also written to --out) and a table on stderr; a PNG of predicted
against measured, one point per plan, is written beside the JSON.

    .venv/bin/python bench/planner_accuracy.py                     # all 14 plans
    .venv/bin/python bench/planner_accuracy.py --steps 2 --plans 1 # checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "corpus"
# Held out of the test corpus: enough tokens for the evaluation at the end of a run.
VAL_FRACTION = 0.25

# (name, processes, `burrow train` flags, tp, dp_replicate, dp_shard); each also checkpointed.
PLANS = [("DDP", 2, ["--parallel", "ddp"], 1, 2, 1),
         ("FSDP", 2, ["--parallel", "fsdp"], 1, 1, 2),
         ("TP 2", 2, ["--tensor-parallel", "2"], 2, 1, 1),
         ("DDP", 4, ["--parallel", "ddp"], 1, 4, 1),
         ("FSDP", 4, ["--parallel", "fsdp"], 1, 1, 4),
         ("HSDP 2x2", 4, ["--parallel", "fsdp", "--data-parallel-replicate", "2"], 1, 2, 2),
         ("FSDP 2 x TP 2", 4, ["--parallel", "fsdp", "--tensor-parallel", "2"], 2, 1, 2)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def status_bytes(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(folder: str, argv: list[str]) -> None:
    """One torchrun process: `burrow train`, then its memory figures to folder/memory_R.json."""
    import torch  # noqa: F401  (imported before the baseline: libraries are not the run's)

    import burrow.model  # noqa: F401
    import burrow.train.trainer  # noqa: F401
    from burrow.cli import main

    baseline = status_bytes("VmRSS")
    status = main(argv)
    rank = os.environ.get("RANK", "0")
    Path(folder, f"memory_{rank}.json").write_text(json.dumps(
        {"baseline": baseline, "peak": status_bytes("VmHWM")}))
    raise SystemExit(status)


def model_config(vocab_size: int) -> Any:
    from burrow import presets

    return dataclasses.replace(presets.get("micro"), vocab_size=vocab_size)


def run_plan(flags: list[str], processes: int, dp: int, args: argparse.Namespace,
             folder: Path) -> tuple[float, float]:
    """Train one plan; (median seconds per step after the warm-up, peak bytes per process)."""
    sequences = args.global_batch
    train = ["train", "--preset", "micro", "--data", str(args.data), "--set",
             f"model.vocab_size={args.vocab_size}", "--set", f"data.val_fraction={VAL_FRACTION}",
             "--seq-len", str(args.seq_len), "--batch-tokens", str(sequences * args.seq_len),
             "--micro-batch-size", str(sequences // dp), "--max-steps", str(args.steps),
             "--warmup-steps", "1", "--eval-every", "0", "--eval-tokens", "1024",
             "--log-every", "1", "--device", "cpu", "--out", str(folder / "run"), *flags]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), __file__, "--worker", str(folder), "--",
               *train]
    done = subprocess.run(command, capture_output=True, text=True, env=burrow_env())
    if done.returncode:
        raise RuntimeError(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    memory = [json.loads(path.read_text()) for path in folder.glob("memory_*.json")]
    return (statistics.median(step_seconds(folder / "run", args.warmup)),
            max(m["peak"] - m["baseline"] for m in memory))


def burrow_env() -> dict[str, str]:
    """The environment of a child process: this checkout's burrow first on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def step_seconds(run: Path, warmup: int) -> list[float]:
    """Each training step's seconds after the first `warmup` (at least the last step is kept),
    from the run's metrics.jsonl logged every step: tokens per step / tokens per second."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("split") == "train"]
    last = max(row["step"] for row in train)
    return [row["tokens"] / row["step"] / row["tokens_per_second"] for row in train
            if row["step"] > min(warmup, last - 1)]


def prepare_data(data: Path, vocab_size: int) -> None:
    """Train the tokenizer and write the shards once, before any run, so that no run's time
    or memory peak is the tokenizer's training."""
    done = subprocess.run([sys.executable, "-m", "burrow", "data", "prepare", "--data",
                           str(data), "--vocab-size", str(vocab_size), "--val-fraction",
                           str(VAL_FRACTION)], capture_output=True, text=True, env=burrow_env())
    if done.returncode:
        raise RuntimeError(f"burrow data prepare failed:\n{done.stderr[-3000:]}")


def predict(cfg: Any, tp: int, replicate: int, shard: int, checkpoint: bool, processes: int,
            args: argparse.Namespace, inputs: Any) -> tuple[float, float]:
    """The cost model's step seconds and bytes per process for one plan: one stage, one
    micro-batch of the whole batch, the blocks (not the embedding and head) checkpointed as
    --checkpoint-layers all does; as search.py adds them up for pp 1."""
    from burrow.parallel.planner import Step, Strategy, layer_cost, model_layers

    step = Step(args.seq_len, args.global_batch, 1, 1, processes, "fp32")
    seconds = memory = sync = 0.0
    for layer in model_layers(cfg, args.seq_len, precision="fp32"):
        strategy = Strategy(tp, replicate, shard, checkpoint and layer.kind == "block")
        cost = layer_cost(layer, strategy, step, inputs)
        seconds += cost.forward_s + cost.backward_s
        sync += cost.sync_s
        memory += cost.memory_bytes
    return seconds + sync, memory


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, (key, unit, scale) in zip(axes, (("step_s", "step time (ms)", 1e3),
                                               ("memory_bytes", "peak memory (MB)", 1e-6))):
        measured = [r[f"measured_{key}"] * scale for r in results]
        predicted = [r[f"predicted_{key}"] * scale for r in results]
        for r, x, y in zip(results, measured, predicted):
            axis.scatter(x, y, color="tab:blue" if r["processes"] == 2 else "tab:orange")
            axis.annotate(r["plan"], (x, y), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
        low, high = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axis.set(xscale="log", yscale="log", xlabel=f"measured {unit}",
                 ylabel=f"predicted {unit}", title=f"{unit.split(' (')[0]}: blue 2, orange 4 "
                 "processes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per plan")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--plans", type=int, help="only the first N plans (a smoke test)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "planner_accuracy.json")
    args = parser.parse_args()
    from burrow.parallel.planner.profile import profile_machine

    cfg = model_config(args.vocab_size)
    profile, key = profile_machine(cfg, args.seq_len, 4, progress=log)
    prepare_data(args.data, args.vocab_size)
    plans = [(name, processes, flags + extra, tp, replicate, shard, checkpoint)
             for name, processes, flags, tp, replicate, shard in PLANS
             for checkpoint, extra in ((False, []), (True, ["--checkpoint-layers", "all"]))]
    results = []
    for name, processes, flags, tp, replicate, shard, checkpoint in plans[:args.plans]:
        label = name + (" + ckpt" if checkpoint else "")
        log(f"bench: {label} on {processes} processes")
        with tempfile.TemporaryDirectory(prefix="burrow-accuracy-") as folder:
            step_s, memory = run_plan(flags, processes, replicate * shard, args, Path(folder))
        inputs = profile.cost_inputs(key, processes)
        predicted_s, predicted_memory = predict(cfg, tp, replicate, shard, checkpoint,
                                                processes, args, inputs)
        results.append({"plan": label, "processes": processes, "tp": tp,
                        "dp_replicate": replicate, "dp_shard": shard, "checkpoint": checkpoint,
                        "measured_step_s": step_s, "predicted_step_s": predicted_s,
                        "step_ratio": predicted_s / step_s, "measured_memory_bytes": memory,
                        "predicted_memory_bytes": predicted_memory,
                        "memory_ratio": predicted_memory / memory})
    report = {"machine": profile.machine, "model": "micro", "vocab_size": args.vocab_size,
              "seq_len": args.seq_len, "global_batch_sequences": args.global_batch,
              "steps": args.steps, "warmup": args.warmup,
              "memory_measure": "VmHWM - VmRSS after imports, largest rank",
              "step_measure": "median of metrics.jsonl step seconds after the warm-up",
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log(f"{'plan':<22} {'procs':>5} {'step meas.':>11} {'pred.':>9} {'ratio':>6} "
        f"{'mem meas.':>10} {'pred.':>9} {'ratio':>6}")
    for r in results:
        log(f"{r['plan']:<22} {r['processes']:>5} {r['measured_step_s'] * 1e3:>8.1f} ms "
            f"{r['predicted_step_s'] * 1e3:>6.1f} ms {r['step_ratio']:>6.2f} "
            f"{r['measured_memory_bytes'] / 1e6:>7.1f} MB {r['predicted_memory_bytes'] / 1e6:>6.1f}"
            f" MB {r['memory_ratio']:>6.2f}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[4:])
    else:
        main()
