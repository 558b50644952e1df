"""The decoder-only language model: embed -> blocks (serial or PaLM-parallel) -> norm -> head."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.layers import (
    Attention,
    KVCache,
    RMSNorm,
    make_dropout,
    make_mlp,
    make_norm,
    rotary_tables,
)
from burrow.model.loss import linear_distillation_loss
from burrow.model.matvec import decoding_linears, sharded
from burrow.model.moe import Experts, Router, RouterStats, SwitchMLP

# A compiled decode step is specialised on the cache's length, so `generate(compile=True)`
# rounds it up to a multiple of this (within the context): every prompt and generation length
# in a bucket reuses one graph, in the process and from torch's on-disk compile cache.
COMPILED_CACHE_BUCKET = 256


class ModelOutput:
    """What a forward pass returns; the losses only when labels were given.

    logits (B, T, V). loss: cross-entropy + z-loss + the routers' losses, what is optimised.
    cross_entropy: mean nats per predicted token (a metric without gradient when other terms
    are on). soft_cross_entropy: against a teacher's probabilities, when one was given.
    router: one RouterStats per sparse layer, empty for a dense model (and when decoding
    with a cache and no gradient, which has no use for them). With labels the loss is
    computed without materialising all logits at once (model/loss.py); `logits` is then
    computed when first read.
    """

    def __init__(self, logits: torch.Tensor | None = None, loss: torch.Tensor | None = None,
                 cross_entropy: torch.Tensor | None = None,
                 make_logits: Callable[[], torch.Tensor] | None = None,
                 router: list[RouterStats] | None = None,
                 soft_cross_entropy: torch.Tensor | None = None):
        self._logits, self._make_logits = logits, make_logits
        self.loss, self.cross_entropy = loss, cross_entropy
        self.soft_cross_entropy = soft_cross_entropy
        self.router = router or []

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._make_logits()
        return self._logits


class Block(nn.Module):
    """One transformer layer.

    serial:   x = x + attn(norm1(x)); x = x + mlp(norm2(x))
    parallel: x = x + attn(norm(x)) + mlp(norm(x))   (PaLM §2: ~15% faster at scale)

    The MLP is dense, or Switch experts in the blocks cfg.moe makes sparse; forward returns
    the new x and the sparse layer's RouterStats (None for a dense one).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.block == "parallel"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = None if self.parallel else make_norm(cfg)
        self.sparse = cfg.moe.is_sparse(layer)
        self.mlp = SwitchMLP(cfg) if self.sparse else make_mlp(cfg)
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary, positions: torch.Tensor,
                cache: KVCache | None, start: int | torch.Tensor = 0,
                visible: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        h = self.attn_norm(x)
        attended = self.dropout(self.attn(h, rotary, positions, cache, start, visible))
        if self.parallel:
            x, mlp_in = x + attended, h
        else:
            x = x + attended
            mlp_in = self.mlp_norm(x)
        stats = None
        if self.sparse:  # decoding with a cache, no loss: no use for the router's statistics
            mlp_out, stats = self.mlp(mlp_in, stats=cache is None or torch.is_grad_enabled())
        else:
            mlp_out = self.mlp(mlp_in)
        return x + self.dropout(mlp_out), stats


class Transformer(nn.Module):
    """A decoder-only transformer language model described by one ModelConfig.

    `forward(input_ids, labels)` follows the next-token convention of the data loader:
    labels[b, t] is the token that should follow input_ids[b, t]; -100 marks positions without
    a target.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                          if cfg.positions == "learned" else None)
        self.drop = make_dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                              bias=False)
        # PaLM §2: with shared embeddings of variance 1, the logits are scaled by d^-1/2.
        tied_fan_in = cfg.tie_embeddings and cfg.init == "fan_in"
        self.logit_scale = cfg.d_model ** -0.5 if tied_fan_in else 1.0
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor. Works on the meta device too (then it only sets nothing).

        tensor                         init="gpt2"                init="fan_in" (PaLM §2)
        embed, pos_embed               N(0, 0.02)                 N(0, 1)
        q/k/v/gate/up proj, W_R, head  N(0, 0.02)                 N(0, 1/sqrt(fan_in))
        o_proj, down_proj              N(0, 0.02/sqrt(2L))        N(0, 1/sqrt(fan_in))
        biases, u, v                   0                          0
        norm weights / biases          1 / 0                      1 / 0
        experts, router (Switch §2.4)  N(0, moe.init_scale/fan_in) truncated at 2 sigma
        """
        fan_in = self.cfg.init == "fan_in"
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0 if fan_in else 0.02)
            elif isinstance(module, nn.Linear):
                if fan_in:
                    std = module.in_features ** -0.5
                elif name.endswith(("o_proj", "down_proj")):
                    std = residual_std
                else:
                    std = 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (Experts, Router)):
                module.reset_parameters()
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith((".u", ".v")):
                nn.init.zeros_(parameter)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start: int | torch.Tensor = 0,
                last_only: bool = False, teacher_logits: torch.Tensor | None = None,
                label_weight: float = 1.0, teacher_weight: float = 0.0) -> ModelOutput:
        """Logits for each position (or only the last with `last_only`), and the loss if labels.

        With a `cache`, input_ids continue a sequence whose first `start` tokens are cached;
        `start` may be a 0-dim tensor, so that a compiled decode step serves every position.
        With `teacher_logits` (B, T, V) the loss is distillation's (Switch §4): label_weight x
        the loss against the labels + teacher_weight x the cross-entropy against the teacher's
        probabilities, computed in the same pass.
        """
        B, T = input_ids.shape
        if isinstance(start, int) and start + T > self.cfg.max_seq_len:
            raise UserError(f"sequence of {start + T} tokens exceeds the model's context of "
                            f"{self.cfg.max_seq_len} (model.max_seq_len)")
        positions = start + torch.arange(T, device=input_ids.device)
        x = self.embed(input_ids)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        rotary = None
        if self.cfg.positions == "rope":
            rotary = (rotary_tables(self.cfg, positions) if cache is None
                      else cache.rotary_at(start, positions))
        # The keys each query may see in the cache: the same for every layer, so made once
        # (relative attention's own bias masks them).
        visible = (cache.visible(start, positions)
                   if cache is not None and self.cfg.positions != "relative" else None)
        router = []
        for block in self.blocks:
            x, stats = block(x, rotary, positions, cache, start, visible)
            if stats is not None:
                router.append(stats)
        x = self.norm(x[:, -1:] if last_only else x)
        if labels is None:
            return ModelOutput(logits=self._logits(x), router=router)
        weight = self.embed.weight if self.head is None else self.head.weight
        # PaLM §5: z_loss * log^2 Z keeps the softmax normaliser near 1 for stability.
        loss, cross_entropy, soft_cross_entropy = linear_distillation_loss(
            x, weight, labels, teacher_logits, scale=self.logit_scale, z_loss=self.cfg.z_loss,
            label_weight=label_weight, teacher_weight=teacher_weight)
        if router:  # Switch §2.2, ST-MoE §3: each sparse layer's losses join the objective
            loss = loss + sum(stats.balance_loss + stats.z_loss for stats in router)
        return ModelOutput(loss=loss, cross_entropy=cross_entropy, router=router,
                           make_logits=lambda: self._logits(x),
                           soft_cross_entropy=soft_cross_entropy if teacher_logits is not None
                           else None)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None, compile: bool = False) -> torch.Tensor:
        """Continue each row of input_ids (B, T) by max_new_tokens tokens, with a KV cache.

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set
        whose probability reaches p. A row that emits eos_id is padded with eos_id after it.
        `compile` runs each one-token step through torch.compile: every step has the same
        shapes (the cache is preallocated and the position is a tensor), so it compiles once
        per batch size and bucket of lengths (COMPILED_CACHE_BUCKET), then spends far less
        time per token outside the matmuls.
        On a CPU, compiled or not, each weight is read as blocks of rows spread over the cores,
        and in small models q, k, v and gate, up run as one product each (model/matvec.py).
        Runs in inference mode, but for FSDP-sharded models (then without gradients).
        Returns (B, T + new) with the prompt included, an ordinary tensor.
        """
        B, T = input_ids.shape
        if T == 0:
            raise UserError("the prompt is empty: give at least one token")
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise UserError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the "
                            f"context of {self.cfg.max_seq_len}; shorten the prompt or ask for "
                            "fewer tokens")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        # Inference mode spares every operator autograd's bookkeeping: ~10% of a small model's
        # decode step on a CPU. Not for FSDP's shards (DTensors), whose hooks would make the
        # buffers of the gathered weights inference tensors, unusable when training resumes.
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad() if sharded(self) else torch.inference_mode():
                tokens = self._decode(input_ids, max_new_tokens, temperature, top_k, top_p,
                                      generator, eos_id, compile)
        finally:
            self.train(was_training)
        return tokens.clone()  # an ordinary tensor, which autograd accepts (inference ones not)

    def _decode(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                eos_id: int | None, compile: bool) -> torch.Tensor:
        """generate's loop: prefill the cache with the prompt, then one token per step."""
        B, T = input_ids.shape
        length = T + max_new_tokens
        if compile:  # the mask hides the positions past the end
            length = min(self.cfg.max_seq_len, -(-length // COMPILED_CACHE_BUCKET)
                         * COMPILED_CACHE_BUCKET)
        cache = KVCache(self.cfg, B, length)
        step_logits = self._compiled_step() if compile else self._step_logits
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        with decoding_linears(self, tied_head=self.embed.weight if self.head is None else None,
                              steps=max_new_tokens):
            logits = self(input_ids, cache=cache, last_only=True).logits[:, -1]
            for step in range(max_new_tokens):
                next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if eos_id is not None:
                    next_token = next_token.masked_fill(finished[:, None], eos_id)
                    finished |= next_token[:, 0] == eos_id
                tokens.append(next_token)
                if step + 1 == max_new_tokens or eos_id is not None and bool(finished.all()):
                    break
                # Compiled, the position is a tensor, so that one graph serves them all; eager,
                # an int, so that attention reads only the cache's written positions.
                position = torch.tensor(T + step, device=input_ids.device) if compile else T + step
                logits = step_logits(next_token, cache, position)
        return torch.cat(tokens, dim=1)

    def _step_logits(self, token: torch.Tensor, cache: KVCache,
                     position: int | torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after `token` (B, 1), which sits at `position`."""
        return self(token, cache=cache, start=position).logits[:, -1]

    def _compiled_step(self):
        if "_compiled_step_logits" not in self.__dict__:
            self._compiled_step_logits = torch.compile(self._step_logits, fullgraph=True,
                                                       dynamic=False)
        return self._compiled_step_logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token (B, 1) from logits (B, V): greedy, temperature, top-k, nucleus."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
