"""Training throughput: burrow.Transformer against transformers' LlamaForCausalLM.

Both models have the same shape and the same weights, take the same token batches and the
same AdamW, in float32. A round is --steps-per-round optimizer steps (forward with labels to
the loss, backward, step, zero_grad); rounds alternate ours, theirs, ... after a warm-up.
Prints one JSON object: tokens/s of each, the ratio ours/HF (median, min, max over pairs of
rounds) and the MFU of each, PaLM's 6N + 12·L·H·Q·T FLOPs per token over the float32 matmul
peak measured at the model's own largest matmul shapes.

    .venv/bin/python bench/train_throughput.py              # eager
    .venv/bin/python bench/train_throughput.py --compile    # both models torch.compile'd
    .venv/bin/python bench/train_throughput.py --quick      # a few seconds, tiny shapes
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    Paired,
    common_parser,
    describe_config,
    emit,
    llama_twin,
    log,
    machine,
    model_config,
    paired_rounds,
    random_tokens,
    require_transformers,
    run_main,
    set_threads,
    summary,
    timed,
    warn_if_busy,
)

import burrow
from burrow.flops import flops_per_token
from burrow.train.hardware import measure_matmul_flops

# The benchmark's shape: a Llama of about 9M parameters, big enough that matmuls dominate.
SHAPE = dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=688,
             max_seq_len=256)
QUICK_SHAPE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=172,
                   max_seq_len=64)
TARGETS = {"eager": 1.1, "compile": 1.2}  # ours/HF tokens/s that BENCHMARKS.md promises
IGNORE = -100
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.1  # AdamW's, the same for both models


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser(quick="tiny shapes, 2 rounds of 2 steps: checks the script runs")])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (the warm-up pays the compile)")
    parser.add_argument("--compile-mode", default=None,
                        choices=("default", "max-autotune-no-cudagraphs"),
                        help="torch.compile's mode for both models, with --compile")
    parser.add_argument("--steps-per-round", type=int, default=10,
                        help="optimizer steps in one timed round")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed optimizer steps of each model before the rounds")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    if parser.parse_args().quick:  # new defaults; options given explicitly still win
        parser.set_defaults(rounds=2, steps_per_round=2, warmup_steps=1, batch=2,
                            seq=QUICK_SHAPE["max_seq_len"])
    return parser.parse_args()


def measure_peak(cfg: burrow.ModelConfig, tokens_per_step: int, device: torch.device,
                 seconds: float) -> dict[str, Any]:
    """The float32 matmul FLOP/s of the model's two largest matmuls; the peak is the faster.

    (B*T, d) x (d, d_ff) is every MLP projection's shape (transposed for down_proj) and
    (B*T, d) x (d, vocab) the output head's: together most of the model's FLOPs.
    """
    shapes = {"mlp (B*T, d) x (d, d_ff)": (tokens_per_step, cfg.d_model, cfg.ffn_size),
              "head (B*T, d) x (d, vocab)": (tokens_per_step, cfg.d_model, cfg.vocab_size)}
    measured = {name: measure_matmul_flops(*mkn, dtype=torch.float32, seconds=seconds,
                                           device=device)
                for name, mkn in shapes.items()}
    used = max(measured, key=measured.get)
    return {"flops_per_s": measured[used], "used": used, "measured": measured,
            "shapes_mkn": shapes}


def shifted_labels(tokens: torch.Tensor) -> torch.Tensor:
    """burrow's labels for `tokens`: the next token, none after the last.

    transformers shifts `labels=tokens` itself and so predicts tokens[:, 1:] from positions
    0..T-2; these labels make burrow predict exactly the same tokens.
    """
    labels = torch.full_like(tokens, IGNORE)
    labels[..., :-1] = tokens[..., 1:]
    return labels


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The same AdamW for both models: every parameter decayed, torch's default kernels."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)


def train_step(loss_of_batch: Callable[[int], torch.Tensor],
               optimizer: torch.optim.Optimizer, batch: int) -> None:
    """One optimizer step on batch number `batch`: loss, backward, step, zero_grad."""
    loss_of_batch(batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def losses_at_start(ours: burrow.Transformer, theirs: Any,
                    tokens: torch.Tensor) -> dict[str, Any]:
    """Both models' loss on the first batch before training: equal when weights and targets are."""
    with torch.no_grad():
        our_loss = ours(tokens, labels=shifted_labels(tokens)).loss.item()
        their_loss = theirs(input_ids=tokens, labels=tokens).loss.item()
    return {"ours": our_loss, "hf": their_loss, "same": abs(our_loss - their_loss) < 1e-4}


def round_runner(loss_of_batch: Callable[[int], torch.Tensor],
                 optimizer: torch.optim.Optimizer, batches: torch.Tensor,
                 device: torch.device) -> Callable[[], float]:
    """A function that trains one round, a step on each of `batches`, and returns tokens/s."""

    def run_round() -> float:
        def steps() -> None:
            for batch in range(len(batches)):
                train_step(loss_of_batch, optimizer, batch)
        return batches.numel() / timed(steps, device)

    return run_round


def report(args: argparse.Namespace, cfg: burrow.ModelConfig, device: torch.device,
           peak: dict[str, Any], start_losses: dict[str, Any], paired: Paired) -> dict[str, Any]:
    """The benchmark's JSON object: machine, settings, checks, and the rounds' summaries."""
    mode = "compile" if args.compile else "eager"
    model_flops = flops_per_token(cfg, args.seq)

    def side(rates: list[float]) -> dict[str, Any]:
        return {"tokens_per_s": summary(rates),
                "mfu": summary([rate * model_flops / peak["flops_per_s"] for rate in rates])}

    return {
        "benchmark": "train_throughput",
        "mode": mode,
        "machine": machine(device),
        "settings": {
            "model": describe_config(cfg), "batch": args.batch, "seq_len": args.seq,
            "dtype": "float32", "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "warmup_steps": args.warmup_steps, "compile": args.compile,
            "compile_mode": args.compile_mode, "quick": args.quick,
            "optimizer": {"name": "torch.optim.AdamW", "lr": args.lr, "betas": list(BETAS),
                          "weight_decay": WEIGHT_DECAY},
            "hf": {"class": "LlamaForCausalLM", "attn_implementation": "sdpa",
                   "use_cache": False},
            "labels": "same targets: HF labels=tokens (shifted inside), burrow labels "
                      "pre-shifted with the last position ignored",
        },
        "flops_per_token": model_flops,
        "flops_formula": "6N + 12*L*H*Q*T (PaLM appendix B), N with the output embedding",
        "peak": peak,
        "checks": {"loss_at_start": start_losses},
        "results": [{"label": f"train {mode}", "target": TARGETS[mode],
                     "ours": side(paired.ours), "hf": side(paired.theirs),
                     "ratio": summary(paired.ratios())}],
    }


def main() -> None:
    args = parse_args()
    require_transformers()
    set_threads(args.threads)
    warn_if_busy()
    device = torch.device(args.device)
    cfg = model_config(**(QUICK_SHAPE if args.quick else SHAPE))

    log(f"train_throughput ({'compile' if args.compile else 'eager'}): measuring the float32 "
        "matmul peak")
    peak = measure_peak(cfg, args.batch * args.seq, device, seconds=0.1 if args.quick else 1.0)
    torch.manual_seed(args.seed)
    ours = burrow.Transformer(cfg).to(device).train()
    theirs = llama_twin(ours, use_cache=False).train()
    batches = random_tokens(cfg.vocab_size, (args.steps_per_round, args.batch, args.seq),
                            args.seed + 1, device)
    start_losses = losses_at_start(ours, theirs, batches[0])
    log(f"  loss at step 0: ours {start_losses['ours']:.6f}  hf {start_losses['hf']:.6f}")

    our_model = torch.compile(ours, mode=args.compile_mode) if args.compile else ours
    their_model = torch.compile(theirs, mode=args.compile_mode) if args.compile else theirs
    our_labels = shifted_labels(batches)  # burrow's data loader makes them, outside the step

    def our_loss(batch: int) -> torch.Tensor:
        return our_model(batches[batch], labels=our_labels[batch]).loss

    def their_loss(batch: int) -> torch.Tensor:
        return their_model(input_ids=batches[batch], labels=batches[batch]).loss

    our_optimizer, their_optimizer = make_optimizer(ours, args.lr), make_optimizer(theirs, args.lr)
    log(f"  warm-up: {args.warmup_steps} steps each" + (" (compiling)" if args.compile else ""))
    for step in range(args.warmup_steps):
        train_step(our_loss, our_optimizer, step % len(batches))
        train_step(their_loss, their_optimizer, step % len(batches))
    log(f"  {args.rounds} rounds of {args.steps_per_round} steps, tokens/s:")
    paired = paired_rounds(round_runner(our_loss, our_optimizer, batches, device),
                           round_runner(their_loss, their_optimizer, batches, device),
                           args.rounds, warmup=0)
    emit(report(args, cfg, device, peak, start_losses, paired))


if __name__ == "__main__":
    run_main(main)
