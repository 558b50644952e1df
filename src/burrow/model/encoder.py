"""A bidirectional transformer encoder that classifies sequences, built from burrow's blocks; with
model.adatape, AdaTape's tape tokens are appended to its sequence (Xue et al. 2023).

    [CLS] x_1 ... x_T  -> blocks (every position sees every other) -> norm(CLS) -> head
    with AdaTape, before block adatape.read_layer:
    [CLS] x_1 ... x_T t_1 ... t_L   (t_j read by ATR; sample b's t_j past its length masked out)

The reference models are scenic's AdaTapeViT and AdaTapeParity (projects/adatape/adatape_vit/
adatape_vit.py): a CLS vector (zeros at init) before the inputs, a head on the final-normed CLS
(zeros at init), cross-entropy plus the ponder loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.model.adatape import TapeReader
from burrow.model.block import make_block
from burrow.model.context import AuxTerm, ForwardContext, Init
from burrow.model.norms import make_dropout, make_norm
from burrow.model.positions import rotary_tables


@dataclass
class ClassifierOutput:
    """What EncoderClassifier.forward returns.

    logits (B, C). loss: cross_entropy + every loss term the parts reported (AdaTape's
    adatape_ponder), what is optimised; None without labels, as cross_entropy (mean nats per
    sequence). aux: the named terms reported (model/context.py). tape_lengths (B,) long: the
    tape tokens each sequence read, None without AdaTape.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    cross_entropy: torch.Tensor | None
    aux: list[AuxTerm]
    tape_lengths: torch.Tensor | None


class EncoderClassifier(nn.Module):
    """A sequence classifier: token ids (B, T) -> logits over num_classes (B, C).

    Positions: "learned" (a table of cfg.max_seq_len rows; the CLS takes position 0, so T + 1
    <= max_seq_len) or "rope".

    `whole_input=T` embeds each sequence of exactly T tokens as one token instead of T: a linear
    map of its T one-hot vectors, as the reference's parity model does (AdaTapeParity:
    `Dense(hidden)` of the flattened one-hot input), so that the encoder reads [CLS, x] and,
    with AdaTape, the tape; the input-driven bank still has an entry per input token.

    Tape tokens get no learned position: the reference appends them
    after the position embeddings were added (before block 1, in its ImageNet config); under
    rope they all sit at one position past the last input, so that no tape token is nearer to
    another or to an input than the rest, as without positions.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, *, whole_input: int | None = None):
        super().__init__()
        cfg.validate()
        if cfg.positions == "relative":
            raise UserError("model.positions='relative' is causal-only here; an encoder takes "
                            "'learned' or 'rope'")
        if cfg.retro is not None:
            raise UserError("the encoder classifier does not retrieve: unset model.retro")
        if num_classes < 1:
            raise UserError(f"an encoder classifier needs at least one class, got {num_classes}")
        if whole_input is not None and whole_input < 1:
            raise UserError(f"whole_input must be a sequence length >= 1, got {whole_input}")
        self.cfg, self.whole_input = cfg, whole_input
        d = cfg.d_model
        self.embed = (nn.Embedding(cfg.vocab_size, d) if whole_input is None
                      else nn.Linear(whole_input * cfg.vocab_size, d))
        self.pos_embed = nn.Embedding(cfg.max_seq_len, d) if cfg.positions == "learned" else None
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.drop = make_dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, layer) for layer in range(cfg.n_layers))
        self.tape_reader = TapeReader(cfg) if cfg.adatape is not None else None
        self.norm = make_norm(cfg)
        self.head = nn.Linear(d, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Token and position tables as the language model's (model/context.py's Init), each
        part and the tape reader by its own init_weights; the CLS vector and the head zero, as
        the reference's (`cls`, `output_projection`), so that training starts at log C."""
        init = Init(self.cfg.init, self.cfg.n_layers, self.cfg.moe.init_scale)
        if self.whole_input is None:
            init.embedding(self.embed)
        else:
            init.linear(self.embed)
        if self.pos_embed is not None:
            init.embedding(self.pos_embed)
        nn.init.zeros_(self.cls)
        modules = [*self.blocks.modules(), self.norm]
        if self.tape_reader is not None:
            modules += self.tape_reader.modules()
        for module in modules:
            if hasattr(module, "init_weights"):
                module.init_weights(init)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> ClassifierOutput:
        """Logits for each sequence of input_ids (B, T); the loss when labels (B,) are given."""
        batch, length = input_ids.shape
        x = self.embed_inputs(input_ids)  # (B, T, d), or (B, 1, d) for a whole input
        if x.shape[1] >= self.cfg.max_seq_len:  # the CLS token takes a position too
            raise UserError(f"{length} tokens and the CLS token exceed the encoder's "
                            f"{self.cfg.max_seq_len} positions (model.max_seq_len); raise "
                            f"model.max_seq_len to at least {length + 1}")
        positions = torch.arange(x.shape[1] + 1, device=input_ids.device)
        # The CLS token first: (B, 1 + T, d)
        x = torch.cat([self.cls.expand(batch, -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        ctx = ForwardContext(positions, causal=False)
        if self.cfg.positions == "rope":
            ctx.rotary = rotary_tables(self.cfg, positions)
        tape_lengths = None
        for layer, block in enumerate(self.blocks):
            if self.tape_reader is not None and layer == self.cfg.adatape.read_layer:
                x, tape_lengths = self.append_tape(x, input_ids, ctx)
            x = block(x, ctx)
        logits = self.head(self.norm(x[:, 0]))
        loss = cross_entropy = None
        if labels is not None:
            cross_entropy = F.cross_entropy(logits.float(), labels)
            terms = [term.value for term in ctx.aux if term.is_loss]
            loss = cross_entropy + sum(terms) if terms else cross_entropy
        return ClassifierOutput(logits, loss, cross_entropy, ctx.aux, tape_lengths)

    def embed_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d): a vector per token; or (B, 1, d): one for the whole sequence."""
        if self.whole_input is None:
            return self.embed(input_ids)
        if input_ids.shape[1] != self.whole_input:
            raise UserError(f"this encoder reads whole sequences of {self.whole_input} tokens, "
                            f"got {input_ids.shape[1]}; build it for that length")
        one_hot = F.one_hot(input_ids, self.cfg.vocab_size).flatten(1)  # (B, T * V)
        return self.embed(one_hot.to(self.embed.weight.dtype))[:, None]

    def append_tape(self, x: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read each sequence's tape and append it to x: (B, S + L, d) and the lengths (B,).

        The tape is as long as the longest one read; a key mask hides each sequence's tape
        tokens past its own length from every query, so what a sequence computes does not
        depend on the other sequences of its batch (the reference's update_input_mask)."""
        reading = self.tape_reader(x, input_ids, ctx)
        B, S, _ = x.shape
        L = reading.tape.shape[1]
        tape_steps = torch.arange(L, device=x.device)
        keys_seen = torch.cat([torch.ones(B, S, dtype=torch.bool, device=x.device),
                               tape_steps < reading.lengths[:, None]], dim=1)  # (B, S + L)
        ctx.visible = keys_seen[:, None, None, :]
        ctx.tape_start = S
        if ctx.rotary is not None:
            positions = torch.cat([ctx.positions, torch.full_like(tape_steps, S)])
            ctx.positions, ctx.rotary = positions, rotary_tables(self.cfg, positions)
        return torch.cat([x, reading.tape.to(x.dtype)], dim=1), reading.lengths
