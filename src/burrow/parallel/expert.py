"""Expert parallelism (GShard, Lepikhin et al. 2020; Switch Transformer §2.1 and Figure 3).

Each sparse layer's N experts are split over the `ep` ranks of an expert-parallel group: rank r
keeps experts [r·N/ep, (r+1)·N/ep). SwitchMLP still builds one (N, C, d) buffer per expert on
every rank; hooks around its `Experts` send each block of N/ep buffers to the rank that owns
those experts (an all-to-all), run the local experts on what arrives from the whole group,
(N/ep, ep·C, d), and send the results back by a second all-to-all, into the original order.
The model is not changed otherwise and does not know.

The mesh is (world / ep, ep): the ranks of a row form an expert-parallel group and hold all
the experts between them; the ranks of a column hold the same experts, each fed by its own row.
Dense weights stay with DDP. The expert weights are kept out of DDP, and this module reduces
their gradients, computes the global gradient norm, and gathers or slices them for checkpoints.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from burrow.model.moe import Experts, SwitchMLP

EXPERT_WEIGHTS = ("up_proj", "gate_proj", "down_proj")
# The name part torch's checkpoint_wrapper adds (parallel/wrap.py), which state dicts leave out.
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds, and with whom it exchanges tokens and gradients."""

    ep_group: dist.ProcessGroup  # the ranks the experts are split over (a row of the mesh)
    replica_group: dist.ProcessGroup  # the ranks holding the same experts (a column)
    ep: int  # experts are split this many ways
    index: int  # this rank's place in ep_group: it holds block `index` of the experts
    world_size: int


# The Experts modules this process has sharded, so that gradients, norms and checkpoints can
# find them from the model alone.
_SHARDS: weakref.WeakKeyDictionary[Experts, ExpertShard] = weakref.WeakKeyDictionary()


def shard_experts(model: nn.Module, mesh) -> list[str]:
    """Keep this rank's experts in every SwitchMLP of `model` and route tokens to the others'.

    `mesh` is ParallelDims.build_mesh's ("ep_replicate", "ep") mesh. Returns the names of the
    expert weights, which DDP must ignore: they differ between ranks.
    """
    shard = ExpertShard(mesh.get_group("ep"), mesh.get_group("ep_replicate"), mesh.size(1),
                        mesh.get_local_rank("ep"), mesh.size())
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, SwitchMLP):
            continue
        experts, per_rank = module.experts, module.num_experts // shard.ep
        rows = slice(shard.index * per_rank, (shard.index + 1) * per_rank)
        for weight_name in EXPERT_WEIGHTS:
            full = getattr(experts, weight_name)
            if full is not None:
                setattr(experts, weight_name, nn.Parameter(full.detach()[rows].clone()))
                names.append(f"{module_name}.experts.{weight_name}".lstrip("."))
        experts.register_forward_pre_hook(_dispatcher(shard))
        experts.register_forward_hook(_combiner(shard))
        module.agree_capacity = _capacity_agreement(shard, experts)
        _SHARDS[experts] = shard
    return names


def _dispatcher(shard: ExpertShard):
    def dispatch(experts: Experts, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (buffer,) = args  # (N, C, d): block r of N/ep buffers is for rank r's experts
        N, C, d = buffer.shape
        # The autograd-aware all-to-all (torch.distributed.nn.functional's is deprecated in its
        # favour); its backward is the reverse exchange, which brings gradients home.
        received = all_to_all_single_autograd(buffer.contiguous(), None, None, shard.ep_group)
        # (ep, N/ep, C, d), block s from rank s -> each local expert's tokens from every rank
        received = received.view(shard.ep, N // shard.ep, C, d).transpose(0, 1)
        return (received.reshape(N // shard.ep, shard.ep * C, d),)

    return dispatch


def _combiner(shard: ExpertShard):
    def combine(experts: Experts, args: Any, out: torch.Tensor) -> torch.Tensor:
        local, slots, d = out.shape  # (N/ep, ep·C, d)
        # Block s of the results goes back to rank s, which receives its N buffers in order.
        out = out.view(local, shard.ep, slots // shard.ep, d).transpose(0, 1)
        out = out.reshape(shard.ep * local, slots // shard.ep, d)
        return all_to_all_single_autograd(out, None, None, shard.ep_group)  # (N, C, d)

    return combine


def _capacity_agreement(shard: ExpertShard, experts: Experts):
    def agree(capacity: int) -> int:
        # Every rank must send buffers of one size: in dropless mode, the largest rank's
        # busiest expert (a capacity factor gives every rank the same capacity already).
        value = torch.tensor([capacity], device=experts.down_proj.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=shard.ep_group)
        return int(value.item())

    return agree


def _expert_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, ExpertShard]]:
    """(name, weight, shard) of every sharded expert weight of `model`, named as in its state
    dict: without the module that activation checkpointing wraps a block in."""
    return [(f"{name}.{weight_name}".lstrip(".").replace(CHECKPOINT_WRAPPER, ""), weight,
             _SHARDS[module])
            for name, module in model.named_modules() if module in _SHARDS
            for weight_name, weight in module.named_parameters(recurse=False)]


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module) -> None:
    """Turn each expert weight's gradient into that of the global loss (after the backward).

    DDP averages a dense gradient over the W ranks: the gradient of L = (1/W) sum_r L_r, with
    L_r the loss of rank r's own data. An expert's weights take part in the losses of the
    ep ranks of its group, and the all-to-all's backward brings each of those losses' gradient
    to the owner, so the owner holds sum_{r in group} dL_r/dW. The W/ep groups saw disjoint
    data, each through its own replica of the expert, hence dL/dW = (1/W) sum over the replica
    group of what each replica holds: an all-reduce SUM over the replicas, divided by W.
    """
    for _, weight, shard in _expert_weights(model):
        if weight.grad is None:
            continue
        if shard.world_size > shard.ep:
            dist.all_reduce(weight.grad, group=shard.replica_group)
        weight.grad.div_(shard.world_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip every gradient by the global norm a single process would compute; return it.

    Dense gradients are the same on every rank after DDP; each expert's gradient lives on one
    rank of each expert-parallel group, so the group's squared expert norms add up.
    """
    experts = _expert_weights(model)
    expert_ids = {id(weight) for _, weight, _ in experts}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    local = [weight.grad for _, weight, _ in experts if weight.grad is not None]
    dense_norm = torch.nn.utils.get_total_norm(dense)
    expert_square = torch.nn.utils.get_total_norm(local).to(dense_norm.device).square()
    if experts:
        dist.all_reduce(expert_square, group=experts[0][2].ep_group)
    total = (dense_norm.square() + expert_square).sqrt()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
    return total


def _gather(tensor: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """All N experts' rows, in order, from each rank's N/ep (on the CPU, as checkpoints are)."""
    parts = [torch.empty_like(tensor) for _ in range(shard.ep)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=shard.ep_group)
    return torch.cat(parts).cpu()


def full_expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert weight with all its experts, by name; collective over the ep group."""
    return {name: _gather(weight, shard) for name, weight, shard in _expert_weights(model)}


def full_expert_optimizer_state(model: nn.Module,
                                optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The optimiser state of every expert weight with all its experts (AdamW's moments are
    gathered, its step count kept), by name; collective over the ep group."""
    states = {}
    for name, weight, shard in _expert_weights(model):
        state = optimizer.state.get(weight, {})
        if state:
            states[name] = {key: _gather(value, shard)
                            if torch.is_tensor(value) and value.shape == weight.shape else value
                            for key, value in state.items()}
    return states


def local_experts(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """This rank's experts out of full ones: `tensors` maps names to full weights, or to
    optimiser states whose weight-sized entries are sliced. Other names pass unchanged."""
    sliced = dict(tensors)
    for name, weight, shard in _expert_weights(model):
        if name in sliced:
            value = sliced[name]
            sliced[name] = ({key: _rows(item, weight, shard, name) for key, item in value.items()}
                            if isinstance(value, dict) else _rows(value, weight, shard, name))
    return sliced


def _rows(value: Any, weight: nn.Parameter, shard: ExpertShard, name: str) -> Any:
    if not torch.is_tensor(value) or value.dim() != weight.dim():
        return value  # a step count
    per_rank = weight.shape[0]
    if value.shape[0] != per_rank * shard.ep:
        raise ValueError(f"{name} holds {value.shape[0]} experts, the model "
                         f"{per_rank * shard.ep}")
    return value[shard.index * per_rank:(shard.index + 1) * per_rank]

