"""Parallelism applied from outside a plain Transformer, in torchtitan's order.

The model knows nothing of this: `parallelize` returns the module the training loop calls.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from burrow.parallel.dims import ParallelDims
from burrow.parallel.expert import reduce_expert_gradients, shard_experts


def parallelize(model: nn.Module, dims: ParallelDims, device: torch.device,
                bf16: bool) -> nn.Module:
    """DDP (after splitting the experts, with dims.ep), or FSDP2 (each block sharded, then the
    root), or the model itself."""
    if dims.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if dims.ep > 1:  # expert weights differ between ranks: DDP neither syncs nor averages them
            ignored = shard_experts(model, dims.build_mesh(device.type))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        return DistributedDataParallel(model, device_ids=[device.index]
                                       if device.type == "cuda" else None)
    if dims.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = dims.build_mesh(device.type)
        # bf16 compute and communication of parameters, fp32 gradient reduction and master
        # weights, as torchtitan does on GPUs.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 else MixedPrecisionPolicy())
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """A context in which backward does (or, for all but the last micro-batch, does not)
    reduce gradients across ranks; split experts' gradients are reduced as it closes."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    skip_sync = not enabled and hasattr(wrapped, "no_sync")  # DDP
    with wrapped.no_sync() if skip_sync else contextlib.nullcontext():
        yield
    if enabled:
        reduce_expert_gradients(getattr(wrapped, "module", wrapped))
