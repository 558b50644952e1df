"""The decoder-only language model: embed -> blocks -> norm -> head, and its loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.block import make_block
from burrow.model.context import AuxTerm, ForwardContext, Init
from burrow.model.loss import LanguageModelLoss
from burrow.model.norms import make_dropout, make_norm
from burrow.model.positions import rotary_tables

Objective = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class ModelOutput:
    """What a forward pass returns; the losses only when labels were given.

    logits (B, T, V), computed when first read where the loss did not need them all at once
    (model/loss.py). hidden (B, T, d): the final norm's output, what the head reads.
    loss: the objective (cross-entropy + z-loss by default) + every loss term the parts
    reported; what is optimised. cross_entropy: mean nats per predicted token, a metric.
    aux: the named terms the parts reported (model/context.py), losses and statistics.
    metrics: further numbers the objective computed (distillation's soft_cross_entropy).
    """

    def __init__(self, hidden: torch.Tensor, make_logits: Callable[[], torch.Tensor],
                 aux: list[AuxTerm], loss: torch.Tensor | None = None,
                 cross_entropy: torch.Tensor | None = None,
                 metrics: dict[str, torch.Tensor] | None = None):
        self.hidden, self._make_logits, self._logits = hidden, make_logits, None
        self.aux, self.loss, self.cross_entropy = aux, loss, cross_entropy
        self.metrics = metrics or {}

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._make_logits()
        return self._logits


class Transformer(nn.Module):
    """A decoder-only transformer language model described by one ModelConfig.

    `forward(input_ids, labels)` follows the next-token convention of the data loader:
    labels[b, t] is the token that should follow input_ids[b, t]; -100 marks positions without
    a target. Generation lives apart, in burrow.infer (burrow.generate).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.adatape is not None:
            # A tape read by a query over the whole input would carry each position's future
            # into its prediction: AdaTape is built on a bidirectional encoder here.
            raise UserError("AdaTape is encoder-only in burrow: a language model's tape would "
                            "leak each position's future; build burrow.model.encoder."
                            "EncoderClassifier, or unset model.adatape")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                          if cfg.positions == "learned" else None)
        self.drop = make_dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                              bias=False)
        # PaLM §2: with shared embeddings of variance 1, the logits are scaled by d^-1/2.
        self.logit_scale = cfg.d_model ** -0.5 if cfg.scaled_tied_logits else 1.0
        # The loss computed when labels are given without an objective; replaceable from
        # outside, e.g. by one that reads logits split over the vocabulary (parallel/tensor.py).
        self.objective: Objective = LanguageModelLoss()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor: the tables and the head here, each part by its own
        `init_weights` (model/context.py's Init has the table), in the order of the modules.
        On the meta device it sets nothing."""
        init = Init(self.cfg.init, self.cfg.n_layers, self.cfg.moe.init_scale)
        init.embedding(self.embed)
        if self.pos_embed is not None:
            init.embedding(self.pos_embed)
        for module in [*self.blocks.modules(), self.norm]:
            if hasattr(module, "init_weights"):
                module.init_weights(init)
        if self.head is not None:
            init.linear(self.head)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, d): the head's matrix, or the embedding table when they are tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                cache: Any = None, start: int | torch.Tensor = 0, last_only: bool = False,
                objective: Objective | None = None,
                neighbours: torch.Tensor | None = None) -> ModelOutput:
        """Logits for each position (or only the last with `last_only`), and the loss if labels.

        With a `cache` (infer/cache.py), input_ids continue a sequence whose first `start`
        tokens are cached; `start` may be a 0-dim tensor, so that a compiled decode step serves
        every position. `objective` replaces the loss against the labels (LanguageModelLoss):
        distillation's mixes in a teacher. `neighbours` (B, C, k, r), for a model with
        model.retro: the token ids of k retrieved neighbours for each of the C = T // m complete
        chunks of input_ids (a partial last chunk has none: no position could use them, §2.4);
        None runs the decoder alone (model/retro.py). With a cache, C = (start + T) // m: the
        complete chunks of the whole sequence, cached ones included; a generation that
        retrieves gives neighbours in every pass from the first (the cache's RetroCache keeps
        what chunked cross-attention needs from earlier passes). The compiled decode step (a
        tensor `start`) takes none.
        """
        T = input_ids.shape[1]
        if isinstance(start, int) and start + T > self.cfg.max_seq_len:
            raise UserError(f"sequence of {start + T} tokens exceeds the model's context of "
                            f"{self.cfg.max_seq_len} (model.max_seq_len)")
        retro_cache = None
        if neighbours is not None:
            retro_cache = self._check_neighbours(input_ids, neighbours, cache, start)
        positions = start + torch.arange(T, device=input_ids.device)
        ctx = ForwardContext(positions, start, cache=cache,
                             statistics=cache is None or torch.is_grad_enabled(),
                             neighbours=neighbours, embed=self.embed, retro_cache=retro_cache)
        x = self.embed(input_ids)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        if self.cfg.positions == "rope":
            ctx.rotary = (rotary_tables(self.cfg, positions) if cache is None
                          else cache.rotary_at(start, positions))
        # The keys each query may see in the cache: the same for every layer, so made once
        # (relative attention's own bias masks them).
        if cache is not None and self.cfg.positions != "relative":
            ctx.visible = cache.visible(start, positions)
        for block in self.blocks:
            x = block(x, ctx)
        x = self.norm(x[:, -1:] if last_only else x)
        out = ModelOutput(x, lambda: self._logits(x), ctx.aux)
        if labels is not None:
            objective = objective or self.objective
            loss, out.cross_entropy, out.metrics = objective(
                x, self.output_weight, labels, scale=self.logit_scale, z_loss=self.cfg.z_loss,
                kernel=self.cfg.loss_kernel)
            # Each part's loss terms (Switch's balance and router z-loss) join the objective,
            # summed first: small terms added one by one to a large loss would lose bits.
            terms = [term.value for term in ctx.aux if term.is_loss]
            out.loss = loss + sum(terms) if terms else loss
        return out

    def _check_neighbours(self, input_ids: torch.Tensor, neighbours: torch.Tensor, cache: Any,
                          start: int | torch.Tensor) -> Any:
        """UserError for neighbours this pass cannot take; the cache's RetroCache, if any."""
        retro = self.cfg.retro
        if retro is None:
            raise UserError("neighbours were given to a model without retrieval (model.retro "
                            "is unset); pass neighbours=None")
        if not isinstance(start, int):
            raise UserError("the compiled decode step does not retrieve; generate with "
                            "retrieval without compile")
        retro_cache = None
        if cache is None and start != 0:
            raise UserError(f"neighbours for a pass from position {start} need the cache of "
                            "the positions before it")
        if cache is not None:
            retro_cache = getattr(cache, "retro", None)
            if retro_cache is None:
                raise UserError("this cache keeps no RETRO state (make it with the RETRO "
                                "model's config); pass neighbours=None")
            if retro_cache.length != start:
                raise UserError(f"a cached pass from position {start} has neighbours, but "
                                f"only {retro_cache.length} positions passed with them: give "
                                "neighbours in every pass of a generation from the first")
        B, T = input_ids.shape
        chunks = (start + T) // retro.chunk_size
        if neighbours.dim() != 4 or tuple(neighbours.shape[:2]) != (B, chunks):
            raise UserError(f"neighbours must be (batch, chunks, k, r) = ({B}, {chunks}, k, r) "
                            f"for {start + T} tokens in chunks of {retro.chunk_size}, got "
                            f"{tuple(neighbours.shape)}")
        return retro_cache

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits
