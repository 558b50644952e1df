"""What each CLI verb does, as plain functions that take parsed arguments and return results.

Each imports what it needs when it runs (torch, the trainer, the data pipeline), so that the
verbs that only do arithmetic start at once. Places a verb will write are checked before its
long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow import presets
from burrow.config import RunConfig, TrainConfig, override_dict
from burrow.errors import UserError
from burrow.paths import check_writable_dir

if TYPE_CHECKING:
    import torch


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
    return _with_train_flags(cfg, args), out


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


def _device(name: str) -> torch.device:
    from burrow.parallel import resolve_device

    return resolve_device(name)


def eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """Loss, perplexity, bits per byte, and gzip/xz bits per byte on the same bytes; for a RETRO
    run with --retro-db, the same with retrieval and without and bpb(alpha) (eval/retro.py)."""
    from burrow.data import (
        TokenDataset,
        Tokenizer,
        prepare_data,
        resolve_source,
        tokenize_source,
    )
    from burrow.eval import compressor_bits_per_byte, evaluate, split_text
    from burrow.run import load_run, prepared_data_of

    device = _device(args.device)
    model, tokenizer, cfg = load_run(args.run, device=device)
    retro_db = getattr(args, "retro_db", None)
    if retro_db is None and any(getattr(args, name, None) is not None
                                for name in ("k", "baseline", "plot")):
        raise UserError("--k, --baseline and --plot need --retro-db DB")
    if retro_db is not None:
        plot, baseline = _check_retro_eval(args, cfg, tokenizer, device)
    elif cfg.model.retro is not None:
        print(f"burrow: note: {args.run} is a RETRO model; evaluating it without retrieval "
              "(pass --retro-db DB to evaluate with its neighbours)", file=sys.stderr)
    if args.data:
        dataset, described = tokenize_source(resolve_source(args.data), tokenizer,
                                             text_field=args.text_field or cfg.data.text_field
                                             ), args.data
    else:
        prepared = (prepared_data_of(Path(args.run))
                    or prepare_data(cfg, progress=False, run_dir=Path(args.run)))
        if Tokenizer.load(prepared).fingerprint != tokenizer.fingerprint:
            raise UserError(f"the held-out data of {args.run} was prepared with another "
                            "tokenizer than the run's; evaluate with --data SOURCE instead")
        dataset, described = TokenDataset(prepared, "val"), "held-out split"
    # The exact bytes the evaluated tokens spell: the model's and the compressors' denominator.
    predicted = max(0, dataset.num_tokens - 1)
    if args.max_tokens is not None:
        predicted = min(predicted, args.max_tokens)
    text = split_text(dataset, tokenizer, max_tokens=predicted + 1)
    if retro_db is None:
        result = evaluate(model, dataset, seq_len=cfg.train.seq_len, batch_size=args.batch_size,
                          device=device, max_tokens=args.max_tokens, num_bytes=len(text))
        return {**result, **compressor_bits_per_byte(text), "data": described}
    from burrow.eval.leakage import plot_filtered
    from burrow.eval.retro import evaluate_retro
    from burrow.train.retrieval import Retrieval

    retro_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, retro_db=str(Path(retro_db).expanduser().resolve())))
    retrieval = Retrieval(retro_cfg, dataset.directory, splits=[dataset.split], progress=False)
    k = args.k or cfg.model.retro.neighbours
    result = evaluate_retro(model, dataset, tokenizer, retrieval, dataset.split,
                            seq_len=cfg.train.seq_len, k=k, batch_size=args.batch_size,
                            device=device, max_tokens=args.max_tokens, num_bytes=len(text),
                            baseline=None if baseline is None else baseline[1:])
    curves = {f"{Path(args.run).name} (RETRO, k={k})": result["filtered"],
              f"{Path(args.run).name} without retrieval": result["filtered_no_retrieval"]}
    if baseline is not None:
        result["baseline"] = {"run": str(baseline[0]), **result["baseline"]}
        curves[f"{baseline[0].name} (baseline)"] = result["baseline"]["filtered"]
    # written last, so that an evaluation that fails leaves the run directory as it was
    result["plot"] = None if plot is None else str(plot_filtered(curves, plot))
    return {**result, **compressor_bits_per_byte(text), "data": described}


def _check_retro_eval(args: argparse.Namespace, cfg: RunConfig, tokenizer: Any,
                      device: torch.device) -> tuple[Path | None, tuple[Path, Any, int] | None]:
    """Refuse, before any work, what `eval --retro-db` cannot do: a model without retrieval,
    a database that is missing, half built or made for another tokenizer or chunk size, more
    neighbours than are stored, a baseline with another tokenizer, a plot that cannot be
    written. Returns the plot's path (None: the run cannot be written, and no --plot) and
    (baseline run, model, seq_len) or None."""
    from burrow.retrieval import open_database
    from burrow.retrieval.neighbours import DEFAULT_K
    from burrow.run import load_run

    retro = cfg.model.retro
    if retro is None:
        raise UserError(f"{args.run} has no retrieval blocks (model.retro is unset); evaluate "
                        "it without --retro-db")
    db = open_database(args.retro_db)
    if db.manifest["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise UserError(f"{db.path} was built with another tokenizer than {args.run}'s; build "
                        f"one with the run's (`burrow retro build --tokenizer {args.run}`)")
    if db.chunk_tokens != retro.chunk_size:
        raise UserError(f"{db.path} holds chunks of {db.chunk_tokens} tokens but {args.run} "
                        f"reads chunks of {retro.chunk_size}; use a database of "
                        f"{retro.chunk_size}-token chunks")
    stored = max(DEFAULT_K, retro.neighbours)
    if args.k is not None and args.k > stored:
        raise UserError(f"--k {args.k} asks for more neighbours than the {stored} stored per "
                        f"chunk; pass --k {stored} or fewer")
    baseline = None
    if args.baseline:
        dense, dense_tokenizer, dense_cfg = load_run(args.baseline, device=device)
        if dense_tokenizer.fingerprint != tokenizer.fingerprint:
            raise UserError(f"the baseline {args.baseline} has another tokenizer than "
                            f"{args.run}; compare runs trained with the same tokenizer")
        baseline = (Path(args.baseline), dense, dense_cfg.train.seq_len)
    if args.plot:
        check_writable_dir(Path(args.plot).parent, "plot directory", "pass --plot PATH "
                           "elsewhere")
        return Path(args.plot), baseline
    try:
        check_writable_dir(args.run, "run directory", "pass --plot PATH")
    except UserError:  # a read-only run is still evaluated
        print(f"burrow: note: {args.run} cannot be written; no plot (pass --plot PATH)",
              file=sys.stderr)
        return None, baseline
    return Path(args.run) / "filtered_bpb.png", baseline


def format_eval(result: dict[str, Any]) -> str:
    text = (f"{result['data']}: {result['tokens']:,} tokens, {result['bytes']:,} bytes\n"
            f"loss        {result['loss']:.4f} nats/token\n"
            f"perplexity  {result['perplexity']:.2f}\n"
            f"bits/byte   {result['bits_per_byte']:.3f}   (gzip -9: "
            f"{result['gzip_bits_per_byte']:.3f}, xz -9e: {result['xz_bits_per_byte']:.3f})")
    if "filtered" not in result:
        return text
    from burrow.eval.retro import format_retro

    return f"{text}\n{format_retro(result)}"


# Printed between the samples of `burrow generate --num-samples N`.
SAMPLE_SEPARATOR = "\n" + "-" * 40 + "\n"


def generate_command(args: argparse.Namespace) -> str:
    """The prompt and its continuation, or --num-samples of them generated as one batch.
    Generation starts after a document separator; tokens/s go to stderr. With --retro-db a
    RETRO run retrieves at each chunk boundary, and --show-sources prints after each sample
    where the neighbours each chunk was sampled with came from."""
    import torch

    from burrow.infer import generate
    from burrow.run import load_run

    device = _device(args.device)
    model, tokenizer, cfg = load_run(args.run, device=device)
    retriever = _retriever(args, cfg, tokenizer)
    ids = [tokenizer.eos_id, *tokenizer.encode(args.prompt)]
    context = cfg.model.max_seq_len
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids) - 1} tokens; the model's context is {context} "
                        "tokens: shorten the prompt")
    new_tokens = args.max_new_tokens
    if len(ids) + new_tokens > context:
        new_tokens = context - len(ids)
        print(f"burrow: note: generating {new_tokens} tokens, all that fit in the context of "
              f"{context}", file=sys.stderr)
    start = time.perf_counter()
    out = generate(model, torch.tensor([ids] * args.num_samples, device=device), new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, eos_id=tokenizer.eos_id, compile=args.compile,
                   retrieve=retriever, return_sources=retriever is not None)
    out, sources = out if retriever is not None else (out, None)
    seconds = time.perf_counter() - start
    generated = int((out[:, len(ids):] != tokenizer.eos_id).sum())
    print(f"burrow: {generated} tokens in {seconds:.2f} s ({generated / seconds:,.0f} tokens/s"
          f"{', compilation included' if args.compile else ''})", file=sys.stderr)
    samples = []
    for row, tokens in enumerate(out.tolist()):
        text = tokenizer.decode([i for i in tokens[1:] if i != tokenizer.eos_id])
        if args.show_sources:
            text += "\n\n" + format_sources(tokens, len(ids), cfg.model.retro.chunk_size,
                                             [chunk[row] for chunk in sources], tokenizer)
        samples.append(text)
    return SAMPLE_SEPARATOR.join(samples)


def _retriever(args: argparse.Namespace, cfg: RunConfig, tokenizer: Any) -> Any:
    """The retrieve callable of `burrow generate --retro-db`, or None; UserError for a
    database that does not fit the run, a note for a RETRO run generating without one."""
    if args.retro_db is None:
        if args.k is not None or args.show_sources:
            flag = "--k" if args.k is not None else "--show-sources"
            raise UserError(f"{flag} needs --retro-db DB, the database to retrieve from")
        if cfg.model.retro is not None:
            print(f"burrow: note: {args.run} is a RETRO model generating without retrieval "
                  "(chunked cross-attention adds nothing); pass --retro-db DB to retrieve",
                  file=sys.stderr)
        return None
    if cfg.model.retro is None:
        raise UserError(f"{args.run} has no retrieval blocks (model.retro is unset): drop "
                        "--retro-db, or generate with a RETRO run")
    if args.compile:
        raise UserError("--compile does not retrieve yet: drop --compile to generate with "
                        "--retro-db")
    from burrow.retrieval import ChunkRetriever, check_database_fits, open_database

    db = open_database(args.retro_db)
    check_database_fits(db, cfg.model.retro, tokenizer, what=str(args.run))
    return ChunkRetriever(db, tokenizer, args.k or cfg.model.retro.neighbours)


def format_sources(tokens: list[int], prompt: int, m: int, sources: list[list[dict[str, Any]]],
                   tokenizer: Any) -> str:
    """Where the neighbours each chunk of generated text was sampled with came from.

    tokens: one sample, the document separator first, then the prompt and the generated text;
    prompt: how many of them are not generated; sources[u]: chunk u's neighbours. Chunk v is
    tokens v*m ... v*m + m - 1; each of its tokens was predicted at the position before it,
    which attends to the neighbours of chunk v - 1 (RETRO's m - 1 shift), so those are the
    neighbours listed for chunk v.
    """
    lines = [f"sources: the tokens of chunk v (sequence tokens v*{m} ... v*{m} + {m - 1}, "
             "counted from the document separator before the prompt) were sampled attending "
             "to the neighbours retrieved for chunk v - 1"]
    for v in range(prompt // m, -(-len(tokens) // m)):
        first, last = max(v * m, prompt), min((v + 1) * m, len(tokens)) - 1
        text = tokenizer.decode([i for i in tokens[first:last + 1] if i != tokenizer.eos_id])
        lines.append(f"chunk {v} (generated tokens {first}-{last}: {_snippet(text)})")
        if v == 0:
            lines.append("  no neighbours: no chunk before it")
            continue
        lines += [f"  #{rank} {found['source']} at token {found['offset']:,}  "
                  f"distance {found['distance']:.3f}"
                  for rank, found in enumerate(sources[v - 1], start=1)]
    return "\n".join(lines)


def _snippet(text: str, width: int = 40) -> str:
    """The start of a text as one quoted line."""
    return repr(text if len(text) <= width else text[:width] + "...")


def presets_command(args: argparse.Namespace) -> dict[str, Any]:
    return {"presets": presets.table_rows(seq_len=args.seq_len)}


def _short_source(source: str) -> str:
    """'Rae et al. 2021, Scaling ... (Gopher), Table 1' -> 'Rae et al. 2021, Table 1'."""
    parts = [part.strip() for part in source.split(",")]
    return f"{parts[0]}, {parts[-1]}" if len(parts) > 2 else source


def format_presets(result: dict[str, Any]) -> str:
    from burrow.units import format_count

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
