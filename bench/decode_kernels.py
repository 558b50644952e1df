"""Decoding kernels on a CPU: one decode step's matrix-vector products, kernel by kernel.

Every weight matrix of a decode step (a 16-token model's q, k, v, o, gate, up and down of each
layer, and the output layer) multiplied by one row, in turn, so that the weights come from
memory as they do when decoding. The rival is PyTorch's default float32 kernel (`F.linear`);
against it, in alternating rounds: burrow's blocked reads (`infer/matvec.py`), and the same
weights in bfloat16 (through `F.linear` and as blocks) and in int8 with a float scale per row
through torch's weight-only int8 product (`torch.ops.aten._weight_int8pack_mm`). Prints one
JSON object: milliseconds per step and read GB/s of each, and each one's speed over the
default kernel's (median, min, max over pairs of rounds). This is how to check, on a new
machine, that the blocked reads pay, and whether reduced precision would.

    .venv/bin/python bench/decode_kernels.py                 # both shapes
    .venv/bin/python bench/decode_kernels.py --shape small   # small, 124m or all
    .venv/bin/python bench/decode_kernels.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from generate import QUICK_SHAPES, SHAPES
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

from burrow.infer.matvec import RowBlockLinear


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser("rounds", "threads", "quick", quick="tiny shapes, 2 rounds")])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="decode steps per round")
    if parser.parse_args().quick:
        parser.set_defaults(rounds=2, steps=2)
    return parser.parse_args()


def step_weights(shape: dict[str, int]) -> list[torch.Tensor]:
    """The (out, in) matrices one decode step reads, in order: per layer q, k, v, o, gate, up,
    down, then the output layer."""
    d, ff, vocab = shape["d_model"], shape["d_ff"], shape["vocab_size"]
    per_layer = [(d, d)] * 4 + [(ff, d)] * 2 + [(d, ff)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(rows, columns, generator=generator) / columns**0.5
            for rows, columns in per_layer * shape["n_layers"] + [(vocab, d)]]


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float scale per output row."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


def kernels(weights: list[torch.Tensor]) -> dict[str, Callable[[torch.Tensor], list]]:
    """Each kernel: a function of the input rows by width that runs every product once."""
    blocked = [RowBlockLinear(w) for w in weights]
    half = [w.to(torch.bfloat16) for w in weights]
    half_blocked = [RowBlockLinear(w) for w in half]
    quantised = [int8_rows(w) for w in weights]
    return {
        "float32, F.linear": lambda x: [F.linear(x[w.shape[1]], w) for w in weights],
        "float32, blocks": lambda x: [layer(x[layer.in_features]) for layer in blocked],
        "bfloat16, F.linear": lambda x: [F.linear(x[w.shape[1]].bfloat16(), w) for w in half],
        "bfloat16, blocks": lambda x: [layer(x[layer.in_features].bfloat16())
                                       for layer in half_blocked],
        "int8, per-row scales, _weight_int8pack_mm": lambda x: [
            torch.ops.aten._weight_int8pack_mm(x[q.shape[1]], q, scale)
            for q, scale in quantised],
    }


def bench_shape(name: str, shape: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    weights = step_weights(shape)
    rows = {width: torch.randn(1, width) for width in {w.shape[1] for w in weights}}
    candidates = kernels(weights)
    baseline_name = "float32, F.linear"
    baseline = candidates.pop(baseline_name)
    reference = torch.cat(baseline(rows), dim=1)
    float32_bytes = sum(w.numel() * 4 for w in weights)

    def rate_of(kernel: Callable) -> Callable[[], float]:
        def round_() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                kernel(rows)
            return args.steps / (time.perf_counter() - start)  # steps per second
        return round_

    def entry(steps_per_second: list[float], read_bytes: int) -> dict[str, float]:
        median = summary(steps_per_second)["median"]
        return {"ms_per_step": 1e3 / median, "read_gb_per_s": read_bytes * median / 1e9}

    log(f"decode kernels {name}: {len(weights)} matrices, {float32_bytes / 1e6:.1f} MB float32")
    results: dict[str, Any] = {}
    baseline_rates: list[float] = []  # every round of the default kernel, over all pairings
    for kernel_name, kernel in candidates.items():
        element_bytes = {"float32": 4, "bfloat16": 2, "int8": 1}[kernel_name.split(",")[0]]
        log(f" {kernel_name} against {baseline_name}")
        paired = paired_rounds(rate_of(kernel), rate_of(baseline), args.rounds)
        baseline_rates += paired.theirs
        error = (torch.cat(kernel(rows), dim=1).float() - reference).abs().max()
        results[kernel_name] = {**entry(paired.ours, float32_bytes // 4 * element_bytes),
                                "speed_over_default": summary(paired.ratios()),
                                "max_abs_difference_from_default": float(error)}
    results[baseline_name] = entry(baseline_rates, float32_bytes)
    return {"shape": name, "matrices": len(weights), "float32_bytes": float32_bytes,
            "kernels": results}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    warn_if_busy()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = list(shapes) if args.shape == "all" else [args.shape]
    emit({"benchmark": "decode_kernels", "machine": machine(torch.device("cpu")),
          "settings": {"rounds": args.rounds, "steps": args.steps, "quick": args.quick},
          "results": [bench_shape(name, shapes[name], args) for name in names]})


if __name__ == "__main__":
    run_main(main)
