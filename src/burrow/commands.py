"""What each CLI verb does, as plain functions that take parsed arguments and return results
(`eval` and `generate`, which read a trained run, are in burrow/run_commands.py).

Each imports what it needs when it runs (torch, the trainer, the data pipeline), so that the
verbs that only do arithmetic start at once. Places a verb will write are checked before its
long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from burrow import presets
from burrow.config import RunConfig, TrainConfig, override_dict
from burrow.errors import UserError
from burrow.paths import check_writable_dir


def run_dir_of(args: argparse.Namespace) -> Path:
    """The run directory `burrow train` writes: --out, or runs/PRESET."""
    return Path(args.out) if args.out else Path("runs") / (args.preset or "nano")


def run_config_from_args(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run config that `burrow train` flags describe, and the run directory."""
    from burrow.data.sources import resolve_source

    out = run_dir_of(args)
    saved = out / "config.yaml"
    retro_fit = getattr(args, "retro_fit", None)
    if args.resume and saved.is_file():
        if retro_fit:
            raise UserError(f"--resume continues {out} as it was started; drop --retro-fit")
        if args.config:
            raise UserError(f"--resume continues {out} with its own config.yaml; drop "
                            "--config, and change fields with flags or --set")
        cfg = RunConfig.load(saved)
        if args.preset and args.preset != cfg.preset:
            raise UserError(f"{out} was trained with preset {cfg.preset}, not {args.preset}; "
                            "drop --preset to resume it")
    elif retro_fit:
        from burrow.train.retrofit import retrofit_config

        if args.preset or args.config:
            raise UserError("--retro-fit RUN takes RUN's model; drop --preset and --config")
        cfg = retrofit_config(retro_fit)
    elif args.config:
        cfg = RunConfig.load(Path(args.config), partial=True)
        if args.preset:
            cfg.model, cfg.preset = presets.get(args.preset), args.preset
    else:
        name = args.preset or "nano"
        cfg = RunConfig(model=presets.get(name), preset=name)
    if args.data:
        cfg.data = dataclasses.replace(cfg.data, source=resolve_source(args.data))
    if args.text_field is not None:
        cfg.data = dataclasses.replace(cfg.data, text_field=args.text_field)
    if getattr(args, "retro_db", None) is not None:
        cfg.data = dataclasses.replace(cfg.data,
                                       retro_db=str(Path(args.retro_db).expanduser().resolve()))
    cfg = _with_train_flags(cfg, args)
    if getattr(args, "recipe", None):
        if args.resume and saved.is_file():
            raise UserError(f"--resume continues {out} with the recipe it was started with "
                            f"({cfg.recipe or 'none'}); drop --recipe")
        cfg = with_recipe(cfg, args)
    return cfg, out


def explicit_fields(args: argparse.Namespace) -> frozenset[str]:
    """The TrainConfig fields given as flags or --set train.X, and the --set model.X keys (as
    "model.X"): what a recipe leaves to the command line."""
    given = {field.name for field in dataclasses.fields(TrainConfig)
             if getattr(args, f"train_{field.name}", None) is not None}
    for item in args.set:
        key = item.partition("=")[0].strip()
        if key.startswith("train."):
            given.add(key.removeprefix("train."))
        elif key.startswith("model."):
            given.add(key)
    return frozenset(given)


def with_recipe(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """`cfg` with the paper's recipe --recipe names, scaled to the run (burrow/recipes.py);
    what it scaled goes to stderr."""
    from burrow import recipes
    from burrow.parallel.runtime import resolve_device

    recipe = recipes.get(args.recipe, cfg.model.num_params())
    train = cfg.train
    granularity = train.micro_batch_size * train.seq_len
    scaled = recipes.scale(recipe, batch_tokens=train.batch_tokens, max_steps=train.max_steps,
                           granularity=granularity, keep=explicit_fields(args),
                           device_type=resolve_device(train.device).type,
                           sharded=(train.parallel == "fsdp" or train.tensor_parallel > 1
                                    or train.pipeline_parallel > 1))
    raw = cfg.to_dict()
    raw["train"].update(scaled.train)
    recipes.apply_model_fields(raw["model"], scaled.model)
    raw["recipe"] = recipe.name
    result = RunConfig.from_dict(raw)
    for line in scaled.lines:
        print(f"burrow: {line}", file=sys.stderr)
    return result


def check_places(run_dir: Path, fix: str) -> None:
    """Refuse, before any long work, a run directory that cannot be written and a cache that
    cannot be a directory (one that cannot be written is refused when it must be written)."""
    from burrow.data.cache import check_cache

    check_writable_dir(run_dir, "run directory", fix)
    check_cache()


def _with_train_flags(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """`cfg` with the TrainConfig flags and the --set overrides applied, then validated (once:
    `--seq-len 512 --set model.max_seq_len=512` is valid only with both in)."""
    raw = cfg.to_dict()
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, f"train_{field.name}")
        if value is not None:
            raw["train"][field.name] = value
    return RunConfig.from_dict(override_dict(raw, args.set))


def train_command(args: argparse.Namespace) -> int:
    from burrow.train import train

    check_places(run_dir_of(args), "choose another --out")
    cfg, out = run_config_from_args(args)
    if args.plan:
        from burrow.parallel.planner import Plan
        from burrow.parallel.planner.executable import apply_plan
        from burrow.parallel.runtime import launched_world_size

        cfg = apply_plan(cfg, Plan.load(args.plan), launched_world_size())
    summary = train(cfg, out, resume=args.resume, allow_data_change=args.allow_data_change)
    return 0 if not summary["interrupted"] else 130


def distill_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config that `burrow distill` flags describe; notes go to stderr."""
    from burrow.train.distill import student_config

    saved, notes = Path(args.out) / "config.yaml", []
    if args.resume and saved.is_file():
        cfg = RunConfig.load(saved)
        if cfg.distill is None:
            raise UserError(f"{args.out} is not a distillation run; continue it with `burrow "
                            f"train --out {args.out} --resume`")
        if args.student and args.student != cfg.preset:
            raise UserError(f"{args.out} distils into {cfg.preset}, not {args.student}; drop "
                            "--student to resume it")
        if args.teacher and Path(args.teacher).resolve() != Path(cfg.distill.teacher):
            raise UserError(f"{args.out} is taught by {cfg.distill.teacher}, not "
                            f"{args.teacher}; drop --teacher to resume it")
    elif not (args.teacher and args.student):
        raise UserError("burrow distill needs --teacher RUN and --student PRESET (or --resume "
                        "in a distillation run)")
    else:
        cfg, notes = student_config(Path(args.teacher), args.student)
    weights = {name: getattr(args, name) for name in ("label_weight", "teacher_weight")
               if getattr(args, name) is not None}
    cfg.distill = dataclasses.replace(cfg.distill, **weights)
    cfg = _with_train_flags(cfg, args)
    for note in notes:
        print(f"burrow: note: {note}", file=sys.stderr)
    return cfg


def distill_command(args: argparse.Namespace) -> int:
    """`burrow distill`: train a dense student on a teacher, then report the gain it kept.

    With --json the trainer is quiet and stdout gets one JSON object: the report.
    """
    from burrow.train.distill import distill, format_distill

    check_places(Path(args.out), "choose another --out")
    cfg = distill_config_from_args(args)
    report = distill(cfg, Path(args.out), resume=args.resume,
                     baseline=Path(args.baseline) if args.baseline else None,
                     verbose=not args.json)
    if report is None:  # stopped by a signal, with a checkpoint to resume from
        return 130
    print(json.dumps(report) if args.json else format_distill(report))
    return 0


def presets_command(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "recipes", False):
        from burrow import recipes

        return {"recipes": recipes.table_rows()}
    return {"presets": presets.table_rows(seq_len=args.seq_len)}


def _short_source(source: str) -> str:
    """'Rae et al. 2021, Scaling ... (Gopher), Table 1' -> 'Rae et al. 2021, Table 1'."""
    parts = [part.strip() for part in source.split(",")]
    return f"{parts[0]}, {parts[-1]}" if len(parts) > 2 else source


def format_presets(result: dict[str, Any]) -> str:
    from burrow.units import format_count

    if "recipes" in result:
        return format_recipes(result["recipes"])
    header = (f"{'name':<16} {'params':>9} {'active':>9} {'non-emb':>9} {'FLOPs/token':>12} "
              f"{'published':>10}  source")
    lines = [header, "-" * len(header)]
    for row in result["presets"]:
        published = format_count(row.get("published_params"))
        lines.append(f"{row['name']:<16} {format_count(row['params']):>9} "
                     f"{format_count(row['active_params']):>9} "
                     f"{format_count(row['non_embedding_params']):>9} "
                     f"{row['flops_per_token']:>12.3g} {published:>10}"
                     f"  {_short_source(row.get('source') or '')}")
    return "\n".join(lines)


def format_recipes(rows: list[dict[str, Any]]) -> str:
    header = (f"{'recipe':<15} {'optimizer':<9} {'lr':>8} {'schedule':<8} {'warmup':>7} "
              f"{'decay':>6} {'clip':>5} {'batch (tokens)':<26} {'steps':>9}  source")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['name']:<15} {row['optimizer']:<9} {row['lr']:>8.2g} "
                     f"{row['schedule']:<8} {row['warmup_steps']:>7,} {row['weight_decay']:>6} "
                     f"{row['grad_clip']:>5g} {row['batch']:<26} {row['steps']:>9,}  "
                     f"{row['source'].split(' (')[0]}")
    lines.append("applied with `burrow train --recipe NAME`: rates kept, steps and batches "
                 "scaled to the run (docs/recipes.md)")
    return "\n".join(lines)


def prepare_command(args: argparse.Namespace) -> dict[str, Any]:
    from burrow.data import TokenDataset, prepare, resolve_source

    if args.out:
        check_writable_dir(args.out, "prepared directory", "choose another --out")
    prepared = prepare(resolve_source(args.data), vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, text_field=args.text_field,
                       model_type=args.tokenizer_type,
                       out_dir=Path(args.out) if args.out else None, progress=not args.json)
    result: dict[str, Any] = {"prepared": str(prepared), "vocab_size": args.vocab_size}
    for split in ("train", "val"):
        dataset = TokenDataset(prepared, split)
        result[split] = {"tokens": dataset.num_tokens, "bytes": dataset.num_bytes,
                         "documents": dataset.num_documents}
    return result


def format_prepare(result: dict[str, Any]) -> str:
    lines = [f"prepared: {result['prepared']}"]
    for split in ("train", "val"):
        part = result[split]
        lines.append(f"{split:<5} {part['documents']:>7,} documents {part['tokens']:>12,} tokens "
                     f"{part['bytes']:>13,} bytes ({part['bytes'] / max(1, part['tokens']):.2f} "
                     "bytes/token)")
    return "\n".join(lines)


def tokenizer_command(args: argparse.Namespace) -> str:
    from burrow.data import resolve_source, train_tokenizer

    check_writable_dir(args.out, "tokenizer directory", "choose another --out")
    path = train_tokenizer(resolve_source(args.data), vocab_size=args.vocab_size,
                           out_dir=Path(args.out), val_fraction=args.val_fraction,
                           text_field=args.text_field, model_type=args.tokenizer_type)
    return f"tokenizer: {path}"


def export_hf_command(args: argparse.Namespace) -> str:
    from burrow.interop import export_hf

    check_writable_dir(args.out, "export directory", "choose another OUT")
    out = export_hf(args.run, args.out)
    return (f"exported {args.run} to {out}: load it with "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def import_hf_command(args: argparse.Namespace) -> str:
    from burrow.interop import import_hf

    check_writable_dir(args.out, "run directory", "choose another OUT")
    out = import_hf(args.dir, args.out)
    return (f"imported {args.dir} to {out}: try `burrow generate {out}`, or fine-tune with "
            f"`burrow train --out {out} --resume --data SOURCE --max-steps N`")
