"""torch.distributed applied from outside the model: runtime, degrees, wrapping; and the planner
(parallel/planner/), which is arithmetic and imports no torch.

The names below are imported on first use (PEP 562), so that `burrow.parallel.planner` can be
imported without torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from burrow.parallel.dims import LayerStrategy, ParallelDims
    from burrow.parallel.expert import clip_grad_norm_
    from burrow.parallel.limits import check_tensor_parallel
    from burrow.parallel.runtime import (
        Runtime,
        init_runtime,
        launched_world_size,
        resolve_device,
        shutdown,
    )
    from burrow.parallel.tensor import loss_parallel_context
    from burrow.parallel.wrap import gradient_sync, parallelize

# name -> the module that defines it
_LAZY = {"LayerStrategy": "burrow.parallel.dims", "ParallelDims": "burrow.parallel.dims",
         "clip_grad_norm_": "burrow.parallel.expert",
         "Runtime": "burrow.parallel.runtime", "init_runtime": "burrow.parallel.runtime",
         "launched_world_size": "burrow.parallel.runtime",
         "resolve_device": "burrow.parallel.runtime", "shutdown": "burrow.parallel.runtime",
         "check_tensor_parallel": "burrow.parallel.limits",
         "loss_parallel_context": "burrow.parallel.tensor",
         "gradient_sync": "burrow.parallel.wrap", "parallelize": "burrow.parallel.wrap"}

__all__ = ["LayerStrategy", "ParallelDims", "Runtime", "check_tensor_parallel",
           "clip_grad_norm_", "gradient_sync", "init_runtime", "launched_world_size",
           "loss_parallel_context", "parallelize", "resolve_device", "shutdown"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'burrow.parallel' has no attribute {name!r}")
