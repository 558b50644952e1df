"""The Universal Transformer with adaptive computation time (Dehghani et al. 2018; Graves 2016),
as a sequence classifier beside the encoder of model/encoder.py.

One block's weights are applied again and again (the recurrence is over depth, not time). Before
each step t every position i gets its coordinate embedding, the sinusoids of i plus those of t
(UT §2.1, eq. 1). A halting unit h = sigmoid(w . s + b) reads each position's state as it enters
a step; each position stops on its own (ACT, Graves 2016 §2):

    N = min{n : h_1 + ... + h_n >= 1 - eps}, at most max_steps     (the step it halts at)
    R = 1 - (h_1 + ... + h_{N-1})                                   (its remainder)
    p_n = h_n for n < N, p_N = R                                    (weights summing to 1)
    output = sum_n p_n s_n                                          (s_n: the state step n made)
    ponder cost = tau * mean over positions of (N + R)              (added to the loss)

Halted positions keep passing through the shared block while others run, as keys and values for
them (the UT's states are computed in parallel), but their output no longer changes; the loop
ends when every position of the batch has halted. Defaults as tensor2tensor's Universal
Transformer (models/research/universal_transformer.py, `update_hparams_for_universal_transformer`):
eps 0.01, tau 0.01, halting bias initialised to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.block import make_block
from burrow.model.context import AuxTerm, ForwardContext, Init
from burrow.model.encoder import ClassifierOutput
from burrow.model.norms import make_norm
from burrow.model.positions import sinusoids


class Halting:
    """ACT's running account for every position: how much halting probability it has used,
    its remainder R, its step count N, whether it has halted (Graves 2016 §2)."""

    def __init__(self, shape: torch.Size, device: torch.device, epsilon: float = 0.01):
        self.threshold = 1.0 - epsilon
        self.total = torch.zeros(shape, device=device)  # sum of the weights given so far
        self.remainders = torch.zeros(shape, device=device)  # R
        self.steps = torch.zeros(shape, device=device)  # N
        self.halted = torch.zeros(shape, dtype=torch.bool, device=device)

    def weights(self, halt: torch.Tensor, last: bool) -> torch.Tensor:
        """The weight p_n of this step's state at each position, given its halting unit's
        output `halt` (h_n): h_n where it runs on, its remainder where h_n would take its total
        to 1 - eps (or where this is the `last` step allowed), 0 where it had halted."""
        running = ~self.halted
        halts = running & ((self.total + halt >= self.threshold) | last)
        remainder = torch.where(halts, 1.0 - self.total, 0.0)
        weight = torch.where(running & ~halts, halt, remainder)
        self.steps = self.steps + running
        self.remainders = self.remainders + remainder
        self.total = self.total + weight
        self.halted = self.halted | halts
        return weight

    def done(self) -> bool:
        return bool(self.halted.all())

    def ponder_cost(self) -> torch.Tensor:
        """N + R at each position: differentiable through R only (N is a count)."""
        return self.steps + self.remainders


def coordinates(length: int, step: int, dim: int, device: torch.device) -> torch.Tensor:
    """UT §2.1's coordinate embedding (length, dim): the sinusoids of each position plus those
    of the (1-based) step, the sines in the first half of the channels, the cosines in the
    second (positions.sinusoids' layout)."""
    positions = sinusoids(torch.arange(length, device=device), dim)
    return positions + sinusoids(torch.tensor([step], device=device), dim)


class UniversalTransformer(nn.Module):
    """A bidirectional Universal Transformer classifier: a learned class vector before the
    tokens, one shared block applied for up to `max_steps` steps with per-position ACT, a
    final norm, a linear head on the class position.

    cfg gives the block (d_model, n_heads, d_ff, ffn, norm); cfg.n_layers is the default
    max_steps, and every step reuses the same weights, so the parameter count does not depend
    on it. cfg.positions is not used: the coordinate embeddings take its place.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = 2, *, max_steps: int | None = None,
                 ponder_cost: float = 0.01, epsilon: float = 0.01, halting_bias: float = 1.0):
        super().__init__()
        cfg.validate()
        self.max_steps = cfg.n_layers if max_steps is None else max_steps
        if self.max_steps < 1 or num_classes < 1:
            raise UserError(f"a Universal Transformer needs max_steps >= 1 and num_classes >= "
                            f"1, got {self.max_steps} and {num_classes}")
        if not 0.0 < epsilon < 1.0 or ponder_cost < 0:
            raise UserError(f"ACT needs 0 < epsilon < 1 and ponder_cost >= 0, got {epsilon} and "
                            f"{ponder_cost}")
        if cfg.positions == "relative" or cfg.d_model % 2:
            raise UserError("the Universal Transformer adds sinusoidal coordinates: it needs an "
                            "even model.d_model and no relative positions (model.positions)")
        self.cfg, self.ponder_weight, self.epsilon = cfg, ponder_cost, epsilon
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.cls = nn.Parameter(torch.zeros(cfg.d_model))
        self.block = make_block(cfg, 0)
        self.halt = nn.Linear(cfg.d_model, 1)
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, num_classes)
        self.init_weights(halting_bias)

    @torch.no_grad()
    def init_weights(self, halting_bias: float = 1.0) -> None:
        """The block's parts by their own init_weights (model/context.py's table, with the
        residual scale of max_steps layers), the embedding as the language model's; the class
        vector and the head zero, as the encoder's (model/encoder.py); the halting unit's bias
        `halting_bias` (tensor2tensor: 1), so that early on positions halt after a step or
        two."""
        init = Init(self.cfg.init, self.max_steps, self.cfg.moe.init_scale)
        init.embedding(self.embed)
        for module in [*self.block.modules(), self.norm]:
            if hasattr(module, "init_weights"):
                module.init_weights(init)
        init.linear(self.halt)
        nn.init.constant_(self.halt.bias, halting_bias)
        nn.init.zeros_(self.cls)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> ClassifierOutput:
        """Logits (B, num_classes) for token ids (B, T); with labels (B,), the loss:
        cross-entropy + the ponder cost."""
        B, T = input_ids.shape
        state = torch.cat([self.cls.expand(B, 1, -1), self.embed(input_ids)], dim=1)  # (B, S, d)
        S, device = T + 1, input_ids.device
        ctx = ForwardContext(torch.arange(S, device=device), causal=False)
        halting = Halting(state.shape[:2], device, self.epsilon)
        output = torch.zeros_like(state)
        for step in range(self.max_steps):
            state = state + coordinates(S, step + 1, self.cfg.d_model, device)
            halt = torch.sigmoid(self.halt(state)).squeeze(-1)  # (B, S)
            weight = halting.weights(halt, last=step == self.max_steps - 1)
            state = self.block(state, ctx)
            output = output + weight.unsqueeze(-1) * state
            if halting.done():
                break
        logits = self.head(self.norm(output[:, 0]))
        ponder = self.ponder_weight * halting.ponder_cost().mean()
        aux = [AuxTerm("ponder", 0, ponder, True),
               AuxTerm("ponder_steps", 0, halting.steps.mean().detach(), False)]
        loss = cross_entropy = None
        if labels is not None:
            cross_entropy = F.cross_entropy(logits.float(), labels)
            loss = cross_entropy + ponder
        return ClassifierOutput(logits, loss, cross_entropy, aux, None)
