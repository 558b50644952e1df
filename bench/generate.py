"""Generation speed: burrow's KV-cache `generate` against transformers' LlamaForCausalLM.

Batch 1, a 16-token prompt, 200 new tokens, greedy, the same weights and the same prompt ids;
transformers is told no end-of-sequence token and a minimum of 200 new tokens, so both write
exactly 200. A round is one whole `generate` call (prefill included); rounds alternate ours,
theirs, ... after one warm-up call each, whose outputs are compared (`same_tokens`). Prints one
JSON object: tokens/s of each, the ratio ours/HF (median, min, max over pairs of rounds), and
the fraction of the memory-bandwidth bound each reaches: a decode step reads every weight once,
so tokens/s cannot exceed read bandwidth / weight bytes per token.

    .venv/bin/python bench/generate.py                  # both shapes
    .venv/bin/python bench/generate.py --shape small    # one of small, 124m, all
    .venv/bin/python bench/generate.py --quick          # a few seconds, tiny shapes
    .venv/bin/python bench/generate.py --compile        # both compile their decode step
    .venv/bin/python bench/generate.py --tied           # output layer = input embedding

With --compile, burrow runs `generate(..., compile=True)` and transformers a static cache with
its own automatic compilation of the decode step (switched on for the CPU too); the warm-up
call pays both compilations.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import (
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
    synchronize,
    timed,
    transformers,
    warn_if_busy,
)

import burrow

# small: the training benchmark's model. 124m: GPT-2 small's width and depth with a Llama MLP
# of d_ff 2048, whose 3·d·2048 weights equal GPT-2's 2·d·3072, and a 32k vocabulary, untied
# (134M parameters, 85M of them outside the embeddings).
SHAPES: dict[str, dict[str, int]] = {
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=688,
                  max_seq_len=256),
    "124m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 d_ff=2048, max_seq_len=1024),
}
QUICK_SHAPES: dict[str, dict[str, int]] = {
    "small": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=172,
                  max_seq_len=64),
    "124m": dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=344,
                 max_seq_len=64),
}
TARGETS = {"small": 2.5, "124m": 1.5}  # ours/HF tokens/s that BENCHMARKS.md promises


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser(quick="tiny shapes, 20 new tokens, 2 rounds: checks the script runs")])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per call")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--bandwidth-mb", type=int, default=512,
                        help="size of the float32 tensor summed to measure read bandwidth")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step of both (static KV caches)")
    parser.add_argument("--tied", action="store_true",
                        help="tie the output layer to the input embedding (GPT-2, Gopher, PaLM)")
    if parser.parse_args().quick:  # new defaults; options given explicitly still win
        parser.set_defaults(rounds=2, new_tokens=20, bandwidth_mb=64)
    return parser.parse_args()


def read_bandwidth(megabytes: int, device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """Best bytes/s of `.sum()` over a float32 tensor of `megabytes` MB: streaming reads."""
    values = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    values.sum()  # warm-up: pages touched, threads started
    best = min(timed(values.sum, device) for _ in range(repeats))
    return {"bytes_per_s": values.numel() * 4 / best, "tensor_mb": megabytes,
            "method": f"float32 tensor .sum(), best of {repeats}"}


def weight_bytes_per_token(model: burrow.Transformer) -> int:
    """Bytes of weights one decode step reads: every tensor, but one row of an untied embedding.

    A tied embedding is read whole anyway, as the output head.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.head is None:
        return weights
    table = model.embed.weight
    return weights - (table.shape[0] - 1) * table.shape[1] * table.element_size()


def kv_bytes_per_token(cfg: burrow.ModelConfig, mean_length: float, element_size: int) -> float:
    """Bytes of cached keys and values a decode step reads at the mean sequence length."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_size * mean_length * element_size


def their_generation_config(new_tokens: int, compile: bool) -> Any:
    """Greedy, exactly `new_tokens` new tokens: no end-of-sequence token that could stop it.

    With `compile`, a static cache, which transformers compiles the decode step for; it does
    so by itself only on GPUs, so the CPU is allowed explicitly.
    """
    compiled = {}
    if compile:
        config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
        config._compile_all_devices = True  # a class attribute, not an argument
        compiled = dict(cache_implementation="static", compile_config=config)
    return transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, bos_token_id=None, pad_token_id=None, use_cache=True, **compiled)


def first_mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> int | None:
    """Index of the first differing position of two (1, T) outputs, None when equal."""
    if torch.equal(ours, theirs):
        return None
    length = min(ours.shape[1], theirs.shape[1])
    differ = (ours[0, :length] != theirs[0, :length]).nonzero()
    return int(differ[0]) if len(differ) else length


def bench_shape(name: str, shape: dict[str, int], args: argparse.Namespace,
                bandwidth: float, device: torch.device) -> dict[str, Any]:
    """Time both models' generate on one shape; the result entry for the JSON."""
    cfg = model_config(**shape, tie_embeddings=args.tied)
    torch.manual_seed(args.seed)
    ours = burrow.Transformer(cfg).to(device).eval()
    theirs = llama_twin(ours, use_cache=True).eval()
    prompt = random_tokens(cfg.vocab_size, (1, args.prompt_len), args.seed + 1, device)
    attention_mask = torch.ones_like(prompt)
    generation_config = their_generation_config(args.new_tokens, args.compile)

    def our_generate() -> torch.Tensor:
        return burrow.generate(ours, prompt, args.new_tokens, temperature=0.0,
                               compile=args.compile)

    def their_generate() -> torch.Tensor:
        return theirs.generate(prompt, attention_mask=attention_mask,
                               generation_config=generation_config)

    log(f"generate {name}: {cfg.num_params() / 1e6:.1f}M parameters, warm-up")
    our_tokens, their_tokens = our_generate(), their_generate()
    synchronize(device)
    mismatch = first_mismatch(our_tokens, their_tokens)
    log(f"  same tokens: {mismatch is None}" + ("" if mismatch is None
                                                 else f" (first difference at {mismatch})"))

    def rate_of(generate: Callable[[], torch.Tensor]) -> Callable[[], float]:
        return lambda: args.new_tokens / timed(generate, device)

    log(f"  {args.rounds} rounds of {args.new_tokens} tokens, tokens/s:")
    paired = paired_rounds(rate_of(our_generate), rate_of(their_generate), args.rounds,
                           warmup=0)
    weight_bytes = weight_bytes_per_token(ours)
    element_size = ours.embed.weight.element_size()
    mean_length = args.prompt_len + args.new_tokens / 2
    bound = bandwidth / weight_bytes  # tokens/s if reading the weights were all a step did
    return {
        "label": f"generate {name}" + (" tied" if args.tied else "")
                 + (" compiled" if args.compile else ""),
        "shape": name,
        "model": describe_config(cfg),
        # the targets are for the shapes as given (untied), decoded the default way
        "target": None if args.compile or args.tied else TARGETS[name],
        "same_tokens": mismatch is None,
        "first_mismatch": mismatch,
        "new_tokens": {"ours": our_tokens.shape[1] - args.prompt_len,
                       "hf": their_tokens.shape[1] - args.prompt_len},
        "bytes_per_token": {"weights": weight_bytes,
                            "kv_cache_at_mean_length": kv_bytes_per_token(cfg, mean_length,
                                                                          element_size)},
        "bandwidth_bound_tokens_per_s": bound,
        "ours": {"tokens_per_s": summary(paired.ours),
                 "bandwidth_fraction": summary([rate / bound for rate in paired.ours])},
        "hf": {"tokens_per_s": summary(paired.theirs),
               "bandwidth_fraction": summary([rate / bound for rate in paired.theirs])},
        "ratio": summary(paired.ratios()),
    }


def main() -> None:
    args = parse_args()
    require_transformers()
    set_threads(args.threads)
    warn_if_busy()
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = list(shapes) if args.shape == "all" else [args.shape]

    log(f"measuring read bandwidth ({args.bandwidth_mb} MB float32 sum)")
    bandwidth = read_bandwidth(args.bandwidth_mb, device)
    log(f"  {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s")
    started = time.perf_counter()
    results = [bench_shape(name, shapes[name], args, bandwidth["bytes_per_s"], device)
               for name in names]
    emit({
        "benchmark": "generate",
        "machine": machine(device),
        "settings": {
            "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "dtype": "float32", "decoding": "greedy", "rounds": args.rounds,
            "quick": args.quick,
            "compile": args.compile,
            "ours": "burrow.generate(model, prompt, new_tokens, temperature=0.0"
                    + (", compile=True)" if args.compile else ")"),
            "hf": {"class": "LlamaForCausalLM", "attn_implementation": "sdpa",
                   "generate": "do_sample=False, max_new_tokens=min_new_tokens=new_tokens, "
                               "eos_token_id=None, "
                               + ("static KV cache, CompileConfig(fullgraph=True, dynamic="
                                  "False, mode='default'), _compile_all_devices"
                                  if args.compile else "default dynamic KV cache")},
            "bandwidth_fraction": "tokens/s x weight bytes per token / read bandwidth "
                                  "(KV-cache reads not counted; see bytes_per_token)",
        },
        "bandwidth": bandwidth,
        "wall_seconds": time.perf_counter() - started,
        "results": results,
    })


if __name__ == "__main__":
    run_main(main)
