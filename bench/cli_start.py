"""How long `burrow` takes to start: wall-clock seconds of whole commands that do arithmetic
(help, presets, plan), each run as a fresh process, and what they import (`python -X importtime`).

    .venv/bin/python bench/cli_start.py                       # this checkout
    .venv/bin/python bench/cli_start.py --against 5913e20     # and an earlier revision, alternating

With --against, the revision's src/ is unpacked into a temporary folder and run with the same
interpreter, alternating with this checkout command by command (ours, theirs, ours, ...), so that
a change in the machine's load falls on both; the ratio is ours / theirs (below 1: we start
sooner). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import common_parser, emit, log, machine, run_main, summary, warn_if_busy

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"help": ["--help"], "presets": ["presets"], "plan": ["plan", "--flops", "1e21"],
            "train --help": ["train", "--help"]}
HEAVY = ("torch", "numpy", "matplotlib", "burrow.train.trainer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     parents=[common_parser("rounds", "quick")])
    parser.add_argument("--against", metavar="REV",
                        help="an earlier git revision to time alternately with this checkout")
    parser.set_defaults(rounds=7)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def unpack(revision: str, into: Path) -> Path:
    """The revision's src/ under `into`, from `git archive`."""
    archive = into / "src.tar"
    try:
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "src"],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"error: git archive {revision}: {error.stderr.strip()}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def seconds(src: Path, argv: list[str]) -> float:
    """Wall-clock seconds of one `python -m burrow ARGV` with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "burrow", *argv], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imports(src: Path, argv: list[str]) -> dict[str, Any]:
    """What one run imports, from `-X importtime`: the total, and which heavy modules."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "burrow", *argv],
                            env=env, capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in result.stderr.splitlines()
            if line.startswith("import time:") and "self [us]" not in line]
    # Each row: "import time: SELF | CUMULATIVE | name", in microseconds.
    modules = {row[2].strip(): int(row[0].split(":")[1]) for row in rows}
    return {"import_seconds": round(sum(modules.values()) / 1e6, 3),
            "heavy_imported": [name for name in HEAVY if name in modules]}


def main() -> None:
    args = parse_args()
    warn_if_busy()
    import torch

    result: dict[str, Any] = {"benchmark": "cli_start", "machine": machine(torch.device("cpu")),
                              "rounds": args.rounds, "against": args.against, "commands": {}}
    with tempfile.TemporaryDirectory() as folder:
        ours = ROOT / "src"
        theirs = unpack(args.against, Path(folder)) if args.against else None
        for name, argv in COMMANDS.items():
            log(f"== burrow {' '.join(argv)}")
            seconds(ours, argv)  # warm the page cache and the bytecode
            if theirs:
                seconds(theirs, argv)
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            for _ in range(args.rounds):
                times["ours"].append(seconds(ours, argv))
                if theirs:
                    times["theirs"].append(seconds(theirs, argv))
            entry = {"seconds": summary(times["ours"]), **imports(ours, argv)}
            if theirs:
                entry["against"] = {"seconds": summary(times["theirs"]), **imports(theirs, argv)}
                entry["ours_over_theirs"] = summary(
                    [a / b for a, b in zip(times["ours"], times["theirs"], strict=True)])
            result["commands"][name] = entry
    emit(result)


if __name__ == "__main__":
    run_main(main)
