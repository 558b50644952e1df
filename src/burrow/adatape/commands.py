"""`burrow adatape parity`: train AdaTape, a Transformer and a Universal Transformer of matched
size on parity; report accuracy, parameters, tape length or ponder steps and FLOPs per example,
and write result.json with the accuracy and tape-length plots beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from burrow.adatape.settings import ParityConfig
from burrow.paths import check_writable_dir


def parse_models(text: str) -> list[str]:
    """'adatape,transformer' -> ['adatape', 'transformer'] (ParityConfig checks the names)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def config_from_args(args: argparse.Namespace) -> ParityConfig:
    """The ParityConfig the flags describe, checked before anything is built."""
    return ParityConfig(length=args.length, sampling=args.sampling, input=args.input,
                        eval_size=args.eval_size,
                        models=parse_models(args.models), steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        eval_every=args.eval_every, seed=args.seed, device=args.device,
                        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        bank=args.bank, threshold=args.threshold,
                        max_tape_len=args.max_tape_len, top_k=args.top_k,
                        bank_size=args.bank_size).validate()


def _progress(cfg: ParityConfig):
    """A line per evaluation on stderr: model, step/total, training loss, held-out accuracy,
    tape length or ponder steps, examples/s and the model's ETA."""

    def log(name: str, entry: dict) -> None:
        step = entry["step"]
        eta = entry["seconds"] / step * (cfg.steps - step)
        extra = "".join(f" {key.removeprefix('mean_').replace('_', ' ')} {entry[key]:.2f}"
                        for key in ("mean_tape_length", "mean_ponder_steps") if key in entry)
        print(f"{name} step {step}/{cfg.steps} loss {entry['loss']:.4f} acc "
              f"{100 * entry['accuracy']:.1f}%{extra} | {entry['examples_per_second']:.0f} "
              f"examples/s, eta {eta:.0f}s", file=sys.stderr, flush=True)

    return log


def parity_command(args: argparse.Namespace) -> dict:
    """Train and measure the models, write result.json and the plots to --out."""
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/adatape-parity-{cfg.length}")
    check_writable_dir(out, "output directory", "choose another --out")
    from burrow.adatape import train

    widths = train.widths(cfg)
    sizes = train.param_counts(cfg, widths)
    print("parameters: " + ", ".join(f"{name} {sizes[name]:,} (d_model {widths[name]})"
                                     for name in widths), file=sys.stderr, flush=True)
    started = time.perf_counter()
    runs, models, held_out = train.compare(cfg, widths, log=_progress(cfg))
    result: dict = {"task": {"length": cfg.length, "sampling": cfg.sampling,
                             "eval_size": cfg.eval_size}}
    for name, run in runs.items():
        result[name] = train.report(name, run, models[name], cfg)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = _plots(runs, held_out[0], cfg, out)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["config"] = cfg.describe()
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _plots(runs: dict, held_out_tokens, cfg: ParityConfig, out: Path) -> dict[str, str]:
    """accuracy.png, and tape_length.png where AdaTape ran; their paths."""
    from burrow.adatape import parity
    from burrow.adatape.plot import plot_accuracy, plot_tape_lengths

    plot_accuracy({name: run.history for name, run in runs.items()}, out / "accuracy.png",
                  f"parity, length {cfg.length}: held-out accuracy")
    plots = {"accuracy": str(out / "accuracy.png")}
    if "adatape" in runs:
        plot_tape_lengths(runs["adatape"].final.tape_lengths,
                          {"number of +1s": parity.plus_ones(held_out_tokens),
                           "number of non-zeros": parity.non_zeros(held_out_tokens)},
                          out / "tape_length.png")
        plots["tape_length"] = str(out / "tape_length.png")
    return plots


def format_parity(result: dict) -> str:
    """A table of the models, and where the plots are."""
    rows = [("model", "accuracy", "params", "d_model", "tape/ponder", "GFLOPs/example")]
    for name in ("adatape", "transformer", "universal_transformer"):
        if name not in result:
            continue
        entry = result[name]
        adaptive = entry.get("mean_tape_length", entry.get("mean_ponder_steps"))
        rows.append((name, f"{100 * entry['accuracy']:.1f}%", f"{entry['params']:,}",
                     str(entry["d_model"]), "-" if adaptive is None else f"{adaptive:.2f}",
                     f"{entry['flops_per_example'] / 1e9:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    task = result["task"]
    lines.insert(0, f"parity, length {task['length']} ({task['sampling']}), "
                    f"{task['eval_size']} held-out sequences, {result['seconds']:.0f}s")
    lines.append("plots: " + ", ".join(result["plots"].values()))
    return "\n".join(lines)
