"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence parallelism (Korthikanti
et al. 2022), expressed as DTensor layouts on a plain Transformer, as torchtitan does.

Within a tensor-parallel group of tp ranks:
- attention: q, k and v are split by output columns (ColwiseParallel), so each rank holds H / tp
  query heads and K / tp key/value heads and attends with them alone; the output projection is
  split by input rows (RowwiseParallel), each rank's partial product summed by the collective
  that leaves the result split over the sequence (a reduce-scatter);
- the MLP likewise: gate and up by columns (d_ff / tp hidden units each), down by rows;
- between them the residual stream is split over the sequence (SequenceParallel): the norms run
  on T / tp positions each, and the whole sequence is gathered before attention and the MLP;
- the token embedding is split by vocabulary rows (RowwiseParallel on the table), the output
  matrix too (the head by columns of the logits, or the tied embedding's own rows), so that
  the logits stay split over the vocabulary: `VocabParallelLoss` computes cross-entropy and
  z-loss on them without gathering them, with torch's loss_parallel (`loss_parallel_context`
  must hold forward and backward for that; without it DTensor gathers the logits).

Weights are split from rank 0's copy, so the split model computes the single-process function.
Only attention and the dense MLP are split: `check_tensor_parallel` (parallel/limits.py)
refuses the other parts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from burrow.parallel.layouts import blocks_of
from burrow.parallel.limits import check_tensor_parallel

__all__ = ["VocabParallelLoss", "apply_tensor_parallel", "check_tensor_parallel",
           "loss_parallel_context"]

def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Split `model`'s weights over the 1-D tensor-parallel `mesh` in place (see above).
    `model` is a Transformer or a pipeline stage of one, which may lack the embedding, the
    final norm and the head: each part present is split."""
    sequence = Shard(1)  # (B, T, d): the residual stream between blocks, split over T
    ends = {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=sequence),
            "norm": SequenceParallel()}
    parallelize_module(model, mesh, {name: style for name, style in ends.items()
                                     if getattr(model, name) is not None})
    if model.pos_embed is not None:
        # (T, d) learned positions are added to the stream's T / tp positions: the table is
        # replicated, and each rank looks up its own positions. The positions (T,) are the
        # same on every rank: marked whole first, SequenceParallel then slices them (it would
        # take a plain tensor for this rank's slice already).
        parallelize_module(model.pos_embed, mesh, PrepareModuleInput(
            input_layouts=Replicate(), desired_input_layouts=Replicate()))
        parallelize_module(model.pos_embed, mesh, SequenceParallel(sequence_dim=0,
                                                                   use_local_output=True))
    if model.head is not None:
        # Only `.logits` calls the head (gathered over the vocabulary); the loss reads its
        # weight, split by rows like the tied embedding's.
        parallelize_module(model.head, mesh, ColwiseParallel(input_layouts=sequence,
                                                             output_layouts=Replicate()))
    gather_sequence = PrepareModuleInput(input_layouts=(sequence, None),
                                         desired_input_layouts=(Replicate(), None),
                                         use_local_output=True)
    for block in blocks_of(model):
        attention, mlp = block.attn, block.mlp
        plan = {"attn": gather_sequence, "mlp": gather_sequence,
                **{f"attn.{name}": ColwiseParallel() for name in attention.stackable},
                "attn.o_proj": RowwiseParallel(output_layouts=sequence),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=sequence)}
        if hasattr(mlp, "gate_proj"):  # SwiGLU
            plan["mlp.gate_proj"] = ColwiseParallel()
        plan.update({name: SequenceParallel() for name in ("attn_norm", "mlp_norm")
                     if hasattr(block, name)})  # a parallel block has one norm
        parallelize_module(block, mesh, plan)
    model.objective = VocabParallelLoss()


class VocabParallelLoss:
    """The model's objective (cross-entropy + PaLM's z-loss, as model/loss.py's
    LanguageModelLoss) on logits split over the vocabulary.

    Called inside the model's forward with the final norm's output, a DTensor split over the
    sequence, and the output matrix (V, d), a DTensor split by rows: each rank multiplies the
    whole sequence by its V / tp rows, and the softmax's maximum, normaliser and the target's
    logit are combined across the ranks (loss_parallel for the cross-entropy). model.loss_kernel
    does not apply: the chunked kernel walks each row's whole vocabulary, which no rank has.
    """

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 scale: float, z_loss: float, kernel: str
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mesh = weight.device_mesh
        hidden = hidden.redistribute(placements=[Replicate()])  # (B, T, d) on every rank
        logits = F.linear(hidden.flatten(0, 1), weight) * scale  # (N, V), split over V
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = DTensor.from_local(labels.reshape(-1), mesh, [Replicate()], run_check=False)
        cross_entropy = F.cross_entropy(logits, labels, ignore_index=-100)
        loss = cross_entropy
        if z_loss:  # PaLM §5: z_loss * log^2 Z, Z's sum combined over the vocabulary's shards
            valid = (labels != -100).to(logits.dtype)
            row_max = logits.detach().amax(dim=-1, keepdim=True)
            log_z = (logits - row_max).exp().sum(dim=-1).log() + row_max.squeeze(-1)
            loss = loss + z_loss * (log_z.square() * valid).sum() / valid.sum().clamp(min=1)
        return loss.to_local(), cross_entropy.detach().to_local(), {}


def loss_parallel_context(tp: int):
    """What a training step's forward and backward run inside: torch's loss_parallel with
    tensor parallelism (cross-entropy on logits split over the vocabulary), else nothing."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
