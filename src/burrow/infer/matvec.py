"""Decoding on a CPU: each weight read as blocks of rows, spread over the cores.

Generating a token at a time, every linear layer is a matrix-vector product (one row per
sequence) whose cost is reading its weight from memory. PyTorch's default float32 CPU kernel
for so few rows runs on one core and keeps one stream of reads in flight: ~17-22 GB/s on a
2-core x86 server, where the memory gives ~52. Viewing the weight (out, in) as `blocks` stacked
(out / blocks, in) matrices and multiplying them all with one `torch.bmm` lets torch hand the
blocks to every core, each reading several blocks at once: measured on that server
(bench/decode_kernels.py: every matrix of a decode step in turn, one row), the 124M model's
438 MB of weights are read in 8.2 ms instead of 24.3 (53 GB/s), the small model's 27 MB in
0.81 ms instead of 1.40. The gain holds with one thread (14.1 against 24.3 ms at 124M) and
up to 256 rows (a batch of sequences, a prompt's prefill): 19.3 against 20.4 ms at the small
shape, 284 against 326 at 124M. At 512 rows the default kernel is ahead (36.4 against 38.3 ms
at the small shape): there a product does enough arithmetic per weight read that reading no
longer bounds it.

A decode step of a small model is bound less by its reads than by its operators, each a few
microseconds to dispatch. So in models of up to 64 MiB of weights the layers that read the same
input, q, k and v, and SwiGLU's gate and up, are multiplied as one product of their stacked
weights (a copy, made for the call, so only for 32 tokens or more): at the benchmark's small
shape (27 MB) 743 against 689 tokens/s. At 124M (438 MB) stacking gained nothing (80.7 against
81.3) and would copy 340 MB.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

# How many blocks a weight is cut into: 16 gave the fastest reads at both shapes above.
BLOCKS = 16
# Inputs with more rows than this (a long prompt's prefill) use the default kernel.
MAX_ROWS = 256
# Below this many bytes of weights a model's decode step reads them from the CPU's caches, where
# the default kernel is faster. Measured with 32 MB of last-level cache (tokens/s of the default
# kernel / of blocks): 5.2 MB 0.76, 10.5 MB 0.94, 14.7 MB 1.17, 16.8 MB 1.13, 27.2 MB 1.66.
MIN_BYTES = 12 * 2**20
# Up to this many bytes of weights, decoding stacks the layers that read the same input...
MAX_STACKED_BYTES = 64 * 2**20
# ... when it makes at least this many steps: the stacked copies cost ~4 ms to make at the small
# shape (mostly fresh pages), repaid from ~32 tokens (measured, ms per call, stacked / not:
# 4 tokens 10.9 / 8.0, 16 tokens 24.4 / 22.6, 32 tokens 41.6 / 41.7, 64 tokens 76.6 / 79.8).
MIN_STACKED_STEPS = 32


class RowBlockLinear(nn.Module):
    """An inference-only linear layer y = x W^T + b that multiplies few rows block by block.

    W's first out - out % BLOCKS rows are the blocks; the few left over (a vocabulary of
    50,257) take one ordinary product. W is a view of the given weight: nothing copied.
    With blocked=False every product is the ordinary one (a stacked weight, below, in a model
    small enough for the default kernel).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 blocked: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach()
        whole = self.out_features - self.out_features % BLOCKS
        self.blocks = self.weight[:whole].view(BLOCKS, whole // BLOCKS, self.in_features)
        self.rest = self.weight[whole:] if whole < self.out_features else None
        self.bias = None if bias is None else bias.detach()
        self.max_rows = MAX_ROWS if blocked else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        columns = rows.t().expand(BLOCKS, -1, -1)  # (blocks, in, rows), no copy
        y = torch.bmm(self.blocks, columns)  # (blocks, whole / blocks, rows)
        if rows.shape[0] > 1 or self.rest is not None:  # one row alone is already in order
            y = y.permute(2, 0, 1).reshape(rows.shape[0], -1)
            if self.rest is not None:
                y = torch.cat([y, F.linear(rows, self.rest)], dim=1)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def stacked_linear(layers: list[nn.Module], blocked: bool) -> RowBlockLinear:
    """One layer whose output is the given layers' outputs side by side: their weights (and
    biases) stacked, a copy. `output_sizes` says how to split its output again."""
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    stacked = RowBlockLinear(torch.cat([layer.weight for layer in layers]), bias, blocked)
    stacked.output_sizes = [layer.out_features for layer in layers]
    return stacked


def sharded(model: nn.Module) -> bool:
    """The model's weights are FSDP's shards (DTensors), not whole tensors."""
    return isinstance(next(model.parameters(), None), DTensor)


def usable(model: nn.Module) -> bool:
    """The model is on a CPU, not training, and its weights are whole tensors (FSDP's shards
    cannot be viewed as blocks)."""
    first = next(model.parameters(), None)
    return (first is not None and not sharded(model) and first.device.type == "cpu"
            and not torch.is_grad_enabled())


def decoding_copy(model: nn.Module, min_bytes: int | None = None,
                  max_stacked_bytes: int | None = None,
                  steps: int = MIN_STACKED_STEPS) -> tuple[nn.Module, int]:
    """The model set for decoding a few rows at a time: a copy of its modules that shares every
    weight (nothing of the model itself changes), with its linear layers swapped; and how many
    layers were swapped for blocks.

    - Blocks: with at least `min_bytes` (MIN_BYTES) of weights, every nn.Linear of at least
      BLOCKS outputs multiplies few rows block by block. A model with tied embeddings
      (`head` None) gets its embedding table read block by block as its `head`.
    - Stacks: with at most `max_stacked_bytes` (MAX_STACKED_BYTES) of weights, and for at
      least MIN_STACKED_STEPS decode `steps`, each module that names `stackable` layers
      reading the same input (q, k and v; gate and up) gets them as one `stacked` layer, so
      that a decode step runs fewer, larger products (model/attention.py, `project`).

    Returns the model itself, and 0, where there is nothing to swap: not on a CPU, a gradient
    wanted, FSDP's shards, or too few weights.
    """
    if not usable(model):
        return model, 0
    linears = [(name, child) for name, child in model.named_modules()
               if isinstance(child, nn.Linear) and child.out_features >= BLOCKS]
    tied_head = model.embed.weight if getattr(model, "head", "") is None else None
    weight_bytes = sum(child.weight.nbytes for _, child in linears)
    weight_bytes += 0 if tied_head is None else tied_head.nbytes
    blocked = weight_bytes >= (MIN_BYTES if min_bytes is None else min_bytes)
    stack = steps >= MIN_STACKED_STEPS and weight_bytes <= (
        MAX_STACKED_BYTES if max_stacked_bytes is None else max_stacked_bytes)
    if not blocked and not stack:
        return model, 0
    # A deep copy of the modules whose memo maps every tensor to itself: new modules, the
    # same weights.
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    if stack:
        for module in view.modules():
            if getattr(module, "stackable", None):
                module.stacked = stacked_linear(
                    [getattr(module, name) for name in module.stackable], blocked)
    swapped = 0
    if blocked:
        for name, child in linears:
            parent_name, _, attribute = name.rpartition(".")
            parent = view.get_submodule(parent_name)
            setattr(parent, attribute, RowBlockLinear(child.weight, child.bias))
            swapped += 1
        if tied_head is not None and len(tied_head) >= BLOCKS:
            view.head = RowBlockLinear(tied_head)
            swapped += 1
    return view, swapped
