"""Pipeline parallelism with torch.distributed.pipelining, applied from outside a plain
Transformer as torchtitan does.

The blocks are cut into pp consecutive stages (train.pipeline_split, or balanced); the first
stage also holds the embedding, the last the final norm, the head and the loss. Each stage is
the Transformer with the other stages' parts deleted (`StageModule`): its parameters keep the
whole model's names, so DCP checkpoints written by the stages together hold the whole model
and load into any layout. Each stage is then spread over its ranks as a whole model is, in
torchtitan's order (parallel/wrap.py): tensor parallelism on its "tp" dimension of the mesh,
then checkpointing, compilation, FSDP2 or DDP on its own data-parallel dimensions; and a
schedule (GPipe, Huang et al. 2019, or 1F1B, Narayanan et al. 2021) runs a step's
micro-batches through the stages: `Pipeline.step` in place of forward and backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from burrow.config import TrainConfig
from burrow.model import Transformer
from burrow.model.context import ForwardContext
from burrow.model.positions import rotary_tables
from burrow.parallel.dims import LayerStrategy, ParallelDims, check_layers
from burrow.parallel.layouts import clip_grads_with_norm_, grad_norm
from burrow.parallel.limits import pipeline_batch
from burrow.parallel.tensor import apply_tensor_parallel, loss_parallel_context
from burrow.parallel.wrap import spread

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: its blocks (a ModuleDict keyed by block index, so
    that parameter names are the whole model's), with the embedding on the first stage and
    the final norm and head on the last.

    forward(x, labels) takes token ids (first stage) or the residual stream (B, T, d) from the
    stage before, and returns the residual stream, or on the last stage (1, 2): the
    objective (cross-entropy + z-loss) and the cross-entropy. It is the training path of
    Transformer.forward (no KV cache, no retrieval), cut where the stages meet. Under tensor
    parallelism the stream is each rank's T / `sequence_shards` positions (B, T / tp, d).
    """

    def __init__(self, model: Transformer, blocks: range, *, first: bool, last: bool,
                 sequence_shards: int = 1):
        super().__init__()
        self.cfg, self.objective = model.cfg, model.objective
        self.sequence_shards = sequence_shards
        self.embed = model.embed if first else None
        self.pos_embed = model.pos_embed if first else None
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in blocks})
        self.norm = model.norm if last else None
        self.head = model.head if last else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # the whole sequence's positions: the blocks attend over all of it, gathered
        length = x.shape[1] if self.embed is not None else x.shape[1] * self.sequence_shards
        positions = torch.arange(length, device=x.device)
        ctx = ForwardContext(positions)
        if self.embed is not None:
            x = self.embed(x)  # (B, T, d)
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
            x = self.drop(x)
        if self.cfg.positions == "rope":
            ctx.rotary = rotary_tables(self.cfg, positions)
        for block in self.blocks.values():
            x = block(x, ctx)
        if self.head is None:
            return x
        # tied embeddings are refused, so the logits are not scaled (Transformer.logit_scale)
        loss, cross_entropy, _ = self.objective(self.norm(x), self.head.weight, labels,
                                                scale=1.0, z_loss=self.cfg.z_loss,
                                                kernel=self.cfg.loss_kernel)
        return torch.stack([loss, cross_entropy.detach().to(loss.dtype)])[None]

    def own(self, state: dict[str, Any]) -> dict[str, Any]:
        """What this stage holds of a whole model's state, by parameter name: its weights,
        or of an optimiser state dict its parameters' state and groups. So a checkpoint of
        one process loads into a stage."""
        names = set(self.state_dict())
        if "param_groups" not in state:
            return {name: value for name, value in state.items() if name in names}
        return {"state": self.own(state["state"]),
                "param_groups": [{**group, "params": [n for n in group["params"] if n in names]}
                                 for group in state["param_groups"]]}


@dataclass
class Pipeline:
    """A stage of the pipeline on this rank and the schedule that runs a step through it."""

    module: StageModule  # the stage's plain parameters (what checkpoints and AdamW see)
    schedule: Any
    dims: ParallelDims
    pp_group: dist.ProcessGroup
    first: bool
    last: bool
    micro_batches: int
    micro_batch_size: int  # sequences per micro-batch on each data-parallel rank

    def _run(self, run, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The schedule's step or eval on a batch of micro_batches x micro_batch_size
        sequences: the first stage takes the tokens, the last the labels; (m, 2) there."""
        if self.last:
            return run(*([inputs] if self.first else []), target=targets, labels=targets)
        return run(*([inputs] if self.first else []))

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch (gradients averaged over them, as
        accumulation does); the step's mean (objective, cross-entropy) on every rank."""
        with loss_parallel_context(self.dims.tp):  # forward and backward of the split loss
            out = self._run(self.schedule.step, inputs, targets)
        # The last stage alone has the losses: summed over the world with zeros elsewhere,
        # each data-parallel replica's pipeline counted once per tensor-parallel rank (they
        # all hold the same losses), then averaged.
        losses = out.detach().mean(0) if self.last else torch.zeros(2, device=inputs.device)
        dist.all_reduce(losses)
        return losses / (self.dims.dp_degree * self.dims.tp)

    @torch.no_grad()
    def evaluate(self, windows: Iterator[tuple[torch.Tensor, torch.Tensor, Any]],
                 autocast: Any = None) -> tuple[float, int]:
        """(total nats, predicted tokens) over evaluation windows, forward only, through the
        same schedule (its eval); a short last batch is padded with windows without targets.
        Every pipeline evaluates all windows, as every rank does without pipelining."""
        size = self.micro_batches * self.micro_batch_size
        sums = torch.zeros(2, dtype=torch.float64)
        for inputs, targets, _ in windows:
            pad = size - len(inputs)
            inputs = torch.cat([inputs, inputs.new_zeros(pad, inputs.shape[1])])
            targets = torch.cat([targets, targets.new_full((pad, targets.shape[1]), -100)])
            with autocast or nullcontext(), loss_parallel_context(self.dims.tp):
                out = self._run(self.schedule.eval, inputs, targets)
            if self.last:
                counts = (targets != -100).view(self.micro_batches, -1).sum(1)
                # a micro-batch of padding alone has no tokens, and a 0/0 cross-entropy
                nats = out[:, 1].double().nan_to_num() * counts
                sums += torch.stack([nats.sum(), counts.sum().double()]).cpu()
        dist.all_reduce(sums, group=self.pp_group)
        return float(sums[0]), int(sums[1])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip every stage's gradients by the norm over all stages' parameters, the one a
        single process computes; return it. Each stage's squared norm (over its shards, under
        FSDP and tensor parallelism: DTensor norms, each mesh's apart) is summed over the
        pipeline, as torchtitan does."""
        parameters = list(self.module.parameters())
        square = grad_norm(parameters).square()
        dist.all_reduce(square, group=self.pp_group)
        total = square.sqrt()
        clip_grads_with_norm_(parameters, max_norm, total)
        return total


def build_pipeline(model: Transformer, dims: ParallelDims, device: torch.device, bf16: bool,
                   train: TrainConfig, *, layers: list[LayerStrategy] | None = None,
                   compile: bool = False) -> Pipeline:
    """This rank's stage of `model` (its other stages' parts deleted), split over the
    stage's tensor-parallel ranks and spread over its data-parallel ones, and the schedule
    that runs it. `layers`: the whole model's (the embedding, each block, the head), as
    parallelize takes them. Collective."""
    n_layers = len(model.blocks)
    layers = layers or LayerStrategy.uniform(dims, n_layers)
    check_layers(layers, dims, n_layers)
    mesh = dims.build_mesh(device.type)
    stage = mesh.get_local_rank("pp")
    counts = train.pipeline_stages(n_layers)
    start = sum(counts[:stage])
    first, last = stage == 0, stage == dims.pp - 1
    module = StageModule(model, range(start, start + counts[stage]), first=first, last=last,
                         sequence_shards=dims.tp)
    if dims.tp > 1:
        apply_tensor_parallel(module, mesh["tp"])
    wrapped = spread(module, dims, mesh, device, bf16, layers, compile)
    micro_batches, micro_batch_size = pipeline_batch(train, dims.dp_degree, dims.pp)
    pp_group = mesh.get_group("pp")
    # Static shapes, so that no warm-up pass runs (it would draw random numbers a resumed
    # run would not): token ids in, the residual stream between stages, the losses out. The
    # stream is in bfloat16 where FSDP2 computes in it, else float32 (autocast keeps the
    # residual additions in float32).
    dtype = torch.bfloat16 if bf16 and dims.mode == "fsdp" else torch.float32
    # (requires_grad: a stage's input receives a gradient to send back)
    # Under tensor parallelism, the stream crosses a stage boundary as it crosses a block
    # boundary: split over the sequence, each rank's (B, T / tp, d) as a plain tensor
    # (tensor.py's layouts leave it so between blocks), sent to the rank of the same tp index
    # in the next stage, whose first norm takes it as its shard. So a boundary costs no
    # collective and each rank sends 1 / tp of the activations, as Megatron's scatter/gather
    # optimisation does (Narayanan et al. 2021 §4.1) without its all-gather after the
    # receive; a Replicate stream would send tp copies.
    stream = torch.empty(micro_batch_size, train.seq_len // dims.tp, model.cfg.d_model,
                         dtype=dtype, device="meta", requires_grad=True)
    ids = torch.empty(micro_batch_size, train.seq_len, dtype=torch.long, device="meta")
    losses = torch.empty(1, 2, dtype=torch.float32, device="meta")
    pipeline_stage = PipelineStage(wrapped, stage, dims.pp, device,
                                   input_args=ids if first else stream,
                                   output_args=losses if last else stream, group=pp_group)
    schedule = SCHEDULES[train.pipeline_schedule](
        pipeline_stage, n_microbatches=micro_batches, loss_fn=lambda out, target: out[0, 0])
    return Pipeline(module, schedule, dims, pp_group, first, last, micro_batches,
                    micro_batch_size)
