"""`burrow ff DATASET`: train a Forward-Forward net (or its backprop baseline), report the test
error, and write the result and a plot of goodness beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from burrow.errors import UserError
from burrow.ff.data import DATASETS
from burrow.paths import check_writable_dir


def parse_layers(text: str) -> list[int]:
    """'2000,2000' -> [2000, 2000]; UserError for an empty list or a width that is not positive."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise UserError("--layers is empty; give hidden widths like --layers 2000,2000")
    try:
        widths = [int(part) for part in parts]
    except ValueError:
        raise UserError(f"--layers {text!r} is not a list of whole numbers; give widths like "
                        "--layers 2000,2000") from None
    if any(width < 1 for width in widths):
        raise UserError(f"--layers {text!r} has a width below 1; give positive widths like "
                        "--layers 2000,2000")
    return widths


def config_from_args(args: argparse.Namespace):
    """The FFConfig the flags describe (checked before anything is loaded)."""
    from burrow.ff.train import FFConfig

    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}: burrow ff knows "
                        f"{', '.join(DATASETS)}; run e.g. `burrow ff mnist`")
    if args.unsupervised and args.backprop:
        raise UserError("--unsupervised and --backprop are different runs; give one of them")
    mode = "unsupervised" if args.unsupervised else "backprop" if args.backprop else "supervised"
    return FFConfig(mode=mode, layers=parse_layers(args.layers), epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, threshold=args.threshold,
                    seed=args.seed, device=args.device, train_limit=args.limit).validate()


def _progress(cfg, started: float):
    """A line per epoch on stderr: per-layer loss and mean goodness, time and ETA."""

    def log(entry) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / entry.epoch * (cfg.epochs - entry.epoch)
        losses = " ".join(f"{value:.4f}" for value in entry.losses)
        line = f"epoch {entry.epoch}/{cfg.epochs} loss {losses}"
        if entry.good_pos:
            line += " goodness +/- " + " ".join(
                f"{p:.1f}/{n:.1f}" for p, n in zip(entry.good_pos, entry.good_neg))
        print(f"{line} | {entry.seconds:.1f}s, eta {eta:.0f}s", file=sys.stderr, flush=True)

    return log


def ff_command(args: argparse.Namespace) -> dict:
    """Train, measure on the test set, write result.json (and goodness.png for FF) to --out."""
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/ff-{args.dataset}-{cfg.mode}")
    check_writable_dir(out, "output directory", "choose another --out")
    import torch

    from burrow.ff import data, train

    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = data.load(args.dataset)
    started = time.perf_counter()
    net, history = train.train(cfg, dataset, log=_progress(cfg, started))
    result = {"dataset": args.dataset, "mode": cfg.mode, "layers": cfg.layers,
              "epochs": cfg.epochs, "train_images": len(dataset.train.head(cfg.train_limit)
                                                       .labels),
              "test_images": len(dataset.test.labels),
              **train.evaluate(cfg, net, dataset),
              "final_losses": history[-1].losses,
              "seconds": round(time.perf_counter() - started, 2),
              "config": train.describe(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode != "backprop":
        from burrow.ff.plot import plot_goodness

        plot_goodness(*train.goodness_samples(cfg, net, dataset), cfg.thresholds(),
                      out / "goodness.png")
        result["plot"] = str(out / "goodness.png")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "history.jsonl").write_text("".join(json.dumps(vars(entry)) + "\n"
                                               for entry in history))
    return result


def format_ff(result: dict) -> str:
    """The result as a few lines of text."""
    lines = [f"{result['mode']} {'x'.join(map(str, result['layers']))} on {result['dataset']}: "
             f"{result['epochs']} epochs in {result['seconds']:.0f}s",
             f"test error {100 * result['test_error']:.2f}% on {result['test_images']} images"]
    if "test_error_readout" in result:
        lines[-1] += (" (largest goodness over the 10 labels); "
                      f"{100 * result['test_error_readout']:.2f}% by the linear read-out")
    if "plot" in result:
        lines.append(f"goodness distributions: {result['plot']}")
    return "\n".join(lines)
