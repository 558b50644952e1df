"""The scaling verbs of the CLI: `plan`, `sweep` and `fit`, each a function of parsed arguments
that returns a JSON-able result, and the text formatters for them. `plan` and `fit` do
arithmetic: neither imports torch (nor matplotlib, unless `fit` draws)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from burrow.errors import UserError
from burrow.paths import check_writable_dir
from burrow.scaling import plan as planning
from burrow.units import format_count, format_duration

_ARCH_WORDS = {"llama": "RoPE, RMSNorm, SwiGLU, untied embeddings",
               "chinchilla": "relative positions, RMSNorm, GELU, tied embeddings"}


def plan_command(args: argparse.Namespace) -> dict[str, Any]:
    """`burrow plan`: the budget, the law's optimum, a model, its wall clock, all laws; with
    --cluster, the model's parallel plan and the wall clock it predicts (scaling/cluster.py)."""
    if args.cluster:
        result = _plan_on_cluster(args)
        spent = result["budget"]
    else:
        if args.memory or args.global_batch:
            raise UserError("--memory and --global-batch size the parallel plan: give them "
                            "with --cluster (e.g. --cluster 64xh100)")
        device = (planning.hardware(args.device, precision=args.precision, mfu=args.mfu)
                  if args.device else None)
        spent = planning.budget(flops=args.flops, gpu_hours=args.gpu_hours, preset=args.preset,
                                tokens=args.tokens, device=device)
        result = planning.plan(spent["flops"], law=args.law, arch=args.arch,
                               vocab_size=args.vocab_size, device=device,
                               num_devices=args.num_devices or 1)
    result["budget"] = spent
    if args.preset:
        law = planning.get_law(args.law)
        result["preset"] = planning.preset_gap(spent, law)
        for row in result["laws"]:
            row["preset_params_ratio"] = spent["params"] / row["params"]
    if args.emit_config:
        path = Path(args.emit_config)
        check_writable_dir(path.parent, "folder of --emit-config", "choose another PATH")
        batch = {}
        if args.cluster:  # the plan's global batch; the module is loaded already
            from burrow.scaling import cluster

            batch = cluster.train_batch(result)
        cfg = planning.run_config(result, data=args.data, **batch)
        cfg.data = dataclasses.replace(cfg.data, text_field=args.text_field)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(path)
        result["emitted_config"] = {"path": args.emit_config, "max_steps": cfg.train.max_steps,
                                    "batch_tokens": cfg.train.batch_tokens, "lr": cfg.train.lr}
        if args.cluster:
            result.update(cluster.emit_plan(result, path))
    return result


def _plan_on_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """`burrow plan --cluster`: the parallel planner (numpy) is imported only here."""
    from burrow.scaling import cluster

    if args.device or args.num_devices:
        raise UserError(f"--cluster {args.cluster} names the GPUs and how many; leave out "
                        "--device and --num-devices")
    on = cluster.parse_cluster(args.cluster, memory=args.memory,
                               global_batch=args.global_batch, precision=args.precision,
                               # the emitted launch line must start a plan burrow runs
                               executable=args.executable or bool(args.emit_config))
    return cluster.plan_on_cluster(on, flops=args.flops, gpu_hours=args.gpu_hours,
                                   preset=args.preset, tokens=args.tokens, law=args.law,
                                   arch=args.arch, vocab_size=args.vocab_size,
                                   first_mfu=args.mfu)


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    days = seconds / 86400
    if days >= 365:
        return f"{days / 365.25:.1f} years"
    if days >= 2:
        return f"{days:.1f} days"
    return format_duration(seconds)


def _law_lines(law: dict[str, Any]) -> list[str]:
    lines = [f"law       {law['name']}: {law['source']}"]
    if "E" in law:
        lines.append(f"          L(N, D) = {law['E']:g} + {law['A']:g}/N^{law['alpha']:g} + "
                     f"{law['B']:g}/D^{law['beta']:g}")
    elif "n_coef" in law:
        lines.append(f"          N_opt = {law['n_coef']:.4g} x C^{law['a']:g}")
    lines.append(f"          N_opt ∝ C^a, D_opt ∝ C^b with a = {law['exponent_a']:.3f}, "
                 f"b = {law['exponent_b']:.3f}")
    return lines


def _budget_line(result: dict[str, Any]) -> str:
    spent, flops = result["budget"], result["flops"]
    if spent["given_as"] == "gpu_hours":
        time = result["time"]
        return (f"budget    {flops:.3g} FLOPs = {spent['gpu_hours']:g} {time['device']} hours x "
                f"3600 x {time['peak_flops']:.4g} FLOP/s ({time['precision']}) x MFU "
                f"{time['mfu']:.3g}")
    if spent["given_as"] == "preset":
        return (f"budget    {flops:.3g} FLOPs = 6 x {spent['params']:,} parameters of "
                f"{spent['preset']} x {spent['tokens']:.3g} tokens")
    return f"budget    {flops:.3g} FLOPs (C = 6ND)"


def _model_lines(model: dict[str, Any]) -> list[str]:
    return [
        f"model     {model['n_layers']} layers, d_model {model['d_model']}, {model['n_heads']} "
        f"heads of {model['head_dim']}, d_ff {model['d_ff']}, vocabulary {model['vocab_size']:,} "
        f"({model['arch']}: {_ARCH_WORDS[model['arch']]}; d_model/n_layers "
        f"{model['aspect_ratio']:.0f})",
        f"          N = {model['params']:,} ({format_count(model['params'])}; "
        f"{model['total_params']:,} stored), so the budget buys it {format_count(model['tokens'])} "
        "tokens",
    ]


def _time_line(time: dict[str, Any] | None) -> list[str]:
    if time is None:
        return []
    where = (f"{time['num_devices']:,} devices" if time["num_devices"] > 1 else "one device")
    return [f"time      {time['device_hours']:.3g} {time['device']} hours at "
            f"{time['peak_flops'] / 1e12:.4g} TFLOP/s ({time['precision']}) x MFU "
            f"{time['mfu']:g}: {_duration(time['wall_seconds'])} on {where}"]


def _preset_lines(gap: dict[str, Any], spent: dict[str, Any], law: str) -> list[str]:
    size = (f"{gap['params_ratio']:.2g}x larger than" if gap["params_ratio"] >= 1 else
            f"{1 / gap['params_ratio']:.2g}x smaller than")
    return [
        f"preset    {gap['name']}: {format_count(gap['params'])} parameters on "
        f"{format_count(gap['tokens'])} tokens ({gap['tokens_per_param']:.3g} tokens per "
        "parameter), "
        f"predicted loss {_loss(gap['loss'])} against {_loss(gap['optimal_loss'])} at the optimum",
        f"          {gap['name']} is {size} compute-optimal for its budget: N/N_opt = "
        f"{gap['params_ratio']:.3g}, D/D_opt = {gap['tokens_ratio']:.3g}; {law} would choose "
        f"{format_count(gap['optimal_params'])} parameters on "
        f"{format_count(gap['optimal_tokens'])} tokens",
        f"          (with attention, PaLM's 6N + 12LHQT: {spent['flops_with_attention']:.3g} "
        "FLOPs; papers count differently, e.g. Hoffmann et al. give Gopher 5.76e23)",
    ]


def _laws_table(rows: list[dict[str, Any]]) -> list[str]:
    preset = "preset_params_ratio" in rows[0]
    header = (f"{'law':<13} {'a':>5} {'b':>5} {'N_opt':>7} {'D_opt':>7} {'D/N':>6} "
              f"{'loss':>6}" + ("  N/N_opt" if preset else ""))
    lines = ["", "every built-in law at this budget:", header]
    for row in rows:
        lines.append(f"{row['law']:<13} {row['exponent_a']:>5.3f} {row['exponent_b']:>5.3f} "
                     f"{format_count(row['params']):>7} {format_count(row['tokens']):>7} "
                     f"{row['tokens_per_param']:>6.1f} {_loss(row['loss']):>6}"
                     + (f"  {row['preset_params_ratio']:>7.2f}" if preset else ""))
    return lines


def _approaches_line(rows: list[dict[str, Any]]) -> str:
    """How approach 3 differs from approaches 1 and 2 (Hoffmann et al. §3.4)."""
    by_name = {row["law"]: row["params"] for row in rows}
    three, one, two = by_name["chinchilla"], by_name["chinchilla-1"], by_name["chinchilla-2"]
    return (f"approach 3 (chinchilla) predicts {format_count(three)} parameters, "
            f"{one / three:.2g}x fewer than approach 1 ({format_count(one)}) and "
            f"{two / three:.2g}x fewer than approach 2 ({format_count(two)}); Hoffmann et al. "
            "trained Chinchilla at 70B on 1.4T tokens, following approaches 1 and 2 (§3.4)")


def format_plan(result: dict[str, Any]) -> str:
    best, law = result["optimal"], result["law"]
    lines = [_budget_line(result), *_law_lines(law),
             f"N_opt     {format_count(best['params'])} parameters",
             f"D_opt     {format_count(best['tokens'])} tokens "
             f"({best['tokens_per_param']:.1f} tokens per parameter)",
             f"loss      {_loss(best['loss'])} nats/token"
             + (f" (predicted by the {law['loss_from']} law)" if law["loss_from"] else
                " (this law predicts no loss)"),
             f"check     6 x N_opt x D_opt = {best['flops_check']:.4g} FLOPs",
             *_model_lines(result["model"])]
    if "plan" in result:  # --cluster: the parallel plan and the wall clock it predicts
        from burrow.scaling.cluster import format_cluster

        lines += format_cluster(result)
    else:
        lines += _time_line(result["time"])
    if "preset" in result:
        lines += _preset_lines(result["preset"], result["budget"], law["name"])
    if "emitted_config" in result:
        emitted = result["emitted_config"]
        plan = f" and plan {result['emitted_plan']}" if "emitted_plan" in result else ""
        start = ("the launch line" if "launch" in result else
                 f"`burrow train --config {emitted['path']}`")
        lines.append(f"config    {emitted['path']}{plan}: {emitted['max_steps']:,} steps of "
                     f"{emitted['batch_tokens']:,} tokens, lr {emitted['lr']:g}; train it with "
                     f"{start}")
        if "launch" in result:
            lines.append(f"launch    {result['launch']}")
            if result["cluster"]["nodes"] > 1:
                lines.append("          on each node; HOST is the first node's address")
    if law.get("note"):
        lines.append(f"note      {law['note']}")
    lines += _laws_table(result["laws"])
    if any(row["law"] == "kaplan" for row in result["laws"]):
        lines.append("(kaplan: N without embeddings and loss in nats of GPT-2 tokens on WebText2, "
                     "not comparable with the others)")
    lines.append(_approaches_line(result["laws"]))
    return "\n".join(lines)


def sweep_settings(args: argparse.Namespace):
    """SweepSettings from `burrow sweep` flags (data paths made absolute)."""
    from burrow.data import resolve_source
    from burrow.scaling.sweep import SweepSettings, parse_budgets, parse_horizons

    given = {"budgets": parse_budgets(args.budgets) if args.budgets else None,
             "sizes": args.sizes, "span": args.span, "vocab_size": args.vocab_size,
             "horizons": parse_horizons(args.horizons) if args.horizons else None}
    return SweepSettings(law=args.law, arch=args.arch, data=resolve_source(args.data),
                         val_fraction=args.val_fraction, text_field=args.text_field,
                         tokenizer_type=args.tokenizer_type, seq_len=args.seq_len,
                         batch_tokens=args.batch_tokens, lr=args.lr, eval_tokens=args.eval_tokens,
                         seed=args.seed, device=args.device,
                         **{key: value for key, value in given.items() if value is not None})


def sweep_command(args: argparse.Namespace) -> int:
    """`burrow sweep`: train the IsoFLOP families (or, with --dry-run, list them).

    With --json the progress goes to stderr, the trainer is quiet, and stdout gets one JSON
    object: the runs (--dry-run) or the results and the fit.
    """
    from burrow.data.cache import check_cache
    from burrow.scaling.sweep import plan_sweep, run_sweep

    settings = sweep_settings(args)
    if args.dry_run:
        runs = plan_sweep(settings)
        print(json.dumps({"runs": [run.to_dict() for run in runs]}) if args.json
              else format_sweep_plan(runs))
        return 0
    check_writable_dir(args.out, "sweep directory", "choose another --out")  # before any run
    check_cache()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    result = run_sweep(settings, Path(args.out), force=args.force, verbose=not args.json,
                       log=log)
    if args.json:
        print(json.dumps(result))
    else:
        log(f"results: {Path(args.out) / 'results.csv'} ({len(result['results'])} runs)")
        for path in result["figures"]:
            log(f"figure: {path}")
        if "fit_error" in result:
            log(f"no fit of these runs: {result['fit_error']} (the runs are kept; burrow fit "
                f"{args.out} fits them again)")
    return 130 if result["interrupted"] else 0


def format_sweep_plan(runs: list) -> str:
    from burrow.scaling.sweep import cpu_peak_flops, estimate_seconds

    header = f"{'name':<24} {'N':>9} {'layers':>6} {'d_model':>7} {'D':>11} {'steps':>6} {'C':>9}"
    lines = [header]
    for run in runs:
        model = run.config.model
        lines.append(f"{run.name:<24} {run.params:>9,} {model.n_layers:>6} {model.d_model:>7} "
                     f"{run.tokens:>11,} {run.steps:>6} {run.flops:>9.3g}")
    peak = cpu_peak_flops(runs[0].config.train.device)
    if peak:
        lines.append(f"estimated time on this CPU: {format_duration(estimate_seconds(runs, peak))}")
    return "\n".join(lines)


def fit_command(args: argparse.Namespace) -> dict[str, Any]:
    """`burrow fit`: Chinchilla's three approaches on a sweep directory (approach 1 on its runs'
    training curves) or a table of runs (approach 1 on their final losses)."""
    from burrow.scaling.curves import sweep_curves
    from burrow.scaling.points import parse_columns
    from burrow.scaling.results import fit_and_plot

    path = Path(args.path)
    table = path / "results.csv" if path.is_dir() else path
    if path.is_dir() and not table.is_file():
        raise UserError(f"{path} is a directory without results.csv; give a sweep directory "
                        "or a CSV / JSON Lines file of runs")
    out = Path(args.out) if args.out else default_fit_dir(path)
    check_writable_dir(out, "fit directory", "choose another --out")
    result = fit_and_plot(table, out, bootstrap=args.bootstrap, seed=args.seed,
                          columns=parse_columns(args.columns or ""),
                          drop_highest=args.drop_highest, name=args.name,
                          curves=sweep_curves(path) if path.is_dir() else None,
                          smooth_steps=args.smooth_steps)
    if args.json and not args.out and not path.is_dir():  # the text report names it anyway
        print(f"burrow: note: wrote the fit to {out}/ (choose the place with --out)",
              file=sys.stderr)
    return result


def default_fit_dir(path: Path) -> Path:
    """Where `burrow fit PATH` writes without --out: a sweep directory holds its own fit; the fit
    of a table NAME.csv goes to fits/NAME here, never into the table's folder (which may be
    someone else's data)."""
    if path.is_dir():
        return path
    return Path("fits") / path.stem


def _interval(report: dict[str, Any], key: str) -> str:
    low_high = report["intervals"].get(key)
    return f" [{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else ""


def _optimal_points(fit: dict[str, Any]) -> str:
    """What approach 1 or 2's power laws went through."""
    envelope = fit.get("envelope")
    if envelope is None:
        return f"{len(fit['C'])} optimal points"
    return (f"{len(fit['C'])} of {envelope['grid_points']} FLOP values on the envelope of "
            f"{envelope['runs']} training curves, {envelope['sizes']} sizes, smoothed over "
            f"{envelope['smooth_steps']:g} steps: those after the smallest size's last win and "
            "before the largest's first")


def format_fit(result: dict[str, Any]) -> str:
    report = result["report"]
    lines = [f"runs      {report['source']}: {report['n_points']} runs"]
    names = {1: "envelope (§3.1)", 2: "IsoFLOP profiles (§3.2)"}
    for number in (1, 2):
        fit = report[f"approach{number}"]
        head = f"approach {number} {names[number]:<26}"
        if fit["skipped"]:
            lines.append(f"{head} skipped: {fit['skipped']}")
        else:
            lines.append(f"{head} a = {fit['a']:.3f}  b = {fit['b']:.3f}  "
                         f"({_optimal_points(fit)})")
    third = report["approach3"]
    level = (f" ({third['level']:.0%} bootstrap intervals over {third['resamples']} resamples)"
             if third["intervals"] else "")
    lines += [
        f"approach 3 {'parametric L(N, D) (§3.3)':<26} a = {third['a']:.3f}"
        f"{_interval(third, 'a')}  b = {third['b']:.3f}{_interval(third, 'b')}{level}",
        "          " + "  ".join(f"{key} = {third[key]:.4g}{_interval(third, key)}"
                                 for key in ("E", "A", "B", "alpha", "beta")),
        f"          Huber objective {third['objective']:.6g} (delta 1e-3, App. D.2); best of "
        f"{third['starts']:,} L-BFGS starts in {third['seconds']:.1f}s",
        f"wrote     {result['fit']}, {result['law']} (use it: burrow plan --law "
        f"{result['law']} --flops C)",
    ]
    lines += [f"figure    {path}" for path in result["figures"]]
    return "\n".join(lines)
