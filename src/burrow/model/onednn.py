"""Decoding on a CPU: big matrix-vector products through oneDNN, which uses every core.

Generating one token at a time, each linear layer is a matrix-vector product whose cost is
reading its weight. PyTorch's default float32 CPU path does that on one core: ~16 GB/s on a
2-core x86 server, whatever the thread count. oneDNN's inner product, once the weight is
reordered into its own layout, splits the rows over the cores: ~30 GB/s on the same machine
for the 768 x 2048 matrices of a 124M model (bench/generate.py). Below MIN_ELEMENTS the
per-call cost of oneDNN outweighs the gain, so small layers keep the default path: measured
there, one matrix-vector product of 768 x 768 takes 113 us through oneDNN against 149 us, of
688 x 256 58 us both ways, of 256 x 256 52 us against 27 us.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# Weights with fewer elements than this (1 MB of float32) keep PyTorch's default kernel.
MIN_ELEMENTS = 2**18


class OneDNNLinear(nn.Module):
    """An inference-only copy of an nn.Linear whose weight is held in oneDNN's layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to_mkldnn()
        y = torch._C._nn.mkldnn_linear(rows, self.weight, self.bias).to_dense()
        return y.view(*x.shape[:-1], self.out_features)


def usable(model: nn.Module) -> bool:
    """oneDNN is built in, and the model is a float32 model on a CPU that is not training and
    whose weights are whole tensors (FSDP's shards are DTensors, which oneDNN cannot take)."""
    first = next(model.parameters(), None)
    return (torch.backends.mkldnn.is_available() and first is not None
            and not isinstance(first, DTensor)
            and first.device.type == "cpu" and first.dtype == torch.float32
            and not torch.is_grad_enabled())


@contextmanager
def onednn_linears(model: nn.Module, min_elements: int | None = None) -> Iterator[int]:
    """Within the block, the model's big nn.Linear layers run through oneDNN; then they are
    put back. Yields how many were swapped (0 where oneDNN cannot be used)."""
    threshold = MIN_ELEMENTS if min_elements is None else min_elements
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    if usable(model):
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) and child.weight.numel() >= threshold:
                    swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, OneDNNLinear(child))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
