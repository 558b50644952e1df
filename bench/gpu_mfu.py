"""Training MFU of a ~1B-parameter dense Llama on one GPU: bf16, torch.compile, FSDP2.

`burrow train` runs under torchrun with one process and `--parallel fsdp --compile --precision
bf16`, exactly as a multi-GPU job would, logging every step; this script then reads the run's
metrics.jsonl and reports the median tokens/s and model FLOPs utilization (PaLM appendix B:
6N + 12·L·H·Q·T FLOPs per token over the datasheet's bf16 peak, as the trainer logs it) over the
steps after a warm-up that pays the compilation, with their min and max (and, as "rounds",
every measured step's value).

Target: MFU >= 50% on one H100 or H200 (PaLM reached 46.2% on 6144 TPU v4 chips, §4.1).

Model: RoPE, RMSNorm, SwiGLU, untied; d_model 2048, 20 layers, 16 heads of 128, d_ff 5632
(Llama's 8/3·d rounded up to a multiple of 256), the default corpus's 4096-token vocabulary,
2048-token sequences: 1,044,465,664 parameters.

    .venv/bin/python bench/gpu_mfu.py                 # one GPU; a few minutes (not yet measured)
    .venv/bin/python bench/gpu_mfu.py --steps 50 --micro-batch-size 4
    .venv/bin/python bench/gpu_mfu.py --quick         # a tiny model on the CPU: checks the script

The run directory is --out (default bench/results/gpu_mfu_run/); the JSON goes to stdout, the
trainer's progress to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from harness import common_parser, describe_config, emit, log, machine, run_main, summary

from burrow import RunConfig, UserError
from burrow.flops import flops_per_token
from burrow.parallel import resolve_device
from burrow.train.metrics import MetricsLog

ROOT = Path(__file__).resolve().parent.parent
TARGET_MFU = 0.5
# The ~1B shape, over the `nano` preset's architecture (RoPE, RMSNorm, SwiGLU, untied).
SHAPE = ["model.d_model=2048", "model.n_layers=20", "model.n_heads=16", "model.d_ff=5632",
         "model.max_seq_len=2048"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser("device", "quick",
                      quick="the micro preset on the CPU in fp32, no compile: seconds")])
    parser.set_defaults(device="cuda")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the run")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first steps left out of the summary (compilation, allocator)")
    parser.add_argument("--seq-len", type=int, default=2048)
    # 8 x 2048 tokens: an estimated ~30 GB of activations, beside ~17 GB of fp32 weights,
    # gradients and AdamW moments, fits in 80 GB without activation checkpointing
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=65536,
                        help="tokens per optimizer step (4 micro-batches by default, so the "
                             "optimizer step is a small share of the time)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_mfu_run"),
                        help="run directory (its checkpoint is deleted after the run)")
    if parser.parse_args().quick:  # new defaults; options given explicitly still win
        parser.set_defaults(device="cpu", steps=6, warmup=2, seq_len=128, micro_batch_size=4,
                            batch_tokens=1024,
                            out=str(ROOT / "bench" / "results" / "quick" / "gpu_mfu_run"))
    args = parser.parse_args()
    if args.warmup < 0 or args.steps <= args.warmup:
        raise UserError(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 0")
    return args


def train_command(args: argparse.Namespace) -> list[str]:
    """`burrow train` under torchrun with one process: FSDP2 on a one-rank mesh."""
    if args.quick:
        model = ["--preset", "micro"]
        precision = ["--precision", "fp32"]
    else:
        model = ["--preset", "nano", *(arg for item in SHAPE for arg in ("--set", item))]
        precision = ["--precision", "bf16", "--compile"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "1", "-m", "burrow", "train", *model, "--data", "stdlib", "--out", args.out,
            "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
            "--batch-tokens", str(args.batch_tokens), "--max-steps", str(args.steps),
            # a 1B model's usual peak rate; the default 3e-3 is meant for the tiny presets
            "--lr", "3e-4", "--log-every", "1",
            # no periodic evaluations or checkpoints; the final evaluation reads one batch
            "--eval-every", "0", "--save-every", "0",
            "--eval-tokens", str(args.micro_batch_size * args.seq_len),
            "--parallel", "fsdp", "--device", args.device, *precision]


def train(command: list[str], out: Path) -> None:
    """Run the training, its output to stderr, so that stdout carries only the JSON."""
    log("$ " + shlex.join(command))
    try:
        result = subprocess.run(command, stdout=sys.stderr)
    finally:
        # save_every 0 still leaves the final checkpoint: weights and AdamW moments, ~12 GB at
        # 1B, of a run no one resumes. Without it the next run can start afresh in `out`.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if result.returncode:
        raise UserError(f"burrow train exited with status {result.returncode} (its output is "
                        "above)")


def measured_steps(out: Path, warmup: int) -> list[dict[str, Any]]:
    """The train rows of metrics.jsonl after the first `warmup` (one row per step)."""
    rows = [row for row in MetricsLog(out / "metrics.jsonl").rows() if row["split"] == "train"]
    if len(rows) <= warmup:
        raise UserError(f"{out}/metrics.jsonl has {len(rows)} train rows, none after the "
                        f"{warmup} warm-up steps")
    return rows[warmup:]


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is available: this benchmark measures MFU on a GPU "
                        "(--quick checks the script on the CPU)")
    device = resolve_device(args.device)
    out = Path(args.out)
    command = train_command(args)
    train(command, out)
    cfg = RunConfig.load(out / "config.yaml")  # the config the trainer resolved and ran
    steps = measured_steps(out, args.warmup)
    tokens_per_second = [row["tokens_per_second"] for row in steps]
    mfu = [row["mfu"] for row in steps]
    per_token = flops_per_token(cfg.model, cfg.train.seq_len)
    # The peak the trainer divided by (a datasheet's on a known GPU, a measured matmul rate on
    # a CPU), recovered from its own numbers.
    peak = statistics.median(t * per_token / m for t, m in zip(tokens_per_second, mfu))
    info = machine(device)
    emit({"benchmark": "gpu_mfu", "quick": args.quick,
          "device_name": info.get("gpu", info["cpu"]),
          "model": describe_config(cfg.model),
          "flops_per_token": per_token,
          "train": {"seq_len": cfg.train.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
                    "batch_tokens": cfg.train.batch_tokens, "steps": cfg.train.max_steps,
                    "precision": cfg.train.precision, "compile": cfg.train.compile,
                    "parallel": cfg.train.parallel},
          "warmup_steps_skipped": args.warmup,
          "measured_steps": [row["step"] for row in steps],
          "tokens_per_second": summary(tokens_per_second),
          "mfu": summary(mfu),
          "peak_flops_per_s": peak,
          "target_mfu": TARGET_MFU,
          "target_met": statistics.median(mfu) >= TARGET_MFU,
          "command": shlex.join(command),
          "run_dir": str(out),
          "machine": info})


if __name__ == "__main__":
    run_main(main)
