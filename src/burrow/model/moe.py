"""Switch Transformer's sparse feed-forward layer (Fedus et al. 2021): a router and experts.

A router sends each token to its top-k of N expert MLPs (Switch: k = 1; GShard: k = 2). Each
expert takes at most `capacity` tokens, so that every tensor has a shape known in advance (and
expert parallelism can exchange fixed-size buffers): tokens over capacity are dropped and pass
through the block's residual connection unchanged. Dispatch and combine are a stable sort,
one index_copy and one index_add; the experts run as one batched matmul. Decoding, with a
token or two per eight experts, each token goes through its own expert only, so that the
others' weights are not read.

The router works in float32 whatever the autocast dtype ("selective precision", Switch §2.4),
and adds two losses: the load-balancing loss alpha * N * sum_i f_i * P_i (Switch eq. 4-6)
and the router z-loss, which is ST-MoE's (Zoph et al. 2022, eq. 5), not Switch's.

Switch's training recipe, each part opt-in: input jitter on the router (App. C), expert
dropout (§2.4, Table 4), and the truncated-normal init of every weight matrix (§2.4; the
experts and router always have it, model.init = "switch" gives it to the rest). With top_k = 2
the router is GShard's (Lepikhin et al. 2020, §2.2 and Algorithm 1): random routing of the
second expert in training and a balance loss over first choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.model.context import ForwardContext, Init, truncated_normal_


class Router(nn.Module):
    """Linear logits over the experts, softmax, top-k; always computed in float32.

    forward(tokens (S, d)) -> logits, probs (S, N); gates, experts (S, k); and dispatched
    (S, k), whether each assignment goes to its expert, or None when all of them do: with
    top_k = 2 in training, GShard's random routing leaves some second choices out.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.jitter, self.init_scale = cfg.moe.top_k, cfg.moe.jitter, cfg.moe.init_scale
        self.weight = nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.d_model))

    def init_weights(self, init: Init) -> None:
        truncated_normal_(self.weight, self.init_scale, self.weight.shape[1])

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Switch kept T5's setup (Raffel et al. 2020, §3.1.2: no weight decay); decaying the
        router pulls its logits to zero, so its gates, which scale each expert's output, stay
        near 1/N (switch-micro, 6,000 steps: mean top-1 gate 0.35 with decay, 0.39 without, and
        a step speed-up of 1.36x against 1.40x; BENCHMARKS.md)."""
        return [self.weight]

    def forward(self, tokens: torch.Tensor):
        with torch.autocast(tokens.device.type, enabled=False):
            x = tokens.float()
            if self.training and self.jitter > 0:
                # Switch App. C (Table 11), "input jitter": each element of the router's input
                # times U(1 - eps, 1 + eps), in training only, as Mesh TensorFlow's
                # _switch_gating (multiplicative_jitter on the gate inputs). The router's
                # pseudocode in App. F adds the noise to the logits instead; the text ("noise
                # on the incoming representation") and the code multiply the input. Out of
                # place: the experts read the tokens unchanged.
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(x, self.weight.float())
            probs = logits.softmax(dim=-1)
            gates, experts = probs.topk(self.top_k, dim=-1)
            if self.top_k > 1:  # GShard: the k gates are renormalised to sum to one
                gates = gates / gates.sum(dim=-1, keepdim=True)
            dispatched = None
            if self.training and self.top_k == 2:
                # GShard §2.2 "random routing", Algorithm 1 lines 16-19: the second expert is
                # used if 2 * g2 > U(0, 1), g2 its renormalised gate (at most 1/2), so a
                # small second gate rarely costs a slot. In evaluation every second choice
                # is used: the paper gives the rule for training; GShard's Lingvo code
                # defaults to using both ("all").
                second = 2 * gates[:, 1] > torch.rand_like(gates[:, 1])
                dispatched = torch.stack([torch.ones_like(second), second], dim=1)
        return logits, probs, gates, experts, dispatched


class Experts(nn.Module):
    """N independent MLPs (SwiGLU or GELU, as the dense ones) held as stacked weights.

    forward takes one buffer per expert, (N, C, d), and returns (N, C, d): a batched matmul.
    Under expert parallelism this module holds only this rank's experts and parallel/ wraps
    its forward with the all-to-all exchange; nothing here changes.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, ff = cfg.moe.num_experts, cfg.d_model, cfg.expert_ffn_size
        self.gated, self.init_scale = cfg.ffn == "swiglu", cfg.moe.init_scale
        self.dropout = cfg.moe.expert_dropout
        self.up_proj = nn.Parameter(torch.empty(n, d, ff))
        self.gate_proj = nn.Parameter(torch.empty(n, d, ff)) if self.gated else None
        self.down_proj = nn.Parameter(torch.empty(n, ff, d))

    def init_weights(self, init: Init) -> None:
        for weight in (self.up_proj, self.gate_proj, self.down_proj):
            if weight is not None:
                truncated_normal_(weight, self.init_scale, weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (N, C, d): the tokens each expert received, zero rows where it has room left
        return self._mlp(x, self.gate_proj, self.up_proj, self.down_proj)  # (N, C, d)

    def chosen(self, x: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
        """Each row of x (A, d) through the expert it was assigned (expert_of, A): the A
        chosen experts' weights are gathered, the others' not read at all.

        For a few tokens at inference (decoding), where forward would read every expert's
        weights to fill one or two of its slots. Rows the capacity dropped are computed too;
        the combine's weight (gate x kept) zeroes them. Shapes do not depend on the routing,
        so a compiled decode step takes this path as well.
        """
        if len(expert_of) == 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            # One assignment, on a CPU, eager: its expert's weights as they are, not a copy.
            # (Reading the index is free here; on a GPU it would wait for the device, and a
            # compiled step cannot branch on it.)
            expert = int(expert_of[0])
            gate = None if self.gate_proj is None else self.gate_proj[expert]
            return self._mlp(x, gate, self.up_proj[expert], self.down_proj[expert])
        rows = x[:, None]  # (A, 1, d)
        gate = None if self.gate_proj is None else self.gate_proj[expert_of]  # (A, d, ff)
        return self._mlp(rows, gate, self.up_proj[expert_of], self.down_proj[expert_of])[:, 0]

    def _mlp(self, x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor,
             down: torch.Tensor) -> torch.Tensor:
        """The MLP on x (..., C, d) with weights (..., d, ff) and (..., ff, d)."""
        hidden = F.silu(x @ gate) * (x @ up) if self.gated else F.gelu(x @ up)
        if self.dropout > 0:
            # Switch §2.4 "expert dropout": dropout "at the interim feed-forward computation"
            # of each expert, where T5 puts its FFN dropout, between wi and wo (Table 4: 0.4).
            hidden = F.dropout(hidden, self.dropout, self.training)
        return hidden @ down


class SwitchMLP(nn.Module):
    """The sparse feed-forward layer: route, dispatch to capacity, run experts, combine.

    forward(x (B, T, d), ctx) -> y (B, T, d). y is zero for a dropped token, so the block's
    residual passes it on unchanged (Switch §2.2). It reports through ctx two losses,
    balance_loss (alpha * N * sum_i f_i * P_i, Switch eq. 4) and router_z_loss (ST-MoE eq. 5),
    both already times their coefficients, and two statistics: dropped, the fraction of
    assignments over capacity, and expert_load, each expert's share f_i (N,). Decoding
    (ctx.statistics off) skips their ~15 small operators.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        moe = cfg.moe
        self.num_experts, self.top_k, self.dropless = moe.num_experts, moe.top_k, moe.dropless
        self.capacity_factor, self.eval_capacity_factor = (moe.capacity_factor,
                                                           moe.eval_capacity_factor)
        self.balance_coefficient, self.z_coefficient = moe.balance_loss, moe.router_z_loss
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # Set by parallel/ under expert parallelism: the largest of the ranks' dropless
        # capacities, so that every rank exchanges buffers of the same size.
        self.agree_capacity: Callable[[int], int] | None = None

    def capacity(self, num_tokens: int, counts: torch.Tensor) -> int:
        """Slots per expert: factor x k x tokens / N rounded up (Switch eq. 3), or the
        busiest expert's load when dropless."""
        if not self.dropless:  # the same on every rank: they all see batches of one size
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            return max(1, math.ceil(factor * self.top_k * num_tokens / self.num_experts))
        capacity = int(counts.max())  # depends on this rank's routing
        if self.agree_capacity is not None:
            capacity = self.agree_capacity(capacity)
        return max(capacity, 1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, d = x.shape
        tokens = x.reshape(B * T, d)  # (S, d)
        S, N, k = B * T, self.num_experts, self.top_k
        logits, probs, gates, experts, dispatched = self.router(tokens)
        if (S == 1 and not ctx.statistics and dispatched is None
                and self.reads_chosen_experts_only(k)):
            # One token (decoding one sequence): its k assignments go to k different experts,
            # each with room for it, so there is no queue to sort and nothing to drop.
            out = self.experts.chosen(tokens.expand(k, d), experts[0])  # (k, d)
            y = (gates[0, :, None].to(out.dtype) * out).sum(0)
            return y.view(B, T, d).to(x.dtype)
        # Assignments in priority order: every token's first choice before any second choice
        # (GShard), then by position in the batch (Switch): (k*S,)
        expert_of = experts.t().reshape(-1)
        gate_of = gates.t().reshape(-1)
        token_of = torch.arange(S, device=x.device).repeat(k)
        # The queue each assignment joins: its expert's, or, for a second choice that random
        # routing left out, a spare queue N that takes no expert's capacity (GShard §2.2).
        queue_of = expert_of
        if dispatched is not None:
            dispatched = dispatched.t().reshape(-1)
            queue_of = torch.where(dispatched, expert_of, N)
        # (N + 1,) assignments per queue; scatter_add, unlike bincount, has a static shape
        counts = torch.zeros(N + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, queue_of, torch.ones_like(queue_of))
        capacity = self.capacity(S, counts[:N])
        # Each assignment's place in its queue: a stable sort keeps the priority.
        order = torch.argsort(queue_of, stable=True)
        first = torch.cumsum(counts, 0) - counts  # (N + 1,) where each queue starts
        place_sorted = torch.arange(k * S, device=x.device) - first[queue_of[order]]
        place = torch.empty_like(place_sorted).scatter_(0, order, place_sorted)
        kept = place < capacity
        if dispatched is not None:
            kept = kept & dispatched
        if self.reads_chosen_experts_only(k * S):
            out = self.experts.chosen(tokens[token_of], expert_of)  # (k*S, d)
        else:
            # Dropped assignments all write to one spare row past the experts' slots.
            slot = torch.where(kept, expert_of * capacity + place, N * capacity)
            buffer = tokens.new_zeros(N * capacity + 1, d).index_copy(0, slot, tokens[token_of])
            out = self.experts(buffer[:-1].view(N, capacity, d)).reshape(N * capacity, d)
            out = torch.cat([out, out.new_zeros(1, d)])[slot]  # the spare row returns zeros
        weight = (gate_of * kept).to(out.dtype)[:, None]
        y = tokens.new_zeros(S, d, dtype=out.dtype).index_add(0, token_of, out * weight)
        if ctx.statistics:
            self._report(ctx, logits, probs, experts[:, 0], counts[:N], kept)
        return y.view(B, T, d).to(x.dtype)

    def reads_chosen_experts_only(self, assignments: int) -> bool:
        """At most a quarter as many assignments as experts, at inference: decoding. The
        capacity buffers would make every expert read its weights for a token or two;
        `Experts.chosen` gathers the chosen experts' weights, copying them once (measured on a
        CPU, switch-small decoding: ahead at 1 and 2 assignments of 8 experts, behind the
        buffers at 4 uncompiled). Not under expert parallelism, where every rank must join the
        all-to-all (agree_capacity marks it)."""
        return (4 * assignments <= self.num_experts and not torch.is_grad_enabled()
                and self.agree_capacity is None)

    def _report(self, ctx: ForwardContext, logits: torch.Tensor, probs: torch.Tensor,
                first_choice: torch.Tensor, counts: torch.Tensor, kept: torch.Tensor) -> None:
        # Switch eq. 4-6: f_i the fraction of tokens whose first choice is expert i (no
        # gradient), P_i the mean router probability of expert i; N * sum_i f_i * P_i = 1 when
        # both are uniform. With top-2, GShard's c_e / S counts first choices only, before
        # capacity (Algorithm 1, lines 4-13), as Mesh TensorFlow's _top_2_gating (density_1,
        # with this normalisation).
        N = self.num_experts
        first = torch.zeros(N, device=probs.device).scatter_add_(
            0, first_choice, torch.ones_like(first_choice, dtype=torch.float))
        balance = self.balance_coefficient * N * (first / len(first_choice) * probs.mean(0)).sum()
        # ST-MoE eq. 5, not part of Switch: router_z_loss = 0 leaves it out.
        z_loss = self.z_coefficient * torch.logsumexp(logits, dim=-1).square().mean()
        ctx.report("balance_loss", self.layer, balance, loss=True)
        ctx.report("router_z_loss", self.layer, z_loss, loss=True)
        # Of the assignments sent to an expert (random routing's left-out ones are not), the
        # share over capacity; each expert's share of them.
        sent = counts.sum()
        ctx.report("dropped", self.layer, 1.0 - kept.sum() / sent)
        ctx.report("expert_load", self.layer, counts.float() / sent)
