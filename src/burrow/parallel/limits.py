"""What each kind of parallelism can split, checked from the configs alone (no torch), before
a process group is joined and by the planner's search for plans burrow can execute.

Each check raises UserError in one line that names the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from burrow.config import ModelConfig, RunConfig, TrainConfig
from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.parallel.dims import ParallelDims

# The block parts tensor parallelism knows how to split: (role, registered name).
SPLIT_PARTS = {("mixer", "attention"), ("ffn", "mlp")}


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise UserError (one line, naming the fix) unless `cfg` splits `tp` ways."""
    if tp == 1:
        return
    sizes = {"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads,
             "model.d_ff": cfg.ffn_size, "model.vocab_size": cfg.vocab_size}
    for name, size in sizes.items():
        if size % tp:
            raise UserError(f"train.tensor_parallel={tp} must divide {name}={size}; choose a "
                            "degree that divides the heads, key/value heads, d_ff and vocabulary")
    if cfg.positions == "relative":
        raise UserError(f"train.tensor_parallel={tp}: Transformer-XL relative positions are not "
                        "split by tensor parallelism; use --parallel fsdp without it, or "
                        "model.positions=rope")
    if cfg.dropout:
        raise UserError(f"train.tensor_parallel={tp} with model.dropout={cfg.dropout}: the ranks "
                        "would draw the same masks for different heads and positions; set "
                        "model.dropout=0")
    for layer in range(cfg.n_layers):
        for role, kind in cfg.layer_spec(layer).parts():
            if (role, kind) not in SPLIT_PARTS:
                raise UserError(f"train.tensor_parallel={tp}: block {layer} has the {role} "
                                f"{kind!r}, which tensor parallelism does not split (it splits "
                                "attention and the dense MLP); use --parallel fsdp or ddp alone")


def pipeline_refusal(model: ModelConfig, seq_len: int, tp: int = 1) -> str | None:
    """Why a model cannot be cut into pipeline stages (with tensor parallelism `tp` inside
    them, on sequences of `seq_len` tokens), in words; None if it can."""
    refusals = [
        (seq_len % tp, f"train.tensor_parallel={tp}: the stream between stages is split over "
                       f"the sequence, and {tp} does not divide train.seq_len={seq_len}; "
                       "change --seq-len"),
        (model.moe.enabled, "Switch experts: their balance losses arise on every stage, and "
                            "only the last adds losses to the objective; train a dense model"),
        (model.retro is not None, "RETRO: every chunked cross-attention needs the neighbours "
                                  "and the embedding of the first stage"),
        (model.tie_embeddings, "tied embeddings: the table would live on the first and the "
                               "last stage; set model.tie_embeddings=false"),
    ]
    return next((why for refused, why in refusals if refused), None)


def check_pipeline(cfg: RunConfig, dims: ParallelDims) -> None:
    """Raise UserError (one line, naming the fix) unless `cfg` can run in dims.pp stages;
    called before the process group is joined."""
    if dims.pp == 1:
        return
    train, model = cfg.train, cfg.model
    why = pipeline_refusal(model, train.seq_len, dims.tp) or (
        "distillation: the teacher's logits would need the whole model"
        if cfg.distill is not None else "retro-fitting" if cfg.retro_fit is not None else
        "a batch ramp: the schedule's micro-batches are fixed when it is built"
        if train.batch_ramp.strip() else None)
    if why:
        raise UserError(f"train.pipeline_parallel={dims.pp} with {why}; or drop "
                        "--pipeline-parallel")
    train.pipeline_stages(model.n_layers)
    pipeline_batch(train, dims.dp_degree, dims.pp)


def pipeline_batch(train: TrainConfig, dp: int, pp: int) -> tuple[int, int]:
    """(micro-batches per step, sequences per micro-batch on each data-parallel rank).

    Without train.pipeline_microbatches, the micro-batches are what batch_tokens gives with
    micro_batch_size, as gradient accumulation would run them; fewer than the stages are
    re-cut into pp smaller ones (a pipeline of m < pp micro-batches leaves stages idle, and
    1F1B refuses it). With it, each rank's sequences of a step are cut into that many."""
    micro_tokens = train.micro_batch_size * train.seq_len * dp
    accumulation = max(1, round(train.batch_tokens / micro_tokens))
    sequences = accumulation * train.micro_batch_size  # per data-parallel rank and step
    wanted = train.pipeline_microbatches or max(accumulation, pp)
    if sequences % wanted:
        asked = (f"train.pipeline_microbatches={wanted}" if train.pipeline_microbatches else
                 f"{pp} micro-batches (one per stage)")
        raise UserError(f"{asked} must divide the {sequences} sequences each data-parallel "
                        f"rank trains on per step (batch_tokens {train.batch_tokens} / "
                        f"({train.seq_len} tokens x {dp} ranks)); change --batch-tokens or "
                        "--pipeline-microbatches")
    if train.pipeline_schedule == "1f1b" and wanted < pp:
        raise UserError(f"train.pipeline_microbatches={wanted} is fewer than the {pp} stages, "
                        "which the 1f1b schedule needs; raise it or use --pipeline-schedule "
                        "gpipe")
    return wanted, sequences // wanted


