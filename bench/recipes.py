"""Runs trained under different recipes, side by side: held-out bits per byte and loss curves.

    .venv/bin/python bench/recipes.py runs/default runs/gopher runs/chinchilla runs/palm \
        --out docs/recipes_nano.png

Each RUN is a run directory trained on the same data (`burrow train ... --recipe NAME`); the
script evaluates each on all of its held-out split (as `burrow eval RUN --json` does), reads its
training curve from metrics.jsonl against tokens, and prints one JSON object: per run its recipe,
steps, training tokens, optimiser, peak rate, and held-out loss and bits per byte. The PNG draws
the training losses against tokens, so runs whose batches ramp compare at equal tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from harness import emit, log, run_main

from burrow import RunConfig, UserError
from burrow.data import TokenDataset
from burrow.eval import evaluate, split_text
from burrow.run import load_run, prepared_data_of


def describe(run: Path) -> dict:
    model, tokenizer, cfg = load_run(run)
    dataset = TokenDataset(prepared_data_of(run), "val")
    text = split_text(dataset, tokenizer)
    held_out = evaluate(model, dataset, seq_len=cfg.train.seq_len, num_bytes=len(text))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("split") == "train"]
    saved = RunConfig.load(run / "config.yaml")
    result = {"run": str(run), "recipe": saved.recipe or "burrow default",
              "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
              "optimizer": saved.train.optimizer, "lr": saved.train.lr,
              "schedule": saved.train.schedule, "batch_ramp": saved.train.batch_ramp,
              "loss": held_out["loss"], "bits_per_byte": held_out["bits_per_byte"],
              "curve": [(row["tokens"], row["loss"]) for row in train]}
    log(f"{run}: {result['recipe']}, {result['tokens']:,} tokens, "
        f"{result['bits_per_byte']:.4f} bits/byte")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("recipes.png"))
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend labels, one per run (default: the recipe)")
    parser.add_argument("--title", default="the same model and tokens under the papers' recipes")
    args = parser.parse_args()
    results = [describe(run) for run in args.runs]
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) != len(results):
            raise UserError(f"--labels gives {len(labels)} labels for {len(results)} runs")
        for result, label in zip(results, labels):
            result["label"] = label
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for result in results:
        tokens, losses = zip(*result["curve"])
        axis.plot([t / 1e6 for t in tokens], losses,
                  label=f"{result.get('label', result['recipe'])} "
                        f"({result['bits_per_byte']:.3f} bits/byte)")
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("training loss (nats per token)")
    axis.set_ylim(top=min(8.0, axis.get_ylim()[1]))
    axis.legend()
    axis.set_title(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    for result in results:
        del result["curve"]
    emit({"runs": results, "plot": str(args.out)})


if __name__ == "__main__":
    run_main(main)
