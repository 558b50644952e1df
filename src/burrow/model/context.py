"""What every block part receives besides its input: one forward pass's context, the channel
for auxiliary losses and statistics, and the initialisation scheme.

A part is called as `part(x, ctx)`. The context carries what all layers of one pass share
(positions, rotary tables, the KV cache, the attention mask of a cached pass) and collects what
parts report: named losses, which the model adds to its objective, and statistics, which the
trainer logs without knowing which kind of part made them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn


class AuxTerm(NamedTuple):
    """One named quantity a part reported in a forward pass.

    A loss term (`is_loss`) is a scalar already multiplied by its coefficient: the model adds it
    to the objective as it is. Any other term is a statistic without gradient (a scalar or a
    vector, e.g. each expert's share of the tokens) that the trainer averages and logs.
    """

    name: str
    layer: int
    value: torch.Tensor
    is_loss: bool


class ForwardContext:
    """What the layers of one forward pass share.

    positions (T,): the absolute positions of the pass's tokens, `start`, start + 1, ...
    start: how many tokens the cache already holds; a 0-dim tensor in a compiled decode step.
    rotary: RoPE's (cos, signed sin) tables for `positions`, each (T, D), or None.
    cache: the KV cache of a generation (infer/cache.py), or None in training.
    visible (T, S): which cached keys each query may attend to; or (B, 1, 1, S), which keys
        every query of a sequence may attend to (AdaTape's tape lengths, model/encoder.py);
        None where attention is simply causal or sees every key.
    causal: whether a query attends to the keys before it only (a language model) or to all
        of them (an encoder: AdaTape's, a Universal Transformer).
    tape_start: where AdaTape's tape tokens begin in the sequence (model/adatape.py), set by
        the encoder once it has read them; None before, and in a model without a tape.
    statistics: whether parts should compute the statistics they report; off when decoding,
        which has no use for them.
    neighbours (B, C, k, r): RETRO's retrieved token ids, k neighbours of r tokens for each of
        the C complete chunks of the sequence (model/retro.py), or None: no retrieval, and
        chunked cross-attention adds nothing.
    embed: the model's token embedding, which RETRO's encoder shares (§2.4).
    encoded_neighbours (B, n, k, r, d'): the neighbours as the encoder leaves them, of the
        chunks this pass's positions attend to (all C without a cache), set by the first
        retrieval layer's part for the later ones; None before.
    retro_cache: what RETRO keeps between the passes of a generation (model/retro.py,
        RetroCache; the KV cache's `retro`), when a cached pass has neighbours; else None.
    aux: what the parts reported, in order.

    A plain object, not a dataclass or a container: wrappers such as FSDP copy the dataclasses
    and lists among a module's arguments, and the parts' reports must reach this one.
    """

    def __init__(self, positions: torch.Tensor, start: int | torch.Tensor = 0, *,
                 rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: Any = None,
                 visible: torch.Tensor | None = None, statistics: bool = True,
                 neighbours: torch.Tensor | None = None, embed: nn.Module | None = None,
                 retro_cache: Any = None, causal: bool = True):
        self.positions, self.start, self.rotary = positions, start, rotary
        self.causal = causal
        self.tape_start: int | None = None
        self.cache, self.visible, self.statistics = cache, visible, statistics
        self.neighbours, self.embed, self.retro_cache = neighbours, embed, retro_cache
        self.encoded_neighbours: torch.Tensor | None = None
        self.aux: list[AuxTerm] = []

    def report(self, name: str, layer: int, value: torch.Tensor, *, loss: bool = False) -> None:
        """Add a named loss term (added to the objective) or statistic (logged) of `layer`."""
        self.aux.append(AuxTerm(name, layer, value if loss else value.detach(), loss))


def truncated_normal_(weight: torch.Tensor, scale: float, fan_in: int) -> None:
    """Switch §2.4: elements of N(0, sigma^2), sigma = sqrt(scale / fan_in), values beyond two
    sigma drawn again (footnote 6; TensorFlow's truncated_normal, which Mesh TensorFlow's
    VarianceScalingInitializer calls). sigma is the untruncated normal's: the values' own
    standard deviation is 0.88 sigma."""
    std = math.sqrt(scale / fan_in)
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class Init:
    """The initialisation scheme every module applies to its own tensors (`init_weights`).

    tensor                      init="gpt2"            init="fan_in" (PaLM §2)  init="switch"
    embeddings                  N(0, 0.02)             N(0, 1)                  N(0, 1)
    linear layers               N(0, 0.02)             N(0, 1/sqrt(fan_in))     TN(s / fan_in)
    residual outputs (o, down)  N(0, 0.02/sqrt(2L))    N(0, 1/sqrt(fan_in))     TN(s / fan_in)
    biases                      0                      0                        0
    TN(s / fan_in): Switch §2.4, every weight matrix drawn from N(0, s / fan_in) truncated at
    two standard deviations, s = model.moe.init_scale (0.1). The rule is for matrices with a
    fan-in; an embedding table is looked up, not multiplied, and Mesh TensorFlow, the paper's
    code, draws it from N(0, 1) (layers.embedding_weights), the logits of a tied table scaled
    by d^-1/2 (VocabEmbedding.hidden_to_logits), as with "fan_in".
    Parts with their own rule (Switch's experts and router, which are TN(s / fan_in) whatever
    the kind, Transformer-XL's u and v, norms) say so in their own init_weights.
    """

    def __init__(self, kind: str, n_layers: int, scale: float = 0.1):
        self.kind, self.scale = kind, scale
        # GPT-2: the residual stream's variance grows with each of the 2L residual additions.
        self.residual_std = 0.02 / math.sqrt(2 * n_layers)

    def linear(self, layer: nn.Linear, residual: bool = False) -> None:
        """A linear layer's weight, and its bias to 0; `residual`: it writes to the residual
        stream (attention's output, the MLP's down projection)."""
        if self.kind == "switch":
            truncated_normal_(layer.weight, self.scale, layer.in_features)
        elif self.kind == "fan_in":
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        else:
            nn.init.normal_(layer.weight, std=self.residual_std if residual else 0.02)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)

    def embedding(self, table: nn.Embedding) -> None:
        nn.init.normal_(table.weight, std=0.02 if self.kind == "gpt2" else 1.0)
