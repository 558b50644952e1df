"""Measure this machine for the planner: the model's real layers, timed, and the collectives.

Galvatron's profiler (Miao et al., VLDB 2023; the released code's model and hardware
profiling) times each kind of layer at a few batch sizes and fits a line, records each layer's
memory, and times all-reduce and p2p per group size; its cost model then reads measurements,
not datasheets. This module does the same for burrow's modules:

- the embedding, one block and the head (final norm, output matrix, loss) are built from the
  model's own classes and run forward and backward at a few (sequences, sequence length)
  points; seconds and saved bytes are fitted as lines in the tokens of a micro-batch;
- per tensor-parallel degree t the block is built with n_heads / t heads and d_ff / t MLP
  units, and the embedding and head with vocab / t rows: what one rank of a TP group computes
  (its collectives are counted apart, by the cost model);
- with checkpointing, the layer runs under torch.utils.checkpoint (non-reentrant, as the
  trainer's), so its backward pass includes the recomputed forward;
- saved bytes: on a CPU, every tensor autograd keeps (torch.autograd.graph.saved_tensors_hooks,
  exact), parameters excluded, each storage counted once; on a GPU, torch.cuda.memory_allocated
  after the forward pass less before (its output included: the next layer's input, which a
  block's own count includes too);
- collectives: collectives.py, by group size, spawned processes on this machine.

On a CPU every measurement runs on one thread: torchrun gives each of several processes one
(OMP_NUM_THREADS=1), and those are the jobs planned. The result is cached (measured.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.block import make_block
from burrow.model.context import ForwardContext
from burrow.model.loss import LanguageModelLoss
from burrow.model.norms import make_norm
from burrow.model.positions import rotary_tables
from burrow.parallel.planner.layers import model_layers
from burrow.parallel.planner.measured import (
    LAYER_KINDS,
    Profile,
    fit_line,
    machine,
    model_key,
    profile_path,
    read_cached,
)
from burrow.train.hardware import autocast_for, device_peak_flops

Progress = Callable[[str], None]
# Seconds each timed run lasts at least; the median of RUNS runs is kept.
RUN_SECONDS = 0.02
RUNS = 5


def split_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank of a TP group computes: 1/tp of the heads, MLP units and vocabulary,
    heads as wide as the whole model's."""
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // tp,
                               n_kv_heads=(cfg.n_kv_heads or cfg.n_heads) // tp,
                               head_dim=cfg.head_size, d_ff=cfg.ffn_size // tp,
                               vocab_size=cfg.vocab_size // tp)


def tensor_parallel_degrees(cfg: ModelConfig, processes: int) -> list[int]:
    """Powers of two up to `processes` that split the heads, key/value heads, MLP and
    vocabulary evenly (what tensor parallelism requires)."""
    found, tp = [], 1
    while tp <= processes:
        if all(size % tp == 0 for size in (cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
                                           cfg.ffn_size, cfg.vocab_size)):
            found.append(tp)
        tp *= 2
    return found


def build_layer(kind: str, cfg: ModelConfig, tp: int, device: torch.device
                ) -> tuple[nn.Module, Callable[[int, int], tuple[Callable, torch.Tensor]]]:
    """The module of one layer kind at TP degree tp, and prepare(b, s) -> (forward, input):
    forward(checkpointed) runs the layer on fixed (b, s) inputs and returns what backward
    starts from."""
    split = split_config(cfg, tp)
    torch.manual_seed(0)
    if kind == "embedding":
        module = nn.Embedding(split.vocab_size, cfg.d_model)
    elif kind == "block":
        module = make_block(split, 0)
    else:
        module = Head(cfg, split.vocab_size)
    module.to(device)

    def prepare(b: int, s: int) -> tuple[Callable, torch.Tensor]:
        if kind == "embedding":
            ids = torch.randint(0, split.vocab_size, (b, s), device=device)
            return lambda checkpointed: _maybe_checkpoint(module, checkpointed, ids), ids
        x = torch.randn(b, s, cfg.d_model, device=device, requires_grad=True)
        if kind == "block":
            positions = torch.arange(s, device=device)
            rotary = rotary_tables(split, positions) if cfg.positions == "rope" else None
            return lambda checkpointed: _maybe_checkpoint(
                module, checkpointed, x, ForwardContext(positions, 0, rotary=rotary)), x
        labels = torch.randint(0, cfg.vocab_size, (b, s), device=device)
        return lambda checkpointed: _maybe_checkpoint(
            lambda h: _head_loss(module, h, labels, cfg, tp), checkpointed, x), x

    return module, prepare


class Head(nn.Module):
    """The head as the planner cuts it: the final norm and the output matrix (its loss is
    _head_loss)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.norm = make_norm(cfg)
        self.weight = nn.Parameter(torch.randn(vocab_size, cfg.d_model) * 0.02)


def _maybe_checkpoint(function: Callable, checkpointed: bool, *args) -> torch.Tensor:
    return checkpoint(function, *args, use_reentrant=False) if checkpointed else function(*args)


def _head_loss(head: Head, x: torch.Tensor, labels: torch.Tensor, cfg: ModelConfig,
               tp: int) -> torch.Tensor:
    """The final norm, the output matrix and the loss. Whole, burrow's fused chunked loss;
    split over a TP group, the rank's logits of V / tp words and their cross-entropy, as
    loss_parallel computes it locally (its softmax statistics are combined by collectives)."""
    hidden = head.norm(x)
    if tp == 1:
        return LanguageModelLoss()(hidden, head.weight, labels, scale=1.0, z_loss=cfg.z_loss,
                                   kernel=cfg.loss_kernel)[0]
    logits = F.linear(hidden, head.weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten() % head.weight.shape[0])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device) -> float:
    """Median seconds of one call over RUNS runs of at least RUN_SECONDS each."""
    function()  # warm-up: allocations, kernel choice
    calls = 1
    while True:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            function()
        _synchronize(device)
        if time.perf_counter() - start >= RUN_SECONDS:
            break
        calls *= 2
    runs = []
    for _ in range(RUNS):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            function()
        _synchronize(device)
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def saved_bytes(forward: Callable[[], torch.Tensor], module: nn.Module,
                device: torch.device) -> float:
    """Bytes one forward pass keeps for its backward pass (see the module's docstring)."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = forward()
        _synchronize(device)
        kept = torch.cuda.memory_allocated(device) - before
        del out
        return float(kept)
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # a view of a weight is model state
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return float(sum(storages.values()))


def measurement_points(seq_len: int) -> list[tuple[int, int]]:
    """(sequences, tokens each): 1, 2 and 4 sequences of seq_len, and 1 and 2 of half."""
    half = max(1, seq_len // 2)
    return [(1, seq_len), (2, seq_len), (4, seq_len), (1, half), (2, half)]


def measure_point(forward: Callable[[bool], torch.Tensor], checkpointed: bool,
                  module: nn.Module, device: torch.device) -> dict[str, float]:
    """Forward and backward seconds and saved bytes of one prepared input, with or without
    checkpointing, in the precision the trainer uses on the device (bf16 autocast on a GPU)."""
    def run(backward: bool) -> None:
        with autocast_for(device, "auto") or contextlib.nullcontext():
            out = forward(checkpointed)
        if backward:
            out.backward(torch.ones_like(out))

    forward_s = time_call(lambda: run(False), device)
    backward_s = max(0.0, time_call(lambda: run(True), device) - forward_s)
    with autocast_for(device, "auto") or contextlib.nullcontext():
        kept = saved_bytes(lambda: forward(checkpointed), module, device)
    if checkpointed:
        return {"backward_checkpointed_s": backward_s, "activation_checkpointed_bytes": kept}
    return {"forward_s": forward_s, "backward_s": backward_s, "activation_bytes": kept}


def measure_layer(kind: str, cfg: ModelConfig, seq_len: int, tp: int,
                  device: torch.device) -> dict:
    """One layer kind at TP degree tp: its timed points and the lines fitted through them."""
    module, prepare = build_layer(kind, cfg, tp, device)
    points = []
    for b, s in measurement_points(seq_len):
        forward, _ = prepare(b, s)
        row: dict = {"sequences": b, "seq_len": s, "tokens": b * s}
        for checkpointed in (False, True):
            row.update(measure_point(forward, checkpointed, module, device))
        points.append(row)
    tokens = [row["tokens"] for row in points]

    def line(column: str) -> dict:
        return dataclasses.asdict(fit_line(tokens, [row[column] for row in points]))

    fits = {"forward": line("forward_s"), "backward": line("backward_s"),
            "backward_checkpointed": line("backward_checkpointed_s"),
            "activation": line("activation_bytes"),
            "checkpointed_activation": line("activation_checkpointed_bytes")}
    return {"fits": fits, "points": points}


def measure_model(cfg: ModelConfig, seq_len: int, processes: int, device: torch.device,
                  progress: Progress) -> dict:
    """Every layer kind at every TP degree up to `processes`: the profile's entry of a model."""
    layers: dict[str, dict[str, dict]] = {}
    for kind in LAYER_KINDS:
        layers[kind] = {}
        for tp in tensor_parallel_degrees(cfg, processes):
            entry = measure_layer(kind, cfg, seq_len, tp, device)
            layers[kind][str(tp)] = entry
            fits = entry["fits"]
            progress(f"profile: {kind:<9} tp {tp}: forward {fits['forward']['slope'] * 1e9:.1f} "
                     f"ns/token + {fits['forward']['intercept'] * 1e6:.0f} us, backward "
                     f"{fits['backward']['slope'] * 1e9:.1f} ns/token, kept "
                     f"{fits['activation']['slope']:.0f} bytes/token")
    block = model_layers(cfg, seq_len, flash_attention=True)[1]
    slope = layers["block"]["1"]["fits"]["forward"]["slope"]
    return {"model": dataclasses.asdict(cfg), "seq_len": seq_len, "layers": layers,
            # The FLOP rate one whole block's forward pass sustains (its marginal cost per
            # token), the cost model's rate for what the profile does not time.
            "flops_per_second": block.forward_flops_per_token / slope if slope > 0 else None}


def local_device() -> torch.device:
    """cuda:0 where torch sees a GPU, else the CPU; it must be what machine() reports."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def profile_machine(cfg: ModelConfig, seq_len: int, processes: int, *,
                    remeasure: bool = False, path: os.PathLike | None = None,
                    progress: Progress = print) -> tuple[Profile, str]:
    """This machine's profile with the collectives of groups up to `processes` and the layers
    of `cfg` at `seq_len`: read from the cache, what is missing measured and saved. Returns the
    profile and the model's key in it."""
    from burrow.parallel.planner.collectives import measure_collectives

    spec = machine()
    device = local_device()
    if device.type != spec["device"]:
        raise UserError(f"nvidia-smi and torch disagree on this machine's device ({spec['device']}"
                        f" vs {device.type}); install the torch build for it")
    if device.type == "cuda" and processes > spec["count"]:
        raise UserError(f"--gpus {processes} but this machine has {spec['count']} GPUs")
    path = profile_path(spec) if path is None else path
    profile = None if remeasure else read_cached(path)
    if profile is None:
        memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                  else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        precision = "bf16" if device.type == "cuda" else "fp32"
        profile = Profile(spec, precision, float(memory), threads=1)
    if device.type == "cpu":
        torch.set_num_threads(profile.threads)
    changed = False
    groups = [g for g in (2 ** i for i in range(1, processes.bit_length())) if g <= processes]
    missing = [g for g in groups if g not in profile.group_sizes()]
    if missing:
        progress(f"profile: timing collectives over {', '.join(map(str, missing))} processes")
        for kind, fits in measure_collectives(missing, device.type, progress).items():
            profile.collectives.setdefault(kind, {}).update(fits)
        changed = True
    key = model_key(cfg, seq_len)
    degrees = {str(tp) for tp in tensor_parallel_degrees(cfg, processes)}
    if not degrees <= set(profile.models.get(key, {}).get("layers", {}).get("block", {})):
        progress(f"profile: timing the layers at {seq_len} tokens a sequence on {device}")
        profile.models[key] = measure_model(cfg, seq_len, processes, device, progress)
        profile.models[key]["peak_flops"] = device_peak_flops(
            device, torch.bfloat16 if profile.precision == "bf16" else torch.float32)
        changed = True
    if changed:
        profile.save(path)
        progress(f"profile: saved {path}")
    return profile, key
