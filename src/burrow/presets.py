"""The model zoo as data: the papers' models with their published sizes, and tiny CPU models.

Each paper preset is the architecture the paper describes, and `num_params()` reproduces the
paper's parameter count to the digits it publishes; the comment beside each preset shows the
arithmetic. `burrow presets` prints `table_rows()`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from burrow.config import ModelConfig, MoEConfig, RetroConfig
from burrow.errors import UserError
from burrow.flops import flops_per_token

GOPHER = "Rae et al. 2021, Scaling Language Models (Gopher), Table 1"
CHINCHILLA = "Hoffmann et al. 2022, Training Compute-Optimal LLMs (Chinchilla), Table 4"
PALM = "Chowdhery et al. 2022, PaLM, Table 1"
GPT3 = "Brown et al. 2020, Language Models are Few-Shot Learners (GPT-3), Table 2.1"
SWITCH = "Fedus et al. 2021, Switch Transformers, Table 9"
RETRO = "Borgeaud et al. 2021, Improving LMs by Retrieving from Trillions of Tokens, Table 9"


@dataclass(frozen=True)
class Preset:
    """A named ModelConfig with where it comes from."""

    name: str
    config: ModelConfig
    # One line: what the model is and what it is for.
    description: str
    # Paper and table the shape comes from ("burrow" for the tiny CPU models).
    source: str
    # Parameter count the paper publishes, None when there is none.
    published_params: int | None = None
    # Choices the paper leaves open or that burrow does not model.
    notes: str = ""


def _tiny(d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    """A small modern decoder (RoPE, RMSNorm, SwiGLU) that trains on a laptop's CPU.

    The head stays untied: the 4096-token vocabulary matches the tokenizer `burrow train`
    builds, and a separate output matrix costs little at this width.
    """
    return ModelConfig(vocab_size=4096, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       ffn="swiglu", norm="rmsnorm", positions="rope", block="serial",
                       tie_embeddings=False, bias=False, max_seq_len=256)


def _switch(dense: ModelConfig, num_experts: int = 8, every: int = 2) -> ModelConfig:
    """A Switch variant of a dense model: every `every`-th MLP becomes `num_experts` experts
    of the same width with top-1 routing and Switch's defaults (capacity 1.25 / 2.0,
    alpha 0.01, init scale 0.1) and ST-MoE's router z-loss 1e-3."""
    return dataclasses.replace(dense, moe=MoEConfig(num_experts=num_experts, every=every))


def _t5_decoder(n_layers: int, n_heads: int, d_model: int, d_ff: int, ffn: str) -> ModelConfig:
    """The decoder stack of a T5-style Switch model as a decoder-only language model: RMSNorm
    without biases, 64-wide heads, T5's 32,128-token vocabulary tied with the output, 512
    tokens of context. Rotary positions stand in for T5's relative position buckets."""
    return ModelConfig(vocab_size=32_128, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       head_dim=64, d_ff=d_ff, ffn=ffn, norm="rmsnorm", positions="rope",
                       block="serial", tie_embeddings=True, bias=False, max_seq_len=512)


def _gopher(n_layers: int, n_heads: int, head_dim: int, d_model: int) -> ModelConfig:
    """Gopher's architecture (Rae et al. 2021, §3): GPT-2's decoder with RMSNorm and
    Transformer-XL relative positions, a 4·d_model GELU feed-forward, SentencePiece 32,000
    tokens, 2048 tokens of context.

    The published sizes need W_R, u and v of relative attention (d_model·H·Q + 2·H·Q per layer)
    and the embedding matrix counted once, i.e. tied with the output layer.
    """
    return ModelConfig(vocab_size=32_000, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       head_dim=head_dim, d_ff=4 * d_model, ffn="gelu", norm="rmsnorm",
                       positions="relative", block="serial", tie_embeddings=True, bias=False,
                       max_seq_len=2048)


def _palm(n_layers: int, n_heads: int, d_model: int) -> ModelConfig:
    """PaLM's architecture (Chowdhery et al. 2022, §2): SwiGLU with d_ff = 4·d_model, parallel
    blocks, multi-query attention with 256-wide heads, RoPE, shared input/output embeddings, no
    biases in dense layers or layer norms, 256k SentencePiece vocabulary, z-loss 1e-4, 2048
    tokens of context, weights initialised with 1/sqrt(fan_in).
    """
    return ModelConfig(vocab_size=256_000, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=1, head_dim=256, d_ff=4 * d_model, ffn="swiglu",
                       norm="layernorm", positions="rope", block="parallel",
                       tie_embeddings=True, bias=False, z_loss=1e-4, max_seq_len=2048,
                       init="fan_in")


def _retro(n_layers: int, n_heads: int, head_dim: int, d_model: int) -> ModelConfig:
    """RETRO's models (Borgeaud et al. 2021, Table 9): Gopher's decoder at the table's shapes
    (relative positions, RMSNorm, a 4·d_model GELU MLP, 2048 tokens of context) with a 128k
    SentencePiece vocabulary (§2.3), and retrieval with the paper's settings: chunks of 64,
    2 neighbours of 128 tokens, a 2-layer encoder of width 896, chunked cross-attention every
    3rd layer from layer 6 (the default of model.retro.layers)."""
    dense = _gopher(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim, d_model=d_model)
    return dataclasses.replace(dense, vocab_size=128_000,
                               retro=RetroConfig(encoder_width=896, encoder_heads=14))


_GOPHER_NOTES = ("Gopher does not say whether the embedding is tied; its published sizes count "
                 "the matrix once, which tying reproduces.")
# PaLM's Table 1 counts are reproduced to the last digit when the layer-norm scales
# ((L + 1)·d_model) are left out; num_params() includes them (540B: 540.356B, not 540.35B).
_PALM_NOTES = ("Table 1's counts match to the last digit without the layer-norm scales "
               "(2.2M in 540B); num_params() includes them.")

# Switch's models are encoder-decoders; the published counts hold both stacks, whose experts
# are nearly all of it. These presets are the decoder stack alone, so about half.
_SWITCH_NOTES = ("Decoder-only variant of an encoder-decoder model: the published count holds "
                 "both stacks (twice the experts, plus cross-attention); {}.")

# RETRO's Table 9 counts leave the embedding out; so does the test that checks them. Above the
# baseline: CCA (q, k, v, o, W_R) in each retrieval layer and the encoder (2 x (self-attention,
# cross-attention, 4x GELU MLP) at width 896, plus a d_model -> 896 projection where they
# differ); for 172M: 3 x (4·896·1024 + 896·1024) + 2 x (4·896² + 2·896² + 2·896² + 8·896²)
# = 13.8M + 25.7M = 39.5M over 132.2M.
_RETRO_NOTES = ("Table 9 counts leave the 128k embedding out: compare the non-embedding count. "
                "The encoder's heads (14 of 64) are not published and change no count; CCA's "
                "relative positions use Transformer-XL's W_R, u, v (see docs/retro.md).")

_PRESETS: tuple[Preset, ...] = (
    # 2 x (4·64² + 3·64·176 + 2·64) + 64 + 2 x 4096·64 = 0.10M + 0.52M = 0.62M
    Preset("micro", _tiny(d_model=64, n_layers=2, n_heads=2),
           "0.6M parameters: the smallest model that is still a transformer; for tests",
           "burrow"),
    # 4 x (4·128² + 3·128·344 + 2·128) + 128 + 2 x 4096·128 = 0.79M + 1.05M = 1.84M
    Preset("nano", _tiny(d_model=128, n_layers=4, n_heads=4),
           "1.8M parameters: the demo model, trained for ~4 minutes on 2 CPU cores", "burrow"),
    # 6 x (4·192² + 3·192·512 + 2·192) + 192 + 2 x 4096·192 = 2.66M + 1.57M = 4.23M
    Preset("small", _tiny(d_model=192, n_layers=6, n_heads=6),
           "4.2M parameters: a better CPU model, ~30 minutes on 2 cores", "burrow"),
    # 8 x (12·512² + 512² W_R + 2·512 u,v + 2·512 norms) + 512 + 32,000·512
    # = 27.28M + 16.38M = 43.66M (without W_R 41.6M, untied 60.0M)
    Preset("gopher-44m", _gopher(n_layers=8, n_heads=16, head_dim=32, d_model=512),
           "Gopher family, 44M", GOPHER, 44_000_000, _GOPHER_NOTES),
    # 12 x (13·768² + 4·768) + 768 + 32,000·768 = 92.05M + 24.58M = 116.63M
    Preset("gopher-117m", _gopher(n_layers=12, n_heads=12, head_dim=64, d_model=768),
           "Gopher family, 117M", GOPHER, 117_000_000, _GOPHER_NOTES),
    # 12 x (13·1536² + 4·1536) + 1536 + 32,000·1536 = 368.13M + 49.15M = 417.28M
    Preset("gopher-417m", _gopher(n_layers=12, n_heads=12, head_dim=128, d_model=1536),
           "Gopher family, 417M", GOPHER, 417_000_000, _GOPHER_NOTES),
    # 24 x (13·2048² + 4·2048) + 2048 + 32,000·2048 = 1.309B + 0.066B = 1.374B
    Preset("gopher-1.4b", _gopher(n_layers=24, n_heads=16, head_dim=128, d_model=2048),
           "Gopher family, 1.4B", GOPHER, 1_400_000_000, _GOPHER_NOTES),
    # 32 x (13·4096² + 4·4096) + 4096 + 32,000·4096 = 6.980B + 0.131B = 7.111B
    Preset("gopher-7.1b", _gopher(n_layers=32, n_heads=32, head_dim=128, d_model=4096),
           "Gopher family, 7.1B", GOPHER, 7_100_000_000, _GOPHER_NOTES),
    # 80 x (12·16384² + 16384² W_R + 4·16384) + 32,000·16384
    # = 257.70B + 21.47B + 0.52B = 279.70B
    Preset("gopher-280b", _gopher(n_layers=80, n_heads=128, head_dim=128, d_model=16_384),
           "Gopher 280B", GOPHER, 280_000_000_000, _GOPHER_NOTES),
    # Gopher's architecture (Hoffmann et al. §4.1: AdamW and a tokenizer without NFKC
    # normalisation differ, not the shapes): 80 x (12·8192² + 8192² W_R + 4·8192) + 32,000·8192
    # = 64.42B + 5.37B + 0.26B = 70.06B
    Preset("chinchilla-70b", _gopher(n_layers=80, n_heads=64, head_dim=128, d_model=8192),
           "Chinchilla 70B: Gopher's compute, 4x fewer parameters, 1.4T tokens", CHINCHILLA,
           70_000_000_000, _GOPHER_NOTES),
    # 32 x (2·4096² q,o + 2·4096·256 k,v + 12·4096² SwiGLU + 4096 norm) + 4096 + 256,000·4096
    # = 7.583B + 1.049B = 8.632B
    Preset("palm-8b", _palm(n_layers=32, n_heads=16, d_model=4096),
           "PaLM 8B", PALM, 8_630_000_000, _PALM_NOTES),
    # 64 x (2·8192² + 2·8192·256 + 12·8192² + 8192) + 8192 + 256,000·8192
    # = 60.399B + 2.097B = 62.496B
    Preset("palm-62b", _palm(n_layers=64, n_heads=32, d_model=8192),
           "PaLM 62B", PALM, 62_500_000_000, _PALM_NOTES),
    # 48 heads of 256 = 12,288 < d_model: 118 x (2·18432·12288 + 2·18432·256 + 12·18432²
    # + 18432) + 18432 + 256,000·18432 = 535.638B + 4.719B = 540.356B
    Preset("palm-540b", _palm(n_layers=118, n_heads=48, d_model=18_432),
           "PaLM 540B", PALM, 540_350_000_000, _PALM_NOTES),
    # 96 x (12·12288² + 9·12288 biases + 4·12288 layer norms) + 2·12288 + 50,257·12288
    # + 2048·12288 positions = 173.96B + 0.62B + 0.03B = 174.6B
    Preset("gpt3-175b",
           ModelConfig(vocab_size=50_257, d_model=12_288, n_layers=96, n_heads=96, head_dim=128,
                       d_ff=4 * 12_288, ffn="gelu", norm="layernorm", positions="learned",
                       block="serial", tie_embeddings=True, bias=True, max_seq_len=2048),
           "GPT-3 175B", GPT3, 175_000_000_000,
           "GPT-2's architecture (tied embeddings, learned positions, biases); the alternating "
           "locally banded sparse attention is not modelled and has no parameters. Table 2.1 "
           "prints 175.0B; the architecture it gives has 174.6B."),
    # The tiny models with 8 experts in every other block (Switch's default placement).
    Preset("switch-micro", _switch(_tiny(d_model=64, n_layers=2, n_heads=2)),
           "micro with 8 experts in block 1: 0.86M parameters, 0.63M active per token", "burrow"),
    Preset("switch-nano", _switch(_tiny(d_model=128, n_layers=4, n_heads=4)),
           "nano with 8 experts in blocks 1 and 3: 3.7M parameters, 1.8M active per token",
           "burrow"),
    Preset("switch-small", _switch(_tiny(d_model=192, n_layers=6, n_heads=6)),
           "small with 8 experts in blocks 1, 3 and 5: 10.4M parameters, 4.2M active per "
           "token", "burrow"),
    # Decoder of Switch-Base: 12 x (4·768² attention) + 6 x 3·768·2048 dense + 6 x (128 x
    # 3·768·2048 + 768·128 router) + 32,128·768 = 28.3M + 28.3M + 3,624.5M + 24.7M = 3.71B;
    # both stacks' experts: 12 x 128 x 4.72M = 7.25B, the published 7B.
    Preset("switch-base-128",
           _switch(_t5_decoder(n_layers=12, n_heads=12, d_model=768, d_ff=2048, ffn="swiglu"),
                   num_experts=128),
           "Switch-Base's decoder: 128 experts in every other block, 3.7B parameters, 0.11B "
           "active per token", SWITCH, None,
           _SWITCH_NOTES.format("Switch-Base is 7B, and its GEGLU experts are SwiGLU here "
                                "(the same parameter count)")),
    # Decoder of Switch-C: 15 x (4·2080·2048 attention + 2048 x 2·2080·6144 experts
    # + 2080·2048 router) + 32,128·2080 = 0.26B + 785.2B + 0.06B + 0.07B = 785.6B; both stacks:
    # 30 x 2048 x 25.56M experts = 1,570.4B, with attention, cross-attention, routers and
    # embedding 1,571.4B: the published 1571B.
    Preset("switch-c-2048",
           _switch(_t5_decoder(n_layers=15, n_heads=32, d_model=2080, d_ff=6144, ffn="gelu"),
                   num_experts=2048, every=1),
           "Switch-C's decoder: 2048 experts in every block, 786B parameters, 0.77B active per "
           "token", SWITCH, None, _SWITCH_NOTES.format("Switch-C is 1571B")),
    # The tiny models with retrieval: the same decoder, chunked cross-attention in layer 2 of
    # nano's 4 and layers 3 and 6 of small's 6 (model.retro.layers' rule), chunks of 64, 2
    # neighbours of 128 tokens, a 2-layer encoder of the decoder's width.
    Preset("retro-nano", dataclasses.replace(_tiny(d_model=128, n_layers=4, n_heads=4),
                                             retro=RetroConfig()),
           "nano with RETRO's retrieval in block 2: 2.4M parameters, nano's decoder", "burrow"),
    Preset("retro-small", dataclasses.replace(_tiny(d_model=192, n_layers=6, n_heads=6),
                                              retro=RetroConfig()),
           "small with RETRO's retrieval in blocks 3 and 6: 5.7M parameters, small's decoder",
           "burrow"),
    # Table 9, without embeddings: baseline 132M, 368M, 1,309M, 6,982M -> RETRO 172M, 425M,
    # 1,451M, 7,532M. Ours: 132.2M -> 171.6M, 368.1M -> 427.0M, 1,308.8M -> 1,454.3M,
    # 6,979.9M -> 7,539.7M.
    Preset("retro-172m", _retro(n_layers=12, n_heads=16, head_dim=64, d_model=896),
           "RETRO 172M (without embeddings): the 132M baseline with retrieval in layers 6, 9, 12",
           RETRO, 172_000_000, _RETRO_NOTES),
    Preset("retro-425m", _retro(n_layers=12, n_heads=12, head_dim=128, d_model=1536),
           "RETRO 425M (without embeddings): the 368M baseline with retrieval in layers 6, 9, 12",
           RETRO, 425_000_000, _RETRO_NOTES),
    Preset("retro-1.5b", _retro(n_layers=24, n_heads=16, head_dim=128, d_model=2048),
           "RETRO 1.5B (1,451M without embeddings): the 1,309M baseline with retrieval in 7 "
           "layers", RETRO, 1_451_000_000, _RETRO_NOTES),
    Preset("retro-7.5b", _retro(n_layers=32, n_heads=32, head_dim=128, d_model=4096),
           "RETRO 7.5B (7,532M without embeddings): the 6,982M baseline with retrieval in 9 "
           "layers", RETRO, 7_532_000_000, _RETRO_NOTES),
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESETS}


def names() -> list[str]:
    """Preset names in a fixed order: the tiny CPU models, then each paper's family by size."""
    return list(PRESETS)


def info(name: str) -> Preset:
    """The preset called `name` (case-insensitive), with its own copy of the config (nested
    configs included)."""
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        close = difflib.get_close_matches(name.strip().lower(), names(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"one of {', '.join(names())}"
        raise UserError(f"unknown preset {name!r}; {hint} (burrow presets lists them)")
    return copy.deepcopy(preset)


def get(name: str) -> ModelConfig:
    """A fresh ModelConfig of the preset called `name`, nested configs copied too; UserError with
    suggestions if unknown."""
    return info(name).config


def table_rows(seq_len: int | None = None) -> list[dict[str, Any]]:
    """One row per preset for `burrow presets`: counts and training FLOPs per token.

    FLOPs per token are PaLM's 6N + 12·L·H·Q·T at `seq_len` tokens, default each model's
    context (flops.flops_per_token).
    """
    rows = []
    for preset in _PRESETS:
        cfg = preset.config
        length = cfg.max_seq_len if seq_len is None else seq_len
        rows.append({
            "name": preset.name,
            "params": cfg.num_params(),
            "active_params": cfg.num_params(active=True),
            "non_embedding_params": cfg.num_params(embeddings=False),
            "seq_len": length,
            "flops_per_token": flops_per_token(cfg, length),
            "published_params": preset.published_params,
            "source": preset.source,
            "description": preset.description,
        })
    return rows
