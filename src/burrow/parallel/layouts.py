"""A data-parallel layout per layer (Galvatron, Miao et al., VLDB 2023: each layer chooses its
own strategy), executed with FSDP2.

At one tensor-parallel and pipeline degree, each layer (the embedding, every block, the head)
may split the same dp = dp_replicate x dp_shard ranks its own way: 1 x dp fully sharded
(ZeRO-3), dp x 1 replicated (DDP-like: whole weights, gradients all-reduced), or r x s in
between (HSDP: s shards replicated r times). The batch is split over the dp ranks as always,
so activations never change layout between layers; only where each layer's parameters,
gradients and AdamW state lie changes.

Each layout gets its own DeviceMesh over the same ranks, (pp, dp_replicate, dp_shard, tp) as
ParallelDims.build_mesh lays them out, and `fully_shard` takes each layer's on its
(dp_replicate, dp_shard) dimensions: a 2-D mesh is HSDP, which with dp_shard 1 holds whole
weights and all-reduces gradients over dp_replicate (its reduce-scatter is over one rank).
DTensors on different meshes cannot meet in one operation, so the gradient norm is taken per
mesh and combined (`clip_sharded_grad_norm_`); AdamW updates each parameter on its own mesh.

Which mesh the root module gets: the loss reads the output matrix (the head's, or the tied
embedding's) inside the root's forward rather than through a call of its module, and FSDP2
gathers a module's parameters only around its calls; so the matrix stays in the root's group
and the root takes the layout of the layer that owns it: the head's (the head and the final
norm), or with tied embeddings the embedding's (then the final norm, the head layer's only
parameters, is a unit of its own with the head's layout). A pipeline stage without either
takes the job's layout (ParallelDims), its root holding no parameters. Whatever else the root
holds (learned positions go with the embedding) follows it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from burrow.parallel.dims import LayerStrategy, ParallelDims


def layout_meshes(dims: ParallelDims, mesh, layers: list[LayerStrategy]
                  ) -> dict[tuple[int, int], object]:
    """The data-parallel mesh of the job's layout and of each layout of `layers`: the job's
    sliced from its `mesh`, each other one from a mesh of its own over the same ranks (every
    rank builds them all, in one order, as creating process groups is collective, though a
    pipeline stage uses only its own)."""
    job = (dims.dp_replicate, dims.dp_shard)
    meshes = {}
    for layout in sorted({layer.layout for layer in layers} | {job}):
        replicas, shards = layout
        whole = mesh if layout == job else dataclasses.replace(
            dims, dp_replicate=replicas, dp_shard=shards).build_mesh(mesh.device_type)
        meshes[layout] = whole["dp_replicate", "dp_shard"] if replicas > 1 else whole["dp_shard"]
    return meshes


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks a model or pipeline stage holds, in order."""
    blocks = model.blocks
    return list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)


def shard_layers(model: nn.Module, dims: ParallelDims, mesh, layers: list[LayerStrategy],
                 policy) -> None:
    """FSDP2 on each block of `model` (a Transformer or a pipeline stage) with its layer's
    layout, on the embedding or the final norm where theirs differs from the root's, then on
    the root (see above for its layout). `layers`: the embedding, each block, the head;
    `mesh`: the job's (ParallelDims.build_mesh)."""
    from torch.distributed.fsdp import fully_shard

    meshes = layout_meshes(dims, mesh, layers)
    embedding, head = layers[0].layout, layers[-1].layout
    blocks = model.blocks  # a ModuleList, or a pipeline stage's ModuleDict keyed by index
    for key in (blocks.keys() if isinstance(blocks, nn.ModuleDict) else range(len(blocks))):
        fully_shard(blocks[key], mesh=meshes[layers[1 + int(key)].layout], mp_policy=policy)
    has_embedding = getattr(model, "embed", None) is not None
    root = (head if getattr(model, "head", None) is not None
            else embedding if has_embedding else (dims.dp_replicate, dims.dp_shard))
    if has_embedding and embedding != root:
        for module in (model.embed, model.pos_embed):
            if module is not None:
                fully_shard(module, mesh=meshes[embedding], mp_policy=policy)
    if getattr(model, "norm", None) is not None and head != root:
        fully_shard(model.norm, mesh=meshes[head], mp_policy=policy)
    fully_shard(model, mesh=meshes[root], mp_policy=policy)


@torch.no_grad()
def grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The global norm of the gradients of `parameters` (a plain tensor): each mesh's
    gradients' norm taken over its shards (`full_tensor`), the squares added. One mesh (or
    none: plain tensors) gives torch's `get_total_norm` itself."""
    norms = []
    for group in _by_mesh(parameters):
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if len(norms) <= 1:
        return norms[0] if norms else torch.zeros(())
    return torch.stack([norm.square() for norm in norms]).sum().sqrt()


@torch.no_grad()
def clip_sharded_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for gradients on several meshes (layers laid out
    differently): clip by the global norm a single process would compute; return it."""
    parameters = list(parameters)
    total = grad_norm(parameters)
    clip_grads_with_norm_(parameters, max_norm, total)
    return total


@torch.no_grad()
def clip_grads_with_norm_(parameters: list[nn.Parameter], max_norm: float,
                          total: torch.Tensor) -> None:
    """Scale every gradient by max_norm / total where that is below 1, a mesh at a time."""
    for group in _by_mesh(parameters):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def _by_mesh(parameters: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The parameters with a gradient, grouped by the mesh it lies on (plain tensors
    together), in the order the meshes first appear: the same on every rank."""
    groups: dict[object, list[nn.Parameter]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            mesh = getattr(parameter.grad, "device_mesh", None)
            groups.setdefault(mesh, []).append(parameter)
    return list(groups.values())
