"""What a transformer block is made of: the registry of block parts and what each one costs.

A block is a list of residual sublayers chosen per layer when the model is built
(`ModelConfig.layer_spec`): a token mixer (attention), optional extra sublayers after it
(RETRO's chunked cross-attention, for one), and a feed-forward layer (a dense MLP, Switch
experts). Each kind of part is registered here once, under its role and name, with two things:

- `module`: the nn.Module class that implements it (or a function that builds one), or
  "package.module:name" to be imported when a model is first built, so that this file and the
  configs stay free of torch;
- `num_params(cfg, layer, active)`: its exact parameter count, arithmetic only, so that
  `ModelConfig.num_params()` and the FLOP counts (flops.py) serve a 540B preset without
  allocating anything, and without importing torch.

A part's module is built as `module(cfg, layer)` and called as `part(x, ctx)`, with x (B, T, d)
already normalised by the block and ctx the pass's ForwardContext (model/context.py); it returns
(B, T, d), which the block adds to the residual stream. A part may report named losses and
statistics through `ctx.report(...)`. Adding a kind is one file (its module) and one call to
`register` with its parameter count (see docs/architecture.md); tests/test_blocks.py registers
one from outside the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.config import ModelConfig

ROLES = ("mixer", "extra", "ffn")

ParamCount = Callable[["ModelConfig", int, bool], int]


@dataclass(frozen=True)
class LayerSpec:
    """The parts of one block: its mixer, extra sublayers after it (in order), its feed-forward."""

    mixer: str = "attention"
    ffn: str = "mlp"
    extras: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.extras, (list, str)):  # from YAML: a list (or one name)
            object.__setattr__(self, "extras", (self.extras,) if isinstance(self.extras, str)
                               else tuple(self.extras))

    def parts(self) -> list[tuple[str, str]]:
        """(role, kind) of each sublayer, in the order the block applies them."""
        return ([("mixer", self.mixer)] + [("extra", name) for name in self.extras]
                + [("ffn", self.ffn)])

    def to_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "ffn": self.ffn, "extras": list(self.extras)}


@dataclass(frozen=True)
class PartKind:
    """One registered kind of block part."""

    role: str
    name: str
    module: type | str
    num_params: ParamCount
    # One line for `burrow presets` and error messages.
    description: str = ""

    def module_class(self) -> Callable[..., Any]:
        """The nn.Module class (or builder), imported on first use when registered by name."""
        if isinstance(self.module, str):
            path, _, name = self.module.partition(":")
            return getattr(importlib.import_module(path), name)
        return self.module


_KINDS: dict[tuple[str, str], PartKind] = {}


def register(role: str, name: str, module: type | str, num_params: ParamCount,
             description: str = "") -> PartKind:
    """Make `name` a kind of block part for `role` ("mixer", "extra" or "ffn").

    Registering a name again replaces it (a test or a notebook may redefine its part).
    """
    if role not in ROLES:
        raise UserError(f"block part role {role!r} is not one of {', '.join(ROLES)}")
    kind = PartKind(role, name, module, num_params, description)
    _KINDS[role, name] = kind
    return kind


def kind(role: str, name: str) -> PartKind:
    """The registered kind, or UserError listing the kinds there are for the role."""
    try:
        return _KINDS[role, name]
    except KeyError:
        known = ", ".join(sorted(n for r, n in _KINDS if r == role)) or "none"
        raise UserError(f"no {role} block part called {name!r}; registered: {known}") from None


def kinds(role: str | None = None) -> list[PartKind]:
    """Every registered kind (of one role)."""
    return [k for k in _KINDS.values() if role is None or k.role == role]


def norm_params(cfg: ModelConfig) -> int:
    """One normalisation layer: a gain per channel, and a bias for a LayerNorm with biases."""
    return cfg.d_model * (1 + (cfg.norm == "layernorm" and cfg.bias))


def block_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """Block `layer`: its parts and their pre-norms (one shared by PaLM's parallel mixer and
    feed-forward; one per sublayer in a serial block)."""
    spec = cfg.layer_spec(layer)
    parts = spec.parts()
    norms = 1 if cfg.block == "parallel" else len(parts)
    return norms * norm_params(cfg) + sum(kind(role, name).num_params(cfg, layer, active)
                                          for role, name in parts)


# -- the built-in parts' parameter counts ----------------------------------------------------

def attention_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """q, k, v, o projections (biases when cfg.bias), and Transformer-XL's W_R, u and v (Dai et
    al. 2019, §3.3) with relative positions. Module: model/attention.py, Attention."""
    d, heads, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    total = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    total += int(cfg.bias) * (heads * hd + 2 * kv * hd + d)
    if cfg.positions == "relative":
        total += d * heads * hd + 2 * heads * hd
    return total


def mlp_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """SwiGLU's gate, up and down, or the GELU MLP's up and down. Module: model/mlp.py."""
    ff, d = cfg.ffn_size, cfg.d_model
    if cfg.ffn == "swiglu":
        return 3 * d * ff + int(cfg.bias) * (2 * ff + d)
    return 2 * d * ff + int(cfg.bias) * (ff + d)


def switch_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """Router (d x N) and N expert MLPs without biases; `active`: the top_k experts a token
    goes through (Switch: FLOPs follow active, not total, parameters). Module: model/moe.py."""
    matrices = 3 if cfg.ffn == "swiglu" else 2
    experts = cfg.moe.top_k if active else cfg.moe.num_experts
    router = cfg.d_model * cfg.moe.num_experts
    return router + experts * matrices * cfg.d_model * cfg.expert_ffn_size


def tape_mlp_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """AdaTape's feed-forward layer: the dense MLP for the input positions and a second one
    for the tape tokens; `active`: a token goes through one of them. Module: model/adatape.py,
    TapeMLP."""
    return mlp_params(cfg, layer) * (1 if active else 2)


def cross_attention_params(query_width: int, key_width: int, inner: int, bias: bool) -> int:
    """Attention whose queries (and output) have one width and keys and values another: q and
    o of query_width x inner, k and v of key_width x inner. Module: model/retro.py."""
    return 2 * query_width * inner + 2 * key_width * inner + int(bias) * (3 * inner + query_width)


def retro_encoder_params(cfg: ModelConfig) -> int:
    """RETRO's neighbour encoder (§2.4): the decoder's embedding, projected to the encoder's
    width where it differs; per layer bidirectional self-attention, cross-attention to the
    retrieving chunk's activations (width d_model) and an MLP, each behind a norm; a final
    norm. Module: model/retro.py, NeighbourEncoder."""
    encoder = cfg.retro_encoder()
    width, d = encoder.d_model, cfg.d_model
    inner = encoder.n_heads * encoder.head_size
    project = 0 if width == d else d * width + int(cfg.bias) * width
    layer = (3 * norm_params(encoder) + cross_attention_params(width, width, inner, cfg.bias)
             + cross_attention_params(width, d, inner, cfg.bias) + mlp_params(encoder, 0))
    return project + encoder.n_layers * layer + norm_params(encoder)


def cca_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """RETRO's chunked cross-attention (§2.4): queries from the decoder, keys and values from
    the encoded neighbours; with relative positions Transformer-XL's W_R, u and v as well. The
    neighbour encoder is counted once, with the first retrieval layer, whose part runs it.
    Module: model/retro.py, ChunkedCrossAttention."""
    width = cfg.retro.encoder_width or cfg.d_model
    inner = cfg.n_heads * cfg.head_size
    total = cross_attention_params(cfg.d_model, width, inner, cfg.bias)
    if cfg.positions == "relative":
        total += cfg.d_model * inner + 2 * inner
    if layer == cfg.retrieval_layers[0]:
        total += retro_encoder_params(cfg)
    return total


register("mixer", "attention", "burrow.model.attention:Attention", attention_params,
         "causal self-attention: MHA, GQA or MQA; RoPE, relative or learned positions")
register("ffn", "mlp", "burrow.model.mlp:dense_mlp", mlp_params,
         "dense feed-forward: SwiGLU (PaLM) or GELU (GPT, Gopher), as model.ffn says")
register("ffn", "switch", "burrow.model.moe:SwitchMLP", switch_params,
         "Switch Transformer experts behind a top-k router (model.moe)")
register("ffn", "tape_mlp", "burrow.model.adatape:TapeMLP", tape_mlp_params,
         "AdaTape: the dense MLP for input positions, a second one for tape tokens (model.adatape)")
register("extra", "cca", "burrow.model.retro:ChunkedCrossAttention", cca_params,
         "RETRO's chunked cross-attention to encoded neighbours (model.retro)")
