"""Draw the speed ratios of every benchmark result as one bar chart.

Reads the JSON objects the benchmarks printed (bench/results/*.json by default) and writes
bench/results/ratios.png: one bar per benchmark, shape and mode, its height the median ratio
ours/HF, its error bar the min and max over pairs of rounds, a line at 1.0 (as fast as HF) and
each bar's target marked.

    .venv/bin/python bench/plot.py
    .venv/bin/python bench/plot.py --results bench/results/quick --out /tmp/ratios.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The files bench/run_all.sh writes, in its order.
ORDER = ["train_eager", "train_compile", "generate", "generate_compile"]


@dataclass
class Bar:
    """One result's ratio ours/HF: median, the spread over rounds, the target it should reach."""

    label: str
    median: float
    low: float
    high: float
    target: float | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=RESULTS_DIR,
                        help="directory of the benchmarks' JSON files")
    parser.add_argument("--out", default=None, help="PNG to write (default: RESULTS/ratios.png)")
    return parser.parse_args()


def result_files(results_dir: str) -> list[str]:
    """The JSON files of results_dir: run_all.sh's in its order, then any others by name."""
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    rank = {stem: i for i, stem in enumerate(ORDER)}
    return [path for _, path in sorted(zip(stems, paths),
                                       key=lambda pair: (rank.get(pair[0], len(ORDER)), pair[0]))]


def read_bars(results_dir: str) -> list[Bar]:
    """Every result against transformers in results_dir's JSON files, in file then entry order
    (other rivals, such as scipy in chinchilla_fit.json, have their own table)."""
    bars = []
    for path in result_files(results_dir):
        with open(path) as file:
            benchmark = json.load(file)
        for result in benchmark.get("results", []):
            if "hf" not in result:
                continue
            ratio = result["ratio"]
            bars.append(Bar(label=result["label"], median=ratio["median"], low=ratio["min"],
                            high=ratio["max"], target=result.get("target")))
    return bars


def draw(bars: list[Bar], out: str) -> None:
    """The bar chart of `bars`, saved to `out`."""
    figure, axes = plt.subplots(figsize=(1.6 * len(bars) + 2, 4.5))
    positions = range(len(bars))
    medians = [bar.median for bar in bars]
    spread = [[bar.median - bar.low for bar in bars], [bar.high - bar.median for bar in bars]]
    # green: target met, orange: not met, blue: no target
    colors = ["tab:blue" if bar.target is None else
              "tab:green" if bar.median >= bar.target else "tab:orange" for bar in bars]
    axes.bar(positions, medians, yerr=spread, capsize=6, width=0.6, color=colors)
    targets = [(x, bar.target) for x, bar in zip(positions, bars) if bar.target is not None]
    if targets:
        axes.scatter([x for x, _ in targets], [t for _, t in targets], marker="_", s=900,
                     linewidths=2.5, color="black", zorder=3, label="target")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="as fast as HF")
    for x, bar in zip(positions, bars):
        above = max(bar.high, bar.target or 0.0)  # clear of the error bar and the target
        axes.annotate(f"{bar.median:.2f}x", (x, above), textcoords="offset points",
                      xytext=(0, 4), ha="center", fontsize=9)
    axes.set_xticks(list(positions), [bar.label.replace(" compiled", "\ncompiled")
                                      for bar in bars])
    axes.set_ylabel("speed ratio burrow / transformers")
    axes.set_title("burrow vs Hugging Face Llama: median over rounds, min-max bars")
    axes.set_ylim(0, max([bar.high for bar in bars] + [t for _, t in targets]) * 1.15)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    out = args.out or os.path.join(args.results, "ratios.png")
    bars = read_bars(args.results)
    if not bars:
        print(f"error: no benchmark results (*.json) in {args.results}; run bench/run_all.sh",
              file=sys.stderr)
        raise SystemExit(2)
    draw(bars, out)
    print(f"wrote {out} ({len(bars)} bars)", file=sys.stderr)


if __name__ == "__main__":
    main()
