"""Switch Transformer on a CPU: quality per step, cost per step and distillation, against dense.

The rival is the dense model a Switch model is made from: same width, depth, data, steps,
schedule and seed, and the same FLOPs per token (Switch routes each token to one expert of the
dense MLP's width, so only the router is added). Three measurements (Fedus et al. 2021):

  quality   both trained with `burrow train` on the default corpus, evaluated on the same
            held-out tokens every few steps. Step speed-up = the steps the dense model needs to
            reach its final validation loss / the steps the Switch model needs to reach the
            same loss (Switch §3, Figure 5 left: 7x for 64 experts at T5-Base scale).
            --switch-steps N...: Switch runs of N steps, each with its whole schedule, so
            that the steps Switch needs are not read mid-schedule from a longer run.
  cost      seconds per training step (forward, backward, AdamW) of the Switch model over the
            dense one, alternating rounds in one process on the same batch.
  decode    tokens/s of batch-1 greedy generation, Switch over dense, and the Switch model
            again with the capacity buffers forced, which read every expert's weights for
            each token instead of the chosen expert's only.
  distill   the Switch model distilled into the dense shape with `burrow distill` (0.75 labels
            + 0.25 teacher probabilities, initialised from the non-expert weights, Switch §4):
            the fraction of the teacher's gain over the dense baseline that the student keeps
            (Table 6: ~30%), beside Table 6's initialisation baseline: the same student
            trained on the labels alone.

    .venv/bin/python bench/moe.py                      # all three: ~100 minutes on 2 cores
    .venv/bin/python bench/moe.py --part cost          # the step-time ratio only
    .venv/bin/python bench/moe.py --part decode --dense small   # generation speed
    .venv/bin/python bench/moe.py --quick              # seconds: checks the script runs

Runs go to --out (default bench/results/moe_runs/); the JSON goes to stdout, the figure to
docs/moe_quality.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import emit, log, machine, paired_rounds, run_main, set_threads, summary, warn_if_busy

from burrow import UserError, presets
from burrow.config import RunConfig, TrainConfig
from burrow.files import save_figure
from burrow.model import Transformer
from burrow.model.moe import SwitchMLP
from burrow.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "quality", "cost", "decode", "distill"),
                        default="all")
    # micro, long: the experts' extra parameters pay off only once the dense model is limited
    # by its size rather than by the number of steps it has taken (BENCHMARKS.md)
    parser.add_argument("--dense", default="micro", help="dense preset (default micro)")
    parser.add_argument("--experts", type=int, default=8, help="experts per sparse layer")
    parser.add_argument("--steps", type=int, default=6000, help="training steps of each run")
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="tokens per optimizer step of each run")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both runs' data order and initialisation")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "rsqrt", "constant"),
                        help="learning-rate schedule of both runs after the warmup")
    parser.add_argument("--switch-steps", type=int, nargs="*", default=[],
                        help="quality: also train Switch runs of these lengths, each with its "
                             "own schedule, and report the shortest that reaches the dense "
                             "run's final loss")
    parser.add_argument("--rounds", type=int, default=5, help="timed pairs of rounds (cost)")
    parser.add_argument("--save-every", type=int, default=1000,
                        help="checkpoint interval of the training runs: a run stopped by a "
                             "kill resumes from its last checkpoint when the command is rerun")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_runs"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "moe_quality.png"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--concurrent", action="store_true",
                        help="quality: train both runs at once, one thread each (on 2 cores "
                             "nano finishes ~1.2x sooner than one run after the other at 2 "
                             "threads, micro ~1.04x)")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the script runs")
    if parser.parse_args().quick:
        parser.set_defaults(steps=12, eval_every=4, rounds=1, dense="micro", switch_steps=[8],
                            out=str(ROOT / "bench" / "results" / "quick" / "moe_runs"),
                            figure=str(ROOT / "bench" / "results" / "quick" / "moe_quality.png"))
    args = parser.parse_args()
    if (args.steps < 2 or args.eval_every < 1 or args.rounds < 1 or args.experts < 2
            or args.save_every < 0 or args.batch_tokens < 1):
        raise UserError("--steps >= 2, --eval-every >= 1, --rounds >= 1, --experts >= 2, "
                        "--save-every >= 0 and --batch-tokens >= 1")
    if any(not 2 <= steps < args.steps for steps in args.switch_steps):
        raise UserError(f"--switch-steps: each length must be in [2, --steps={args.steps})")
    return args


def run_configs(args: argparse.Namespace) -> tuple[RunConfig, RunConfig]:
    """The dense run and its Switch twin: 8 experts in every other block, Switch's defaults."""
    train = TrainConfig(max_steps=args.steps, eval_every=args.eval_every,
                        save_every=args.save_every, batch_tokens=args.batch_tokens,
                        log_every=max(1, args.steps // 20), device="cpu",
                        warmup_steps=min(100, args.steps // 10), schedule=args.schedule,
                        seed=args.seed)
    if args.quick:
        train = dataclasses.replace(train, batch_tokens=2048, micro_batch_size=8,
                                    eval_tokens=4096)
    dense_model = presets.get(args.dense)
    switch_model = dataclasses.replace(dense_model, moe=dataclasses.replace(
        dense_model.moe, num_experts=args.experts))
    return (RunConfig(model=dense_model, train=train, preset=args.dense),
            RunConfig(model=switch_model, train=dataclasses.replace(train),
                      preset=f"switch-{args.dense}"))


def train_quietly(cfg: RunConfig, run_dir: Path, threads: int | None = None
                  ) -> list[tuple[int, float]]:
    """Train (or resume a finished run) and return its (step, validation loss) curve."""
    from burrow.train import train

    set_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        train(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [(row["step"], row["loss"]) for row in rows if row.get("split") == "val"]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve, linear between evaluations, gets down to `target`."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return float(step)
            (step0, loss0) = previous
            return step0 + (loss0 - target) / (loss0 - loss) * (step - step0)
        previous = (step, loss)
    return None


def speedup_along(dense: list[tuple[int, float]], switch: list[tuple[int, float]]
                  ) -> list[tuple[int, float]]:
    """(s, s / the step at which Switch first reaches the dense loss at step s) for every dense
    evaluation Switch reaches: how the speed-up grows with the length of the run."""
    pairs = [(step, steps_to_reach(switch, loss)) for step, loss in dense]
    return [(step, round(step / reached, 3)) for step, reached in pairs if reached]


def train_all(runs: dict[str, RunConfig], out: Path, concurrent: bool
              ) -> dict[str, list[tuple[int, float]]]:
    """Train the runs (name -> config) into out/name; their validation curves by name."""
    if not concurrent:
        return {name: train_quietly(cfg, out / name) for name, cfg in runs.items()}
    # Small models use two threads poorly: two one-thread runs side by side finish sooner
    # than the same runs one after the other with two threads each.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(train_quietly, cfg, out / name, 1)
                for name, cfg in runs.items()}
        return {name: job.result() for name, job in jobs.items()}


def shorter_runs(args: argparse.Namespace, switch_cfg: RunConfig, target: float
                 ) -> dict[str, Any]:
    """Switch runs of fewer steps, each with its whole schedule (a cosine run is annealed at
    its own end): the shortest run whose final loss reaches `target` is the number of steps
    Switch needs, with no credit for a learning rate the longer run had not yet decayed."""
    runs = {f"switch_{steps}": dataclasses.replace(switch_cfg, train=dataclasses.replace(
        switch_cfg.train, max_steps=steps, log_every=max(1, steps // 20)))
        for steps in args.switch_steps}
    curves = train_all(runs, Path(args.out), args.concurrent)
    finals = sorted((steps, curves[f"switch_{steps}"][-1][1]) for steps in args.switch_steps)
    reaching = [steps for steps, loss in finals if loss <= target]
    return {"final_val_loss_by_steps": finals,
            "shortest_reaching_dense_final": min(reaching) if reaching else None,
            "step_speedup_at_least": args.steps / min(reaching) if reaching else None}


def quality(args: argparse.Namespace, dense_cfg: RunConfig, switch_cfg: RunConfig
            ) -> dict[str, Any]:
    log(f"== dense {dense_cfg.preset}: {dense_cfg.model.num_params():,} parameters; "
        f"{switch_cfg.preset}: {switch_cfg.model.num_params():,} parameters, "
        f"{switch_cfg.model.num_params(active=True):,} active")
    curves = train_all({"dense": dense_cfg, "switch": switch_cfg}, Path(args.out),
                       args.concurrent)
    dense_curve, switch_curve = curves["dense"], curves["switch"]
    target = dense_curve[-1][1]
    reached = steps_to_reach(switch_curve, target)
    speedup = dense_curve[-1][0] / reached if reached else None
    draw(args.figure, dense_curve, switch_curve, dense_cfg, switch_cfg, reached)
    result = {"dense_final_val_loss": target, "switch_final_val_loss": switch_curve[-1][1],
              "switch_steps_to_dense_final": reached, "step_speedup": speedup,
              "step_speedup_along_dense_curve": speedup_along(dense_curve, switch_curve),
              "dense_curve": dense_curve, "switch_curve": switch_curve,
              "params": {"dense": dense_cfg.model.num_params(),
                         "switch_total": switch_cfg.model.num_params(),
                         "switch_active": switch_cfg.model.num_params(active=True)}}
    if args.switch_steps:
        result["shorter_switch_runs"] = shorter_runs(args, switch_cfg, target)
    return result


def draw(path: str, dense: list, switch: list, dense_cfg: RunConfig, switch_cfg: RunConfig,
         reached: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    axis.plot(*zip(*dense), "o-", markersize=3, label=f"dense {dense_cfg.preset} "
              f"({dense_cfg.model.num_params() / 1e6:.1f}M)")
    axis.plot(*zip(*switch), "o-", markersize=3, label=f"Switch, {switch_cfg.model.moe.num_experts}"
              f" experts ({switch_cfg.model.num_params() / 1e6:.1f}M, "
              f"{switch_cfg.model.num_params(active=True) / 1e6:.1f}M active)")
    axis.axhline(dense[-1][1], color="gray", linestyle=":", linewidth=1)
    if reached:
        axis.axvline(reached, color="gray", linestyle=":", linewidth=1)
        axis.set_title(f"step speed-up {dense[-1][0] / reached:.2f}x at equal FLOPs per token")
    tail = [loss for _, loss in dense[len(dense) // 5:] + switch[len(switch) // 5:]]
    axis.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    axis.set_xlabel("step")
    axis.set_ylabel("validation loss (nats per token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, Path(path))


def cost(args: argparse.Namespace, dense_cfg: RunConfig, switch_cfg: RunConfig
         ) -> dict[str, Any]:
    """Seconds per training step, Switch / dense, in alternating rounds on the same batch."""
    train = dense_cfg.train
    batch = torch.randint(0, dense_cfg.model.vocab_size,
                          (train.micro_batch_size, train.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = max(1, 8 // args.rounds) if args.quick else 8

    def stepper(cfg: RunConfig):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg.train)

        def round_() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                model(inputs, targets).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return steps / (time.perf_counter() - start)  # steps per second

        return round_

    paired = paired_rounds(stepper(dense_cfg), stepper(switch_cfg), args.rounds)
    # paired.ours is the dense rate: dense steps/s over Switch steps/s = Switch time / dense
    ratios = paired.ratios()
    return {"switch_over_dense_step_time": summary(ratios),
            "tokens_per_step": train.micro_batch_size * train.seq_len,
            "dense_steps_per_second": summary(paired.ours),
            "switch_steps_per_second": summary(paired.theirs)}


def decode(args: argparse.Namespace, dense_cfg: RunConfig, switch_cfg: RunConfig
           ) -> dict[str, Any]:
    """Tokens/s of `generate` (batch 1, greedy), Switch over dense, alternating rounds; then
    Switch with only its chosen experts' weights read over Switch with the capacity buffers,
    eager and with the decode step compiled."""
    new_tokens = 20 if args.quick else 200
    prompt = torch.randint(0, dense_cfg.model.vocab_size, (1, 16),
                           generator=torch.Generator().manual_seed(0))

    def generator(cfg: RunConfig, chosen_only: bool = True, compiled: bool = False):
        torch.manual_seed(0)
        model = Transformer(cfg.model).eval()
        if not chosen_only:  # on this model's layers only, where a compiled step sees it
            for layer in model.modules():
                if isinstance(layer, SwitchMLP):
                    layer.reads_chosen_experts_only = lambda assignments: False

        def round_() -> float:
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0.0, compile=compiled)
            return new_tokens / (time.perf_counter() - start)

        return round_  # paired_rounds' warm-up round pays the compilation

    result: dict[str, Any] = {"new_tokens": new_tokens}
    against_dense = paired_rounds(generator(switch_cfg), generator(dense_cfg), args.rounds)
    result.update(dense_tokens_per_second=summary(against_dense.theirs),
                  switch_tokens_per_second=summary(against_dense.ours),
                  switch_over_dense=summary(against_dense.ratios()))
    for mode, compiled in (("eager", False), ("compiled", True)):
        paired = paired_rounds(generator(switch_cfg, compiled=compiled),
                               generator(switch_cfg, False, compiled), args.rounds)
        result[mode] = {"chosen_experts_tokens_per_second": summary(paired.ours),
                        "capacity_buffers_tokens_per_second": summary(paired.theirs),
                        "chosen_experts_over_capacity_buffers": summary(paired.ratios())}
    return result


def distill(args: argparse.Namespace, dense_cfg: RunConfig) -> dict[str, Any]:
    """`burrow distill` of the Switch run into the dense shape, against the dense baseline, and
    Switch Table 6's initialisation baseline: the same student trained on the labels alone.

    The student's shared weights have trained inside the teacher before distillation starts,
    so it may beat a baseline trained from scratch without any help from the teacher's
    probabilities; the initialisation baseline measures that part, and the difference between
    the two is what the teacher's probabilities add.
    """
    out = Path(args.out)
    reports = {}
    for name, weights in (("student", []),
                          ("init_only", ["--label-weight", "1", "--teacher-weight", "0"])):
        reports[name] = distill_run(args, dense_cfg, out / name, weights)
    kept = {name: report["gain_kept_percent"] for name, report in reports.items()}
    teacher_share = (None if None in kept.values() else kept["student"] - kept["init_only"])
    return {**reports["student"], "init_only": reports["init_only"],
            "teacher_probabilities_share_percent": teacher_share}


def distill_run(args: argparse.Namespace, dense_cfg: RunConfig, student: Path,
                weights: list[str]) -> dict[str, Any]:
    import subprocess

    out = Path(args.out)
    train = dense_cfg.train
    command = [sys.executable, "-m", "burrow", "distill", "--teacher", str(out / "switch"),
               "--student", args.dense, "--baseline", str(out / "dense"), "--out", str(student),
               "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
               "--save-every", str(train.save_every), "--device", "cpu", "--warmup-steps",
               str(train.warmup_steps), "--batch-tokens", str(train.batch_tokens),
               "--micro-batch-size", str(train.micro_batch_size), "--eval-tokens",
               str(train.eval_tokens), "--log-every", str(train.log_every), *weights]
    if (student / "checkpoints").is_dir():
        command.append("--resume")
    subprocess.run(command, check=True, stdout=sys.stderr, env=os.environ.copy())
    return json.loads((student / "distill.json").read_text())


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    warn_if_busy()
    dense_cfg, switch_cfg = run_configs(args)
    result: dict[str, Any] = {"benchmark": "moe", "machine": machine(torch.device("cpu")),
                              "dense": args.dense, "experts": args.experts,
                              "steps": args.steps, "schedule": args.schedule, "seed": args.seed,
                              "concurrent": args.concurrent}
    if args.part in ("all", "cost"):
        log("== cost: seconds per training step")
        result["cost"] = cost(args, dense_cfg, switch_cfg)
    if args.part in ("all", "decode"):
        log("== decode: tokens/s of batch-1 generation")
        result["decode"] = decode(args, dense_cfg, switch_cfg)
    if args.part in ("all", "quality"):
        result["quality"] = quality(args, dense_cfg, switch_cfg)
    if args.part in ("all", "distill"):
        result["distill"] = distill(args, dense_cfg)
    emit(result)


if __name__ == "__main__":
    run_main(main)
