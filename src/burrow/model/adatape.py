"""AdaTape (Xue et al., ICML 2023): a tape bank, adaptive tape reading (ATR), and the feed-forward
layer that gives tape tokens their own MLP.

A query vector scores the entries of a tape bank (the paper's "tape bank"), either derived from
the input ("input") or trainable ("learnable"). Each step of Adaptive Tape Reading (the paper's
ATR algorithm) takes the top-k unused entries, merges them into
one tape token by their softmax weights, masks them so that they are never read again, and moves
the query toward the token it emitted. A sample halts, ACT-style (Graves 2016), once the sum of
its steps' top weights reaches the threshold, so that a confident reader stops early and an
uncertain one reads more; the tape tokens are appended to the sequence (model/encoder.py).

The reference is google-research/scenic, scenic/projects/adatape/layers.py (TapeBank,
ATRTapeAppender, ACTFunction.act_step); where it and the paper differ, the comments say so.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.context import ForwardContext, Init
from burrow.model.mlp import dense_mlp
from burrow.model.norms import make_norm


class TapeReading(NamedTuple):
    """What ATR read for a batch; L is the number of steps taken, the longest tape in the batch.

    tape (B, L, d): the tape tokens, zero past each sample's length.
    lengths (B,) long: how many tape tokens each sample read.
    ponder (B,): each sample's remainder terms summed over the steps it took (with gradient).
    weights (B, L, k): each step's softmax weights over the entries it read, zero past the length.
    selected (B, L, k) long: the bank entries each step read, -1 past the length.
    """

    tape: torch.Tensor
    lengths: torch.Tensor
    ponder: torch.Tensor
    weights: torch.Tensor
    selected: torch.Tensor


class Halting(NamedTuple):
    """The ACT state of every sample (B,): accumulated top weights, whether it still reads,
    steps taken, summed remainder terms."""

    accumulated: torch.Tensor
    running: torch.Tensor
    lengths: torch.Tensor
    ponder: torch.Tensor

    @classmethod
    def start(cls, batch: int, device: torch.device) -> Halting:
        zeros = torch.zeros(batch, device=device)
        return cls(zeros, torch.ones(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), zeros)


def remainder_term(weights: torch.Tensor, kind: str) -> torch.Tensor:
    """One step's ponder term from its weights (B, k): "entropy" 1 - sum_i w_i^2 or "max"
    1 - max_i w_i (the reference's act_loss_type; both push the weight onto fewer entries, so
    that the top weight grows and the sample halts in fewer steps)."""
    if kind == "max":
        return 1.0 - weights.amax(-1)
    return 1.0 - weights.square().sum(-1)


def halt_step(state: Halting, weights: torch.Tensor, threshold: float, ponder: str) -> Halting:
    """One ATR step's halting (the reference's ACTFunction.act_step), for the samples
    running at its start: the step's token is kept, its remainder term added, its top weight
    accumulated; a sample whose accumulated weight reaches `threshold` stops there (>=, so a
    sum that lands exactly on the threshold halts). weights (B, k), sorted descending."""
    running = state.running
    accumulated = state.accumulated + weights[:, 0] * running
    ponder_sum = state.ponder + remainder_term(weights, ponder) * running
    return Halting(accumulated, running & (accumulated < threshold),
                   state.lengths + running.long(), ponder_sum)


def adaptive_tape_reading(query: torch.Tensor, bank: torch.Tensor, key_width: int, top_k: int,
                          max_steps: int, threshold: float, ponder: str = "entropy"
                          ) -> TapeReading:
    """ATR for a batch, every sample at once: at most max_steps steps, fewer once every
    sample has halted.

    query (B, key_width); bank, entries already normalised: (B, N, d), each sample's own (an
    input-driven bank), or (N, d), shared (a learnable one), with N >= top_k. An entry's key is
    its first key_width features (the reference splits each token into a key and the rest,
    `split_tt`); the tape token is the weighted sum of whole entries. Scores, weights and
    halting are computed in float32 whatever the autocast dtype: the halting sums are compared
    with a threshold.
    """
    B, (N, d) = query.shape[0], bank.shape[-2:]
    keys = bank[..., :key_width].float()
    used = torch.zeros(B, N, dtype=torch.bool, device=bank.device)
    state = Halting.start(B, bank.device)
    tokens, step_weights, step_selected = [], [], []
    for _ in range(max_steps):
        # A sample with no unread entry left halts too (an input bank may be smaller than
        # top_k x max_steps); checking on the host costs a sync per step, at most max_steps.
        state = state._replace(running=state.running & ~used.all(-1))
        if not bool(state.running.any()):
            break
        running = state.running[:, None]  # (B, 1)
        # Read entries are out of the running samples' reach; a halted sample's row stays
        # finite, so that its discarded softmax is not NaN.
        scores = bank_scores(keys, query.float()).masked_fill(used & running, float("-inf"))
        top_scores, index = scores.topk(top_k, dim=-1)  # (B, k), descending
        # Softmax at temperature sqrt(key width), as attention. The reference takes these
        # scores with jnp.take without an axis, which reads the first sample's scores for every
        # sample; each sample reads its own here, as the paper means.
        weights = torch.softmax(top_scores * key_width ** -0.5, dim=-1)
        chosen = bank[index] if bank.dim() == 2 else torch.gather(
            bank, 1, index[..., None].expand(-1, -1, d))  # (B, k, d)
        token = torch.einsum("bk,bkd->bd", weights.to(chosen.dtype), chosen) * running
        state = halt_step(state, weights, threshold, ponder)
        used = used | torch.zeros_like(used).scatter(1, index, running.expand_as(index))
        # The query moves halfway toward the token it read (the reference's complex_query,
        # its ImageNet default), so that the next step looks for something else.
        query = (query + token[:, :key_width]) / 2
        tokens.append(token)
        step_weights.append(weights * running)
        step_selected.append(index.masked_fill(~running, -1))
    if not tokens:  # no sample ran a step
        return TapeReading(bank.new_zeros(B, 0, d), state.lengths, state.ponder,
                           state.ponder.new_zeros(B, 0, top_k),
                           state.lengths.new_zeros(B, 0, top_k))
    return TapeReading(torch.stack(tokens, 1), state.lengths, state.ponder,
                       torch.stack(step_weights, 1), torch.stack(step_selected, 1))


def bank_scores(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(B, N): each query's inner product with the keys of its bank, (B, N, w) or shared (N, w)."""
    if keys.dim() == 2:
        return query @ keys.t()
    return torch.einsum("bnw,bw->bn", keys, query)


class TapeReader(nn.Module):
    """The tape bank and its reader: query -> tape tokens, with the ponder loss and the tape
    lengths reported through the forward context."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tape = cfg.adatape
        self.tape, self.layer = tape, tape.read_layer
        # The reference splits a token into num_heads parts and scores the first (split_tt =
        # NUM_HEADS in the ImageNet config): keys one head wide.
        self.key_width = cfg.head_size
        # One norm for query and bank: they are compared by inner product (TapeBank.norm_layer).
        self.norm = make_norm(cfg)
        if tape.bank == "input":
            # The paper's input-driven bank: the input tokens seen through a second projection (the
            # reference's parity model: Dense(one-hot input), "pre_bank").
            self.bank = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.bank = nn.Parameter(torch.empty(tape.bank_size, cfg.d_model))

    def init_weights(self, init: Init) -> None:
        if isinstance(self.bank, nn.Embedding):
            init.embedding(self.bank)
        else:  # the reference: BERT's truncated normal, std 0.02 at two sigma
            nn.init.trunc_normal_(self.bank, std=0.02, a=-0.04, b=0.04)

    def entries(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The bank: each sample's (B, T, d) from its tokens, or the shared (N, d)."""
        if isinstance(self.bank, nn.Embedding):
            if input_ids.shape[1] < self.tape.top_k:
                raise UserError(f"model.adatape.top_k={self.tape.top_k} is more than the "
                                f"{input_ids.shape[1]} entries of the input-driven bank (one "
                                "per input token); lower model.adatape.top_k")
            return self.bank(input_ids)
        return self.bank

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext
                ) -> TapeReading:
        """Read the tape of each sequence x (B, 1 + T, d), the CLS token first."""
        tape = self.tape
        # ATR's query: the CLS token, or the mean of the input tokens (the reference's
        # "token" and "gap" queries).
        query = x[:, 0] if tape.query == "cls" else x[:, 1:].mean(1)
        query = self.norm(query)[:, :self.key_width]
        bank = self.norm(self.entries(input_ids).to(x.dtype))
        reading = adaptive_tape_reading(query, bank, self.key_width, tape.top_k,
                                        tape.max_tape_len, tape.threshold, tape.ponder)
        # The reference's ponder_loss_fn: the remainder terms' mean over the batch.
        ctx.report("adatape_ponder", self.layer,
                   tape.act_loss_weight * reading.ponder.mean(), loss=True)
        if ctx.statistics:
            ctx.report("tape_length", self.layer, reading.lengths.float().mean())
        return reading


class TapeMLP(nn.Module):
    """AdaTape's feed-forward layer (registered as ffn "tape_mlp"): the model's dense MLP for
    the input positions and a second one for the tape tokens, which begin at ctx.tape_start.

    The paper gives tape tokens their own feed-forward network; the reference's ImageNet config
    leaves it off (enc_tt_mlp_dim = 0, its Encoder1DBlock "tape_mlp") and instead passes the read
    tokens once through a GLU MLP (tt_mlp_dim). We follow the paper: a second MLP of the
    model's kind and width in every block after the tape is read.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_mlp = dense_mlp(cfg, layer)
        self.tape_mlp = dense_mlp(cfg, layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        start = ctx.tape_start
        if start is None:
            return self.input_mlp(x)
        return torch.cat([self.input_mlp(x[:, :start]), self.tape_mlp(x[:, start:])], dim=1)

