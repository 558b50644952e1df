"""The verbs that read a trained run: `eval` and `generate`, as plain functions that take parsed
arguments and return results (burrow/commands.py has the others).

Each imports what it needs when it runs (torch, the model, the database), so that `--help` starts
at once. Bad input is refused before any work, and nothing in the run directory changes unless
everything succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow.config import RunConfig
from burrow.errors import UserError
from burrow.paths import check_writable_dir

if TYPE_CHECKING:
    import torch


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
    if getattr(args, "tasks", None) is not None:
        return tasks_command(args)
    if getattr(args, "num_fewshot", None) is not None or getattr(args, "limit", None) or (
            getattr(args, "include_path", None)):
        raise UserError("--num-fewshot, --limit and --include-path need --tasks TASKS")
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
              f"{Path(args.run).name} without retrieval": result["filtered_no_retrieval"],
              f"{Path(args.run).name} with other chunks' neighbours":
                  result["filtered_random_neighbours"]}
    if baseline is not None:
        result["baseline"] = {"run": str(baseline[0]), **result["baseline"]}
        curves[f"{baseline[0].name} (baseline)"] = result["baseline"]["filtered"]
    # written last, so that an evaluation that fails leaves the run directory as it was
    result["plot"] = None if plot is None else str(plot_filtered(curves, plot))
    return {**result, **compressor_bits_per_byte(text), "data": described}


def tasks_command(args: argparse.Namespace) -> dict[str, Any]:
    """`burrow eval RUN --tasks ...`: the harness's results object for the run's model on the
    tasks (eval/tasks.py), with --num-fewshot, --limit and --include-path passed through; a
    RETRO run with --retro-db DB retrieves from DB (--k neighbours per chunk)."""
    from burrow.eval.tasks import evaluate_tasks, parse_tasks, require_harness

    require_harness()
    tasks = parse_tasks(args.tasks)
    for flag in ("data", "max_tokens", "baseline", "plot"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag.replace('_', '-')} does not apply to --tasks: the tasks "
                            "bring their own data")
    retro_db, k = getattr(args, "retro_db", None), getattr(args, "k", None)
    if k is not None and retro_db is None:
        raise UserError("--k needs --retro-db DB, the database to retrieve from")
    from burrow.eval.harness import BurrowLM

    lm = BurrowLM(args.run, device=args.device, batch_size=args.batch_size, retro_db=retro_db,
                  retro_k=k)
    if lm.cfg.retro is not None and lm.retriever is None:
        print(f"burrow: note: {args.run} is a RETRO model; the tasks are evaluated without "
              "retrieval (pass --retro-db DB to evaluate with its neighbours)", file=sys.stderr)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    return evaluate_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit,
                          include_paths=args.include_path)


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
    if "results" in result:  # --tasks: the harness's results object
        from burrow.eval.tasks import format_results

        return format_results(result)
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
    from burrow.retrieval import run_retriever

    return run_retriever(args.retro_db, cfg.model.retro, tokenizer, args.k, what=str(args.run))


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
