r"""Switch Transformer on a CPU: quality per step, cost per step and distillation, against dense.

The distillation measurement, three seeds of five 3,000-step runs of micro, two runs at a time,
takes ~2.7 hours on 2 idle cores: ~53 minutes a seed at the step times of --quick (one thread a
run: ~24,000 tokens/s training, ~13,500 distilling, which also runs the teacher; 0.34 and 0.61 s
per 8,192-token step), evaluations included:

    .venv/bin/python bench/moe.py --part distill --seeds 0 1 2 --concurrent \
        > bench/results/moe_distill_seeds.json

The rival is the dense model a Switch model is made from: same width, depth, data, steps,
schedule and seed, and the same FLOPs per token (Switch routes each token to one expert of the
dense MLP's width, so only the router is added). Four measurements (Fedus et al. 2021):

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
  distill   Switch Table 6 at equal steps, repeated over --seeds. The teacher (the Switch
            model) and the dense baseline each train S = --distill-steps steps from scratch;
            their gap is the teacher's gain. Three runs of S more steps then continue them
            through `burrow distill`'s code path (`student_config` and its trainer, as
            `burrow distill --teacher RUN --student PRESET` builds them): the dense baseline
            from all its own weights on the labels alone, the distilled student from the
            teacher's non-expert weights on 0.75 labels + 0.25 teacher probabilities, and
            Table 6's initialisation baseline from the same weights on the labels alone. Gain
            kept = (continued dense loss - student loss) / the teacher's gain: the student is
            compared with a dense model trained for as many steps in all, 2S (Table 6: ~30%;
            the initialisation baseline ~0%). The three continuations run the same schedule,
            the one `burrow distill` gives a student: a fresh AdamW, a fresh warmup and cosine
            over the S steps, the data order from its start. A student cannot continue the
            teacher's schedule (its optimizer state holds experts the student lacks), so the
            dense baseline is restarted the same way rather than resumed with `burrow train
            --resume --max-steps 2S` (which would keep its AdamW moments and stretch its
            cosine, annealed at S, back up): the three then differ only in the weights they
            start from and in the teacher's probabilities. Losses are each run's final
            evaluation on all the held-out tokens.

    .venv/bin/python bench/moe.py                      # every part: ~3.5 hours on 2 cores
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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    common_parser,
    emit,
    log,
    machine,
    paired_rounds,
    run_main,
    set_threads,
    summary,
    warn_if_busy,
)

from burrow import UserError, presets
from burrow.config import RunConfig, TrainConfig
from burrow.files import save_figure
from burrow.infer import generate
from burrow.model import Transformer
from burrow.model.moe import SwitchMLP
from burrow.train.metrics import MetricsLog
from burrow.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
# (label_weight, teacher_weight) of `burrow distill`: Switch Table 6's mix, and the labels alone
# (the initialisation baseline, and the dense baseline's continuation)
DISTILLED, LABELS_ONLY = (0.75, 0.25), (1.0, 0.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser("rounds", "threads", "seed", "quick",
                      quick="tiny runs: checks the script runs")])
    parser.add_argument("--part", choices=("all", "quality", "cost", "decode", "distill"),
                        default="all")
    # micro, long: the experts' extra parameters pay off only once the dense model is limited
    # by its size rather than by the number of steps it has taken (BENCHMARKS.md)
    parser.add_argument("--dense", default="micro", help="dense preset (default micro)")
    parser.add_argument("--experts", type=int, default=8, help="experts per sparse layer")
    parser.add_argument("--steps", type=int, default=6000,
                        help="quality: training steps of each run")
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="tokens per optimizer step of each run")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--schedule", default="cosine",
                        choices=("cosine", "rsqrt", "warmup_rsqrt", "constant"),
                        help="learning-rate schedule of both runs after the warmup")
    parser.add_argument("--switch-steps", type=int, nargs="*", default=[],
                        help="quality: also train Switch runs of these lengths, each with its "
                             "own schedule, and report the shortest that reaches the dense "
                             "run's final loss")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="distill: the seeds the measurement is repeated with (--seed is "
                             "the other parts')")
    parser.add_argument("--distill-steps", type=int, default=3000,
                        help="distill: training steps of each of a seed's five runs (teacher, "
                             "dense baseline, and the three that continue them)")
    parser.add_argument("--save-every", type=int, default=1000,
                        help="checkpoint interval of the training runs: a run stopped by a "
                             "kill resumes from its last checkpoint when the command is rerun")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_runs"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "moe_quality.png"))
    parser.add_argument("--concurrent", action="store_true",
                        help="quality, distill: train two runs at once, one thread each (on "
                             "2 cores nano finishes ~1.2x sooner than one run after the other "
                             "at 2 threads, micro ~1.04x)")
    if parser.parse_args().quick:
        # one thread: a tiny model's two threads wait for each other when a core is busy
        parser.set_defaults(steps=12, eval_every=4, rounds=1, dense="micro", switch_steps=[8],
                            seeds=[0, 1], distill_steps=4, threads=1,
                            out=str(ROOT / "bench" / "results" / "quick" / "moe_runs"),
                            figure=str(ROOT / "bench" / "results" / "quick" / "moe_quality.png"))
    args = parser.parse_args()
    if (args.steps < 2 or args.eval_every < 1 or args.rounds < 1 or args.experts < 2
            or args.save_every < 0 or args.batch_tokens < 1 or args.distill_steps < 2):
        raise UserError("--steps >= 2, --eval-every >= 1, --rounds >= 1, --experts >= 2, "
                        "--save-every >= 0, --batch-tokens >= 1 and --distill-steps >= 2")
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
    """Train (or resume a finished run) and return its (step, validation loss) curve.

    A config with a `distill` section trains with `burrow distill`'s trainer, as `burrow train`
    does."""
    from burrow.train import Trainer, train
    from burrow.train.distill import Distiller

    set_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        train(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir(),
              trainer_class=Distiller if cfg.distill is not None else Trainer)
    rows = MetricsLog(run_dir / "metrics.jsonl").rows()
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
            generate(model, prompt, new_tokens, temperature=0.0, compile=compiled)
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


def distill(args: argparse.Namespace, dense_cfg: RunConfig, switch_cfg: RunConfig
            ) -> dict[str, Any]:
    """Switch Table 6 at equal steps, once per seed of --seeds (the module docstring says how):
    the share of the teacher's gain kept by the distilled student and by the initialisation
    baseline, with their mean and spread over the seeds."""
    seeds = [distill_seed(args, dense_cfg, switch_cfg, seed) for seed in args.seeds]
    return {"seeds": args.seeds, "steps_each_run": args.distill_steps,
            "schedule": "each run its own warmup and cosine over its steps, a fresh AdamW and "
                        "the data order from its start; the continuations start from copied "
                        "weights",
            "held_out_tokens": seeds[0]["held_out_tokens"], **distill_summary(seeds),
            "per_seed": seeds}


def distill_summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds of every gain. The shares divide by the teacher's gain,
    so they are given only when that gain is resolved: positive in every seed and at least
    twice its standard deviation; otherwise they would be noise over noise, and the
    differences in nats (which need no teacher gain) are what the run measured."""
    result: dict[str, Any] = {key: spread([seed[key] for seed in seeds]) for key in (
        "teacher_gain_nats", "continued_dense_gain_nats", "student_minus_init_only_nats",
        "student_minus_continued_dense_nats", "init_only_minus_continued_dense_nats")}
    teacher = result["teacher_gain_nats"]
    resolved = (all(gain > 0 for gain in teacher["values"])
                and (teacher["std"] is None or teacher["mean"] >= 2 * teacher["std"]))
    result["teacher_gain_resolved"] = resolved
    for key in ("student_gain_kept_percent", "init_only_gain_kept_percent",
                "teacher_probabilities_share_percent"):
        result[key] = (spread([seed[key] for seed in seeds]) if resolved else
                       "undefined: the teacher's gain is within its spread over the seeds")
    return result


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of the values that are not None."""
    known = [value for value in values if value is not None]
    return {"mean": statistics.mean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else None,
            "min": min(known, default=None), "max": max(known, default=None),
            "values": values}


def distill_seed(args: argparse.Namespace, dense_cfg: RunConfig, switch_cfg: RunConfig,
                 seed: int) -> dict[str, Any]:
    """One seed's five runs of STEPS = --distill-steps in out/distill_STEPS/seed_N: the teacher
    and the dense baseline from scratch, then from their weights the dense baseline continued,
    the distilled student and the initialisation baseline; gains read off their final
    evaluations, all on the same held-out tokens."""
    steps = args.distill_steps
    out = Path(args.out) / f"distill_{steps}" / f"seed_{seed}"
    log(f"== distill, seed {seed}: {switch_cfg.preset} and {dense_cfg.preset}, {steps} steps")

    def from_scratch(cfg: RunConfig) -> RunConfig:
        train = dataclasses.replace(
            cfg.train, max_steps=steps, warmup_steps=min(100, steps // 10),
            log_every=max(1, steps // 20), seed=seed,
            # every held-out token (--quick: its few), as `burrow distill`'s report reads them
            eval_tokens=cfg.train.eval_tokens if args.quick else 0)
        return dataclasses.replace(cfg, train=train)

    curves = train_all({"switch": from_scratch(switch_cfg), "dense": from_scratch(dense_cfg)},
                       out, args.concurrent)
    curves.update(train_all({
        "dense_continued": continuation(out / "dense", args.dense, LABELS_ONLY),
        "student": continuation(out / "switch", args.dense, DISTILLED),
        "init_only": continuation(out / "switch", args.dense, LABELS_ONLY)},
        out, args.concurrent))
    final: dict[str, float] = {}
    for name, curve in curves.items():
        if not curve or curve[-1][0] != steps:
            raise UserError(f"{out / name} has no evaluation at step {steps}: delete it and "
                            "run again")
        final[name] = curve[-1][1]
    held_out = [row for row in MetricsLog(out / "dense" / "metrics.jsonl").rows()
                if row.get("split") == "val"][-1]["tokens"]
    return {"seed": seed, "final_val_loss": final, "held_out_tokens": held_out, **gains(final),
            "val_curves": curves}


def gains(final: dict[str, float]) -> dict[str, float | None]:
    """Switch Table 6's shares from the final losses of a seed's five runs: the teacher's gain
    over the dense baseline at equal steps, and the share of it by which the student and the
    initialisation baseline beat the dense baseline continued as long (None when the teacher
    is no better than the dense baseline: there is no gain to keep)."""
    gain = final["dense"] - final["switch"]

    def kept(name: str) -> float | None:
        return 100 * (final["dense_continued"] - final[name]) / gain if gain > 0 else None

    student, init_only = kept("student"), kept("init_only")
    return {"teacher_gain_nats": gain,
            "continued_dense_gain_nats": final["dense"] - final["dense_continued"],
            "student_minus_init_only_nats": final["student"] - final["init_only"],
            "student_minus_continued_dense_nats": final["student"] - final["dense_continued"],
            "init_only_minus_continued_dense_nats":
                final["init_only"] - final["dense_continued"],
            "student_gain_kept_percent": student, "init_only_gain_kept_percent": init_only,
            "teacher_probabilities_share_percent":
                None if student is None else student - init_only}


def continuation(teacher: Path, preset: str, weights: tuple[float, float]) -> RunConfig:
    """The config `burrow distill --teacher TEACHER --student PRESET --label-weight L
    --teacher-weight T` trains: `preset` initialised from every teacher tensor it shares by name
    and shape (all of a dense teacher's of the same shape), then trained as the teacher was
    (steps, schedule, seed, data) on L x the labels + T x the teacher's probabilities."""
    from burrow.train.distill import student_config

    cfg, _ = student_config(teacher, preset)
    label_weight, teacher_weight = weights
    cfg.distill = dataclasses.replace(cfg.distill, label_weight=label_weight,
                                      teacher_weight=teacher_weight)
    return cfg


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
        result["distill"] = distill(args, dense_cfg, switch_cfg)
    emit(result)


if __name__ == "__main__":
    run_main(main)
