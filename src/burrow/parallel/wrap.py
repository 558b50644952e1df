"""Parallelism applied from outside a plain Transformer, in torchtitan's order: tensor parallelism,
activation checkpointing, compilation, then data parallelism (FSDP2 on each layer with its own
layout of the data-parallel ranks, parallel/layouts.py, or DDP).

The model knows nothing of this: `parallelize` returns the module the training loop calls.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from burrow.parallel.dims import LayerStrategy, ParallelDims, check_layers
from burrow.parallel.expert import reduce_expert_gradients, shard_experts
from burrow.parallel.layouts import blocks_of, shard_layers
from burrow.parallel.tensor import apply_tensor_parallel


def parallelize(model: nn.Module, dims: ParallelDims, device: torch.device, bf16: bool, *,
                layers: list[LayerStrategy] | None = None, compile: bool = False) -> nn.Module:
    """Spread `model` as `dims` says and return the module to call.

    `layers` (one LayerStrategy per layer: the embedding, each block, the head; default:
    every layer as `dims`, none recomputed) chooses which blocks recompute their activations
    in the backward pass and, under fsdp, how each layer lies on the data-parallel ranks
    (ParallelDims.layer_strategies, check_layers). `compile` compiles each block.
    """
    layers = layers or LayerStrategy.uniform(dims, len(model.blocks))
    check_layers(layers, dims, len(model.blocks))
    mesh = dims.build_mesh(device.type) if dims.tp > 1 or dims.mode == "fsdp" else None
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    return spread(model, dims, mesh, device, bf16, layers, compile)


def spread(model: nn.Module, dims: ParallelDims, mesh, device: torch.device, bf16: bool,
           layers: list[LayerStrategy], compile: bool) -> nn.Module:
    """Steps 2 to 4 of `parallelize` on a whole model or one pipeline stage (whose `blocks`
    are a ModuleDict keyed by block index): checkpointing of the blocks `layers` marks
    (the embedding, each block, the head of the whole model), compilation, then data
    parallelism over the data-parallel dimensions of `mesh`, each layer in its layout."""
    apply_checkpointing(model, [layer.checkpoint for layer in layers[1:-1]])
    if compile:
        for block in blocks_of(model):
            block.compile()
    if dims.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if dims.ep > 1:  # expert weights differ between ranks: DDP neither syncs nor averages them
            ignored = shard_experts(model, dims.build_mesh(device.type))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        # Under pipeline parallelism the replicas are the ranks of one stage, not the world.
        group = mesh["dp_replicate"].get_group() if dims.pp > 1 else None
        return DistributedDataParallel(model, device_ids=[device.index]
                                       if device.type == "cuda" else None, process_group=group)
    if dims.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # bf16 compute and communication of parameters, fp32 gradient reduction and master
        # weights, as torchtitan does on GPUs. HSDP (dp_replicate > 1): shards over
        # "dp_shard", and the shards replicated over "dp_replicate", whose gradients FSDP2
        # all-reduces.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 else MixedPrecisionPolicy())
        shard_layers(model, dims, mesh, layers, policy)
    return model


def apply_checkpointing(model: nn.Module, checkpointed: list[bool]) -> None:
    """Wrap each block marked in `checkpointed` so that its activations are recomputed in the
    backward pass instead of kept (torch.utils.checkpoint, non-reentrant, as torchtitan does):
    a block then keeps only its input. Parameter names in state dicts are unchanged.
    `checkpointed` is indexed by block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.blocks  # a ModuleList, or a pipeline stage's ModuleDict keyed by index
    keys = list(blocks.keys() if isinstance(blocks, nn.ModuleDict) else range(len(blocks)))
    for key in keys:
        if checkpointed[int(key)]:
            # preserve_rng_state: the recomputation draws the same dropout masks and jitter.
            blocks[key] = checkpoint_wrapper(blocks[key], preserve_rng_state=True)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """A context in which backward does (or, for all but the last micro-batch, does not)
    reduce gradients across ranks; split experts' gradients are reduced as it closes."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: every layer's unit
        wrapped.set_requires_gradient_sync(enabled, recurse=True)
    skip_sync = not enabled and hasattr(wrapped, "no_sync")  # DDP
    with wrapped.no_sync() if skip_sync else contextlib.nullcontext():
        yield
    if enabled:
        reduce_expert_gradients(getattr(wrapped, "module", wrapped))
