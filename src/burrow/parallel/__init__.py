"""torch.distributed applied from outside the model: runtime, degrees, wrapping."""

from burrow.parallel.dims import LayerStrategy, ParallelDims
from burrow.parallel.expert import clip_grad_norm_
from burrow.parallel.runtime import (
    Runtime,
    init_runtime,
    launched_world_size,
    resolve_device,
    shutdown,
)
from burrow.parallel.tensor import check_tensor_parallel, loss_parallel_context
from burrow.parallel.wrap import gradient_sync, parallelize

__all__ = ["LayerStrategy", "ParallelDims", "Runtime", "check_tensor_parallel",
           "clip_grad_norm_", "gradient_sync", "init_runtime", "launched_world_size",
           "loss_parallel_context", "parallelize", "resolve_device", "shutdown"]
