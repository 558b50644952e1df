"""Held-out loss and bits per byte of groups of runs that differ only in their seed: each
group's mean, standard deviation and values, and the difference between groups' means.

    .venv/bin/python bench/seeds.py default=runs/switch-default-s0,runs/switch-default-s1 \
        paper=runs/switch-paper-s0,runs/switch-paper-s1 > bench/results/switch_init.json

Each run is evaluated on all of its held-out split, as `burrow eval RUN --json` does. A claim
that one setting beats another is only as good as the gap between the means against the
seeds' spread; the script prints both.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from harness import emit, log, run_main

from burrow.data import TokenDataset
from burrow.errors import UserError
from burrow.eval import evaluate, split_text
from burrow.run import load_run, prepared_data_of


def held_out(run: Path) -> dict[str, Any]:
    """The run's loss and bits per byte on all of its held-out split."""
    model, tokenizer, cfg = load_run(run)
    dataset = TokenDataset(prepared_data_of(run), "val")
    text = split_text(dataset, tokenizer)
    result = evaluate(model, dataset, seq_len=cfg.train.seq_len, num_bytes=len(text))
    log(f"{run}: loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
    return {"run": str(run), "seed": cfg.train.seed, "loss": result["loss"],
            "bits_per_byte": result["bits_per_byte"]}


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def group(spec: str) -> tuple[str, list[Path]]:
    """LABEL=RUN,RUN,... -> (label, runs)."""
    label, _, runs = spec.partition("=")
    if not label or not runs:
        raise UserError(f"a group is LABEL=RUN,RUN,...; got {spec!r}")
    return label, [Path(run) for run in runs.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", help="LABEL=RUN,RUN,... (runs of one setting)")
    args = parser.parse_args()
    result: dict[str, Any] = {"groups": {}}
    for label, runs in map(group, args.groups):
        rows = [held_out(run) for run in runs]
        result["groups"][label] = {
            "runs": rows, "loss": spread([row["loss"] for row in rows]),
            "bits_per_byte": spread([row["bits_per_byte"] for row in rows])}
    labels = list(result["groups"])
    first = result["groups"][labels[0]]["bits_per_byte"]["mean"]
    result["difference_from_first_bits_per_byte"] = {
        label: result["groups"][label]["bits_per_byte"]["mean"] - first for label in labels[1:]}
    for label in labels:
        bpb = result["groups"][label]["bits_per_byte"]
        log(f"{label}: {bpb['mean']:.4f} ± {bpb['std']:.4f} bits/byte over {len(bpb['values'])}")
    emit(result)


if __name__ == "__main__":
    run_main(main)
