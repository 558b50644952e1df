"""What every benchmark shares: the machine's description, paired rounds, the rival model.

A benchmark times burrow and its rival (Hugging Face transformers' Llama) in one process,
alternating rounds (ours, theirs, ours, theirs, ...) after a warm-up, so that a change in the
machine's load falls on both. Each pair of rounds gives one ratio ours/theirs; the summary is
the median with the min and max over pairs. A script prints one JSON object on stdout and its
progress on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

import burrow
from burrow.interop.hf import hf_names, llama_config

try:
    import transformers
except ImportError:  # the scripts compare with transformers; without it there is no rival
    transformers = None


def log(message: str) -> None:
    """Progress for the person watching: stderr, so that stdout stays one JSON object."""
    print(message, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's one JSON object on stdout."""
    print(json.dumps(result, indent=2))


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main; a mistake in its options ends as one line on stderr, exit 2."""
    try:
        main()
    except burrow.UserError as error:
        log(f"error: {error}")
        raise SystemExit(2) from None


COMMON_FLAGS = ("rounds", "threads", "device", "seed", "quick")


def common_parser(*flags: str, quick: str = "small and short: checks the script runs"
                  ) -> argparse.ArgumentParser:
    """The options the benchmarks share, as a parent: `ArgumentParser(parents=[...])`.

    `flags` picks them from COMMON_FLAGS (default: all of them); `quick` is --quick's help, what
    it does in that script. A script changes a default with its own parser's set_defaults, as
    each does for --quick's smaller settings (options given explicitly still win).
    """
    unknown = sorted(set(flags) - set(COMMON_FLAGS))
    if unknown:
        raise ValueError(f"common_parser: no shared option {unknown}; choose from {COMMON_FLAGS}")
    chosen = flags or COMMON_FLAGS
    parser = argparse.ArgumentParser(add_help=False)
    if "rounds" in chosen:
        parser.add_argument("--rounds", type=int, default=5,
                            help="timed pairs of rounds (default %(default)s)")
    if "threads" in chosen:
        parser.add_argument("--threads", type=int, default=None,
                            help="torch intra-op threads (default: torch's, one per core)")
    if "device" in chosen:
        parser.add_argument("--device", default="cpu",
                            help="cpu, cuda or cuda:N (default %(default)s)")
    if "seed" in chosen:
        parser.add_argument("--seed", type=int, default=0,
                            help="seed of the weights and the data (default %(default)s)")
    if "quick" in chosen:
        parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def require_transformers() -> None:
    """Exit with one line on stderr when the rival is not installed."""
    if transformers is None:
        log("error: the benchmarks compare with transformers: pip install 'burrow-lm[hf]'")
        raise SystemExit(2)


def set_threads(threads: int | None) -> None:
    """Use `threads` intra-op threads (None: torch's default, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def warn_if_busy() -> None:
    """Say on stderr when other processes keep the cores busy: the timings would mean little.

    On a CPU, torch's threads wait for each other at every operator; one descheduled by another
    process's work stalls them all, and small models then run many times slower.
    """
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5:
        log(f"warning: load average {load:.1f} on {cores} cores: another job is running and the "
            "timings will be noisy (wait for an idle machine, or compare with --threads 1)")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache() -> str | None:
    """Size of the CPU's largest cache as sysfs spells it (e.g. "32768K"), None if unknown.

    A model whose weights fit in it is not limited by memory bandwidth when decoding.
    """
    caches = sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"))
    if not caches:
        return None
    try:
        with open(os.path.join(caches[-1], "size")) as size:
            return size.read().strip()
    except OSError:
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """Where and when the numbers were taken: enough to tell two result files apart."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "last_level_cache": last_level_cache(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__ if transformers else None,
        "burrow": burrow.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read after it has seen it all."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds that `work()` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Paired:
    """The rates of alternating rounds: ours[i] and theirs[i] were measured back to back."""

    ours: list[float]
    theirs: list[float]

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.ours, self.theirs)]


def paired_rounds(ours: Callable[[], float], theirs: Callable[[], float], rounds: int,
                  warmup: int = 1) -> Paired:
    """Run `warmup` unrecorded rounds of each, then `rounds` alternating pairs of rounds.

    Each callable runs one round and returns its rate (higher is better, e.g. tokens/s).
    """
    for _ in range(warmup):
        ours()
        theirs()
    paired = Paired(ours=[], theirs=[])
    for round_index in range(rounds):
        paired.ours.append(ours())
        paired.theirs.append(theirs())
        log(f"  round {round_index + 1}/{rounds}: ours {paired.ours[-1]:,.1f}  "
            f"hf {paired.theirs[-1]:,.1f}  ratio {paired.ratios()[-1]:.3f}")
    return paired


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min and max of per-round values, and the values themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": values}


def model_config(**shape: Any) -> burrow.ModelConfig:
    """A Llama-shaped burrow config: RoPE, RMSNorm, SwiGLU, serial blocks, no biases, untied."""
    fields: dict[str, Any] = dict(ffn="swiglu", norm="rmsnorm", positions="rope", block="serial",
                                  tie_embeddings=False, bias=False, z_loss=0.0, dropout=0.0)
    fields.update(shape)
    return burrow.ModelConfig(**fields)


def llama_twin(model: burrow.Transformer, *, use_cache: bool) -> Any:
    """A transformers LlamaForCausalLM (SDPA attention) holding exactly `model`'s weights.

    The config is the one `burrow export-hf` writes, without special tokens, so that nothing
    stops generation early. `use_cache=False` suits training, where a cache is wasted work.
    """
    require_transformers()
    raw = llama_config(model.cfg, SimpleNamespace(bos_id=None, eos_id=None))
    raw.pop("torch_dtype", None)  # the dtype follows the weights loaded below
    raw["use_cache"] = use_cache
    config = transformers.LlamaConfig(**raw, attn_implementation="sdpa")
    dtype = next(model.parameters()).dtype
    twin = transformers.LlamaForCausalLM(config).to(dtype=dtype, device=model.embed.weight.device)
    names = hf_names(model.cfg)
    missing, unexpected = twin.load_state_dict(
        {names[name]: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        strict=False)
    # Tied, transformers' output layer is its embedding table, which burrow's state holds once.
    tied_head = ["lm_head.weight"] if model.cfg.tie_embeddings else []
    if missing != tied_head or unexpected:
        raise RuntimeError(f"the Llama twin's weights: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        twin.tie_weights()
        assert twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()
    return twin


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int,
                  device: torch.device) -> torch.Tensor:
    """Uniform token ids from a seeded generator: the same ids for both models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, shape, generator=generator).to(device)


def describe_config(cfg: burrow.ModelConfig) -> dict[str, Any]:
    """The shape of a model as the JSON reports it."""
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.kv_heads, "d_ff": cfg.ffn_size, "ffn": cfg.ffn,
            "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
            "tie_embeddings": cfg.tie_embeddings, "params": cfg.num_params()}

