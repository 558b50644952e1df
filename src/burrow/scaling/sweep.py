"""IsoFLOP sweeps (Chinchilla approach 2, Hoffmann et al. 2022, §3.2): for each budget C, train
models of several sizes with the real trainer, each on exactly the tokens C buys it.

For budget C the sizes are spaced log-uniformly from N_opt(C) / span to N_opt(C) x span (the
law's optimum, default span 3, so a 9x range), each the nearest sensible shape
(`shapes.choose_shape`). N is the count in C = 6ND: the weights a token is multiplied by, the
embedding matrix once (`flops.matmul_params`); attention's 12·L·H·Q·T is left out as in
Chinchilla. A run trains for D = C / (6N) tokens, rounded to whole steps, so the C in the table
is 6 x N x the tokens actually trained. Each run's cosine schedule spans its own steps and
decays to 10% (§3.2 and Appendix D: a cycle longer than the run overestimates the loss), after a
warmup of 5% of them. The loss in the table is the held-out loss after the last step.

A sweep directory holds sweep.json (the plan, written first), runs/NAME/ (one run directory
each, with result.json once finished), results.csv and results.jsonl (rewritten after each run),
and the figures. Running the same command again skips finished runs and resumes an interrupted
one from its checkpoint.

Horizons (Chinchilla approach 1, §3.1 and Figure 2): "for each parameter count N we train 4
different models, decaying the learning rate by a factor of 10x over a horizon (measured in number
of training tokens) that ranges by a factor of 16x". With `horizons` (token multipliers, e.g.
`horizon_multipliers(4)` = 1, 16^-1/3, 16^-2/3, 1/16) each run of the IsoFLOP plan gets siblings,
the same model on those fractions of its tokens, each with a cosine schedule over its own steps.
The IsoFLOP run is the longest horizon, so approach 2's profiles stay as they are, and the
siblings of one budget (C x m FLOPs each) form IsoFLOP profiles of their own. Every run logs its
training loss about CURVE_POINTS times: the curves approach 1's envelope is built from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from burrow.config import DataConfig, RunConfig, TrainConfig
from burrow.errors import UserError
from burrow.files import write_text
from burrow.flops import flops_per_token, matmul_params
from burrow.scaling.laws import get_law
from burrow.scaling.results import update_results
from burrow.scaling.shapes import choose_shape, smallest_shape

MANIFEST = "sweep.json"
RESULT = "result.json"
# Fewer optimiser steps than this is no training run.
MIN_STEPS = 20
# Wall-clock model of a tiny CPU run, fitted to the six runs of a stdlib sweep (d_model 32-64,
# vocabulary 512, 256 tokens of context) on a 2-core x86 CPU: seconds per token = (FLOPs per
# token + OVERHEAD) / (EFFICIENCY x measured matmul peak), within 10%; plus RUN_SECONDS per run
# (setup, final evaluation, sample, checkpoint) and STEP_SECONDS per optimiser step (measured
# as the difference between batches of 1024 and 4096 tokens). It also matched a d_model-128 model.
OVERHEAD_FLOPS_PER_TOKEN = 6e5
EFFICIENCY = 0.63
RUN_SECONDS = 3.0
STEP_SECONDS = 2e-3
# Training-loss rows a run logs (each the mean of the steps since the last one): the points of
# the curve approach 1 reads; the rest of a run's steps are averaged into them.
CURVE_POINTS = 100
# Chinchilla §3.1: a model's horizons range over a factor of 16 in training tokens.
HORIZON_RANGE = 16.0


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep trains: budgets, sizes around the law's optimum, data and training."""

    budgets: tuple[float, ...] = (1e12, 3e12, 1e13)
    sizes: int = 5
    # Sizes run from N_opt / span to N_opt x span.
    span: float = 3.0
    law: str = "chinchilla"
    arch: str = "llama"
    data: str = "stdlib"
    vocab_size: int = 512
    val_fraction: float = 0.02
    text_field: str = "text"
    tokenizer_type: str = "bpe"
    seq_len: int = 256
    batch_tokens: int = 1024
    lr: float = 3e-3
    eval_tokens: int = 65536
    seed: int = 0
    device: str = "auto"
    # Fractions of each IsoFLOP run's tokens trained as runs of their own (approach 1's
    # horizons, §3.1); (1.0,) = the IsoFLOP runs only.
    horizons: tuple[float, ...] = (1.0,)

    def validate(self) -> None:
        if not self.budgets:
            raise UserError("--budgets needs at least one budget, e.g. --budgets 1e12,3e12")
        if not self.horizons or any(not (math.isfinite(m) and 0 < m <= 1)
                                    for m in self.horizons):
            raise UserError(f"--horizons takes a count such as 4, or token fractions in (0, 1] "
                            f"such as 1,0.25,0.0625, got {','.join(map(str, self.horizons))}")
        if len(set(self.horizons)) != len(self.horizons):
            raise UserError("--horizons lists a fraction twice: "
                            f"{','.join(map(str, self.horizons))}")
        for value in self.budgets:
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--budgets must be positive FLOPs, got {value:g}")
        if self.sizes < 3:
            raise UserError(f"--sizes must be at least 3 (an IsoFLOP parabola needs three "
                            f"points), got {self.sizes}")
        if not (math.isfinite(self.span) and self.span > 1):
            raise UserError(f"--span must be above 1 (sizes from N_opt/span to N_opt*span), "
                            f"got {self.span}")
        if self.batch_tokens % self.seq_len:
            raise UserError(f"--batch-tokens {self.batch_tokens} must be a multiple of "
                            f"--seq-len {self.seq_len}")


@dataclass(frozen=True)
class SweepRun:
    """One planned run: its budget, size, tokens and full config; `horizon` is the fraction of
    the IsoFLOP run's tokens it trains (1: the IsoFLOP run itself), `budget` its own C."""

    name: str
    budget: float
    target_params: float
    params: int
    steps: int
    tokens: int
    config: RunConfig
    horizon: float = 1.0

    @property
    def flops(self) -> float:
        """C = 6ND of the tokens actually trained."""
        return 6.0 * self.params * self.tokens

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "budget": self.budget, "horizon": self.horizon,
                "target_params": self.target_params, "params": self.params, "steps": self.steps,
                "tokens": self.tokens, "flops": self.flops, "config": self.config.to_dict()}


def parse_budgets(text: str) -> tuple[float, ...]:
    """'1e12,3e12' -> (1e12, 3e12), sorted; UserError on anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--budgets takes comma-separated FLOPs such as 1e12,3e12,1e13, got "
                        f"{text!r}") from None
    return tuple(sorted(values))


def horizon_multipliers(count: int) -> tuple[float, ...]:
    """`count` token fractions spaced log-uniformly from 1 down to 1/16 (§3.1: horizons over a
    16x range); 4 -> (1, 0.397, 0.157, 0.0625); 1 -> (1,)."""
    if count < 1:
        raise UserError(f"--horizons must be at least 1, got {count}")
    if count == 1:
        return (1.0,)
    return tuple(HORIZON_RANGE ** (-j / (count - 1)) for j in range(count))


def parse_horizons(text: str) -> tuple[float, ...]:
    """'4' -> horizon_multipliers(4); '1,0.5,0.25' -> (1, 0.5, 0.25), largest first."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if "," not in text and len(values) == 1 and values[0].is_integer():
        return horizon_multipliers(int(values[0]))
    if not values:
        raise UserError(f"--horizons takes a count such as 4, or token fractions such as "
                        f"1,0.25,0.0625, got {text!r}")
    return tuple(sorted(values, reverse=True))


def _budget_name(budget: float) -> str:
    return f"{budget:.3g}".replace("e+", "e")


def _train_config(settings: SweepSettings, steps: int) -> TrainConfig:
    sequences = settings.batch_tokens // settings.seq_len
    micro = max(n for n in range(1, min(16, sequences) + 1) if sequences % n == 0)
    return TrainConfig(max_steps=steps, batch_tokens=settings.batch_tokens,
                       micro_batch_size=micro, seq_len=settings.seq_len, lr=settings.lr,
                       warmup_steps=max(1, round(0.05 * steps)), schedule="cosine",
                       min_lr_ratio=0.1, eval_every=0, eval_tokens=settings.eval_tokens,
                       save_every=max(1, steps // 4), keep_checkpoints=1,
                       log_every=max(1, steps // CURVE_POINTS), seed=settings.seed,
                       device=settings.device)


def plan_sweep(settings: SweepSettings) -> list[SweepRun]:
    """The runs of a sweep, smallest budget first and, within one, smallest model first."""
    settings.validate()
    law = get_law(settings.law)
    data = DataConfig(source=settings.data, text_field=settings.text_field,
                      val_fraction=settings.val_fraction, tokenizer_type=settings.tokenizer_type)
    smallest = matmul_params(smallest_shape(vocab_size=settings.vocab_size,
                                            max_seq_len=settings.seq_len, arch=settings.arch))
    runs: list[SweepRun] = []
    for budget in settings.budgets:
        n_opt, _ = law.optimal(budget)
        if n_opt / settings.span < smallest:
            raise UserError(f"budget {budget:g} is too small: its smallest size, N_opt/span = "
                            f"{n_opt / settings.span:,.0f}, is below the smallest model "
                            f"({smallest:,} parameters at vocabulary {settings.vocab_size}); "
                            "raise the budget or lower --span")
        shapes: dict[int, tuple[float, Any]] = {}
        for i in range(settings.sizes):
            target = n_opt * settings.span ** (2 * i / (settings.sizes - 1) - 1)
            model = choose_shape(target, vocab_size=settings.vocab_size,
                                 max_seq_len=settings.seq_len, arch=settings.arch)
            shapes.setdefault(matmul_params(model), (target, model))
        if len(shapes) < 3:
            raise UserError(f"budget {budget:g}: the sizes collapse onto {len(shapes)} distinct "
                            "shapes; raise the budget or --span")
        for params, (target, model) in sorted(shapes.items()):
            runs += [_plan_run(settings, data, budget, horizon, target, params, model)
                     for horizon in settings.horizons]
    return runs


def _plan_run(settings: SweepSettings, data: DataConfig, budget: float, horizon: float,
              target: float, params: int, model) -> SweepRun:
    """The run of `model` on `horizon` x the tokens that `budget` buys it, whole steps."""
    own_budget = budget * horizon
    steps = round(own_budget / (6.0 * params) / settings.batch_tokens)
    if steps < MIN_STEPS:
        where = f" at horizon {horizon:.3g}" if horizon != 1 else ""
        raise UserError(f"budget {budget:g}{where} buys a {params:,}-parameter model only "
                        f"{steps} steps of {settings.batch_tokens} tokens; raise the budget or "
                        f"lower --batch-tokens (at least {MIN_STEPS} steps)"
                        + (", or use fewer or longer --horizons" if horizon != 1 else ""))
    name = f"C{_budget_name(budget)}_N{params}" + (f"_h{horizon:.3g}" if horizon != 1 else "")
    config = RunConfig(model=model, train=_train_config(settings, steps), data=data,
                       preset=f"sweep-{settings.arch}")
    return SweepRun(name, own_budget, target, params, steps, steps * settings.batch_tokens,
                    config, horizon)


def estimate_seconds(runs: list[SweepRun], peak_flops: float) -> float:
    """Expected wall time of `runs` on a CPU whose matmuls reach `peak_flops` (see EFFICIENCY)."""
    total = 0.0
    for run in runs:
        per_token = flops_per_token(run.config.model, run.config.train.seq_len)
        total += run.tokens * (per_token + OVERHEAD_FLOPS_PER_TOKEN) / (EFFICIENCY * peak_flops)
    return total + sum(RUN_SECONDS + STEP_SECONDS * run.steps for run in runs)


def _write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


def open_sweep(out: Path, settings: SweepSettings, runs: list[SweepRun], *,
               force: bool = False) -> None:
    """Write the plan to out/sweep.json, or check it equals the one already there.

    With `force` a different plan replaces the old one, and the old plan's run directories
    that the new one does not have with the same config are deleted.
    """
    manifest = json.loads(json.dumps({"format": 1, "settings": dataclasses.asdict(settings),
                                      "runs": [run.to_dict() for run in runs]}))
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if _same_plan(old.get("runs", []), manifest["runs"]):
            _write_json(path, manifest)
            return
        if not force:
            raise UserError(f"{out} holds a different sweep ({_difference(old, manifest)}); "
                            "use another --out, or --force to replace it")
        keep = {run["name"]: run["config"] for run in manifest["runs"]}
        for run in old.get("runs", []):
            if run["name"] not in keep or not _same_config(run["config"], keep[run["name"]]):
                shutil.rmtree(out / "runs" / run["name"], ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, manifest)


def _same_plan(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> bool:
    """Whether two plans train the same runs: the same names in order, and configs equal but
    for how often they log (a sweep planned when runs logged 4 times, before approach 1 read
    the curves, continues) and for fields the old plan did not know (a burrow that gained a
    setting since the sweep began plans the same runs with the setting's default)."""
    return (len(old) == len(new)
            and all(a["name"] == b["name"] and _same_config(a["config"], b["config"])
                    for a, b in zip(old, new)))


def _same_config(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """old's fields equal new's (recursively); fields only new has, and log_every, ignored."""
    for key, value in old.items():
        if key == "log_every":
            continue
        if key not in new:
            return False
        if isinstance(value, dict) and isinstance(new[key], dict):
            if not _same_config(value, new[key]):
                return False
        elif value != new[key]:
            return False
    return True


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first settings that differ between two manifests, for the error message."""
    before, after = old.get("settings", {}), new["settings"]
    changed = [key for key in after if before.get(key) != after[key]]
    if not changed:  # same settings, other runs: burrow's shape rules changed
        names = [{run["name"] for run in manifest["runs"]} for manifest in (old, new)]
        return (f"same settings but other runs: {', '.join(sorted(names[0] - names[1])) or '-'}"
                f" -> {', '.join(sorted(names[1] - names[0])) or 'changed configs'}")
    return ", ".join(f"{key} {before.get(key)!r} -> {after[key]!r}" for key in changed[:3])


def run_sweep(settings: SweepSettings, out: Path, *, force: bool = False,
              max_runs: int | None = None, verbose: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, then train every unfinished run of the sweep in `out`; return the results.

    `max_runs` stops after that many runs trained in this call (tests use it to simulate a
    sweep cut short). Stopped by a signal, the current run keeps its checkpoint and the result
    says `interrupted`.
    """
    out = Path(out)
    runs = plan_sweep(settings)
    open_sweep(out, settings, runs, force=force)
    pending = [run for run in runs if not (out / "runs" / run.name / RESULT).is_file()]
    peak = cpu_peak_flops(settings.device) if pending else None
    estimate = estimate_seconds(pending, peak) if peak else None
    log(_overview(runs, pending, settings, out, estimate))
    if pending:
        log(_data_note(pending, verbose))
    progress = _Progress(runs, pending, log, estimate)
    latest = None
    for run in pending[:max_runs]:
        progress.start(run)
        result = _train_run(run, out / "runs" / run.name, verbose=verbose)
        if result is None:
            log(f"sweep stopped during {run.name}; run the same command to continue")
            return {"out": str(out), "interrupted": True, **update_results(out, runs)}
        progress.finish(run, result)
        latest = update_results(out, runs)
    return {"out": str(out), "interrupted": False, **(latest or update_results(out, runs))}


def _overview(runs: list[SweepRun], pending: list[SweepRun], settings: SweepSettings,
              out: Path, estimate: float | None) -> str:
    from burrow.units import format_duration

    if not pending:
        when = "nothing to train"
    elif estimate is None:
        when = "no time estimate off a CPU"
    else:
        when = f"estimated {format_duration(estimate)}"
    budgets = ", ".join(_budget_name(b) for b in settings.budgets)
    horizons = (f"; each on {len(settings.horizons)} horizons, token fractions "
                f"{', '.join(f'{m:.3g}' for m in settings.horizons)}"
                if settings.horizons != (1.0,) else "")
    return (f"sweep {out}: {len(runs)} runs ({len(settings.budgets)} budgets: {budgets}; "
            f"{settings.sizes} sizes each from N_opt/{settings.span:g} to "
            f"N_opt*{settings.span:g} under the {settings.law} law{horizons}); "
            f"{len(runs) - len(pending)} finished, {len(pending)} to train, {when}")


def _data_note(runs: list[SweepRun], verbose: bool) -> str:
    """How many times the longest run reads the training split (prepared now if need be)."""
    from burrow.data import TokenDataset, prepare_data

    available = TokenDataset(prepare_data(runs[0].config, progress=verbose), "train").num_tokens
    longest = max(run.tokens for run in runs)
    note = (f"data: {available:,} training tokens; the longest run reads {longest:,} "
            f"({longest / available:.2g} epochs)")
    if longest > available:
        note += (", repeating data, unlike Chinchilla's runs (Muennighoff et al. 2023 found up "
                 "to ~4 epochs nearly as good as fresh data)")
    return note


def cpu_peak_flops(device: str) -> float | None:
    """The CPU's measured matmul FLOP/s for the estimate; None off the CPU. Measured once per
    process and shared with the trainer's MFU (`flops.device_peak_flops`)."""
    import torch

    from burrow.train.hardware import device_peak_flops

    if device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return None
    return device_peak_flops("cpu", torch.float32)


class _Progress:
    """One line per run start and end, with an ETA from the FLOP/s (6ND) measured so far: runs
    of one budget have equal FLOPs but not equal tokens, so FLOP/s predicts better than tokens/s.
    Before the first run ends, the ETA is the estimate."""

    def __init__(self, runs: list[SweepRun], pending: list[SweepRun], log,
                 estimate: float | None) -> None:
        self.total, self.log, self.estimate = len(runs), log, estimate
        self.index = {run.name: i + 1 for i, run in enumerate(runs)}
        self.remaining = sum(run.flops for run in pending)
        self.done_flops, self.seconds, self.started = 0.0, 0.0, 0.0

    def _eta(self) -> str:
        from burrow.units import format_duration

        if not self.done_flops:
            return f"ETA ~{format_duration(self.estimate)}" if self.estimate else "ETA -"
        return f"ETA {format_duration(self.remaining * self.seconds / self.done_flops)}"

    def start(self, run: SweepRun) -> None:
        model = run.config.model
        self.started = time.perf_counter()
        self.log(f"run {self.index[run.name]}/{self.total} | {run.name} | C {run.flops:.3g} | "
                 f"N {run.params:,} ({model.n_layers} x {model.d_model}) | D {run.tokens:,} "
                 f"({run.steps} steps) | {self._eta()}")

    def finish(self, run: SweepRun, result: dict[str, Any]) -> None:
        self.seconds += time.perf_counter() - self.started
        self.done_flops += run.flops
        self.remaining -= run.flops
        self.log(f"run {self.index[run.name]}/{self.total} done | {run.name} | val loss "
                 f"{result['loss']:.4f} | train loss {result['train_loss']:.4f} | "
                 f"{result['seconds']:.0f}s | {self._eta()}")


def _train_run(run: SweepRun, run_dir: Path, *, verbose: bool) -> dict[str, Any] | None:
    """Train (or resume) one run and write its result.json; None if a signal stopped it."""
    from burrow.train import train
    from burrow.train.checkpoint import latest_checkpoint

    timing = run_dir / "sweep_seconds.json"
    before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    resume = latest_checkpoint(run_dir) is not None
    started = time.perf_counter()
    try:
        summary = train(run.config, run_dir, resume=resume, verbose=verbose)
    finally:
        seconds = before + time.perf_counter() - started
        if run_dir.is_dir():
            _write_json(timing, {"seconds": seconds})
    if summary["interrupted"]:
        return None
    if summary["val"] is None:
        raise UserError(f"{run_dir}: the data has no held-out documents to measure the loss "
                        "on; raise --val-fraction or add files")
    model = run.config.model
    result = {"budget": run.budget, "horizon": run.horizon, "name": run.name, "N": run.params,
              "D": run.tokens,
              "C": run.flops, "loss": summary["val"]["loss"],
              "train_loss": summary["train_losses"][-1], "steps": summary["step"],
              "seconds": round(seconds, 2), "n_layers": model.n_layers,
              "d_model": model.d_model, "n_heads": model.n_heads,
              "total_params": model.num_params()}
    _write_json(run_dir / RESULT, result)
    return result
