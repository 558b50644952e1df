"""torch.distributed applied from outside the model: runtime, degrees, wrapping."""

from burrow.parallel.dims import ParallelDims
from burrow.parallel.expert import clip_grad_norm_
from burrow.parallel.runtime import (
    Runtime,
    init_runtime,
    launched_world_size,
    resolve_device,
    shutdown,
)
from burrow.parallel.wrap import gradient_sync, parallelize

__all__ = ["ParallelDims", "Runtime", "clip_grad_norm_", "gradient_sync", "init_runtime",
           "launched_world_size", "parallelize", "resolve_device", "shutdown"]
