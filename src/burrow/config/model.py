"""The shape of a model: ModelConfig, its Switch (MoEConfig), RETRO (RetroConfig) and AdaTape
(config/adatape.py) sections and per-layer parts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from burrow import blocks
from burrow.blocks import LayerSpec
from burrow.config.adatape import AdaTapeConfig, check_adatape, encoder_params
from burrow.config.fields import build_section, check_choice, check_positive
from burrow.errors import UserError

FFN_KINDS = ("swiglu", "gelu")
NORM_KINDS = ("rmsnorm", "layernorm")
POSITION_KINDS = ("rope", "relative", "learned")
BLOCK_KINDS = ("serial", "parallel")
INIT_KINDS = ("gpt2", "fan_in", "switch")
LOSS_KERNELS = ("auto", "chunked", "plain")


@dataclass
class MoEConfig:
    """Sparse mixture-of-experts feed-forward layers (Switch Transformer, Fedus et al. 2021).

    With num_experts > 0, every `every`-th block's MLP becomes num_experts expert MLPs behind a
    router that sends each token to its top_k experts.
    """

    # Experts per sparse layer; 0 = a dense model.
    num_experts: int = 0
    # Every N-th block is sparse (Switch: 2, every other FFN layer; 1 = all of them).
    every: int = 2
    # Experts per token: 1 = Switch; 2 = GShard (gates renormalised over the two, the second
    # expert used with probability 2 x its gate in training: Lepikhin et al. 2020, Algorithm 1).
    top_k: int = 1
    # Expert capacity in training = capacity_factor x top_k x tokens / num_experts (Switch: 1.25).
    capacity_factor: float = 1.25
    # Capacity factor in evaluation and generation (Switch: 2.0).
    eval_capacity_factor: float = 2.0
    # Capacity = the busiest expert's load, so no token is dropped.
    dropless: bool = False
    # Load-balancing loss alpha * N * sum_i f_i * P_i (Switch eq. 4: alpha = 0.01).
    balance_loss: float = 0.01
    # Router z-loss coefficient on mean log^2 Z of the router logits: ST-MoE's addition (Zoph
    # et al. 2022, eq. 5: 1e-3), not part of Switch; 0 = Switch's own router.
    router_z_loss: float = 1e-3
    # Multiply the router's input, not the experts', by U(1 - jitter, 1 + jitter) in training
    # (Switch App. C, "input jitter"; 0.01 in Mesh TensorFlow and ST-MoE); 0 = off.
    jitter: float = 0.0
    # Switch §2.4's s: experts and router init N(0, s / fan_in) truncated at 2 sigma, and every
    # weight matrix with model.init = "switch" (0.1).
    init_scale: float = 0.1
    # Dropout on each expert's hidden activations, between its two projections, in training
    # (Switch §2.4 "expert dropout", Table 4: 0.4 when fine-tuning, model.dropout 0.1).
    expert_dropout: float = 0.0
    # Hidden width of each expert; None = the model's d_ff.
    d_ff: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has experts: blocks every-1, 2*every-1, ..."""
        return self.enabled and (layer + 1) % self.every == 0

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        if self.num_experts < 0:
            raise UserError(f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        check_positive(self.every, "model.moe.every")
        if not 1 <= self.top_k <= max(1, self.num_experts):
            raise UserError(f"model.moe.top_k={self.top_k} must be between 1 and "
                            f"model.moe.num_experts={self.num_experts}")
        for name in ("capacity_factor", "eval_capacity_factor", "init_scale"):
            check_positive(getattr(self, name), f"model.moe.{name}")
        for name in ("balance_loss", "router_z_loss"):
            if getattr(self, name) < 0:
                raise UserError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("jitter", "expert_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.moe.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.d_ff is not None:
            check_positive(self.d_ff, "model.moe.d_ff")


@dataclass
class RetroConfig:
    """Retrieval from a chunk database (RETRO, Borgeaud et al. 2021, §2.4-2.5).

    The sequence is split into chunks of `chunk_size` tokens; each chunk comes with `neighbours`
    retrieved token sequences of chunk_size + continuation tokens. A small bidirectional
    encoder reads them, and chunked cross-attention in the retrieval layers attends to them.
    """

    # Tokens per chunk, m (RETRO §2.3: 64).
    chunk_size: int = 64
    # Neighbours retrieved per chunk, k, in training (RETRO §2.4: 2; more may be given at eval).
    neighbours: int = 2
    # Tokens of a neighbour's continuation: a neighbour is chunk_size + continuation = r tokens
    # (RETRO §2.3: 64, r = 128).
    continuation: int = 64
    # One-based decoder layers with chunked cross-attention; None = every 3rd from layer 6 for
    # 12 or more layers (RETRO §B: 6, 9, 12 of 12), every 3rd from layer ceil(L/2) below.
    layers: list[int] | None = None
    # Layers of the bidirectional neighbour encoder (RETRO §2.4: 2).
    encoder_layers: int = 2
    # Width of the neighbour encoder; None = the decoder's d_model (RETRO Table 9: 896).
    encoder_width: int | None = None
    # Attention heads of the neighbour encoder; None = the decoder's n_heads.
    encoder_heads: int | None = None
    # Dropout in the neighbour encoder's attention and residual branches.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def neighbour_length(self) -> int:
        """r: tokens of one retrieved neighbour, its chunk and its continuation."""
        return self.chunk_size + self.continuation

    def layer_numbers(self, n_layers: int) -> list[int]:
        """The one-based retrieval layers of an n_layers decoder, the default resolved."""
        if self.layers is not None:
            return list(self.layers)
        first = min(6, math.ceil(n_layers / 2))
        return list(range(first, n_layers + 1, 3))

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        for name in ("chunk_size", "neighbours", "encoder_layers"):
            check_positive(getattr(self, name), f"model.retro.{name}")
        if self.continuation < 0:
            raise UserError(f"model.retro.continuation must be >= 0, got {self.continuation}")
        for name in ("encoder_width", "encoder_heads"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), f"model.retro.{name}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.retro.dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None:
            if (not isinstance(self.layers, (list, tuple)) or not self.layers
                    or any(not isinstance(n, int) for n in self.layers)):
                raise UserError("model.retro.layers must be a non-empty list of one-based layer "
                                f"numbers (e.g. [6, 9, 12]), got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise UserError(f"model.retro.layers={self.layers} must be increasing, without "
                                "repeats")
            self.layers = list(self.layers)


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer language model."""

    # Number of token ids; the tokenizer's vocabulary size.
    vocab_size: int = 8192
    # Width of the residual stream.
    d_model: int = 256
    # Number of transformer blocks.
    n_layers: int = 6
    # Number of query heads.
    n_heads: int = 8
    # Number of key/value heads: n_heads = MHA, 1 = MQA (PaLM), in between = GQA; None = n_heads.
    n_kv_heads: int | None = None
    # Width of one attention head; None = d_model // n_heads.
    head_dim: int | None = None
    # Hidden width of the MLP; None = 4 * d_model (gelu) or 8/3 * d_model rounded up to 8 (swiglu).
    d_ff: int | None = None
    # MLP kind: "swiglu" (PaLM) or "gelu" (GPT-2/3, Gopher).
    ffn: str = "swiglu"
    # Normalisation: "rmsnorm" (Gopher, Llama) or "layernorm" (GPT-3, PaLM).
    norm: str = "rmsnorm"
    # Positions: "rope" (PaLM), "relative" (Transformer-XL, Gopher) or "learned" (GPT-2/3).
    positions: str = "rope"
    # Block: "serial" (attention then MLP) or "parallel" (PaLM: x + attn(n(x)) + mlp(n(x))).
    block: str = "serial"
    # Share the input embedding with the output projection.
    tie_embeddings: bool = False
    # Biases in the linear layers and layernorms.
    bias: bool = False
    # Coefficient of the softmax normaliser loss z_loss * log(Z)^2 (PaLM: 1e-4); 0 = off.
    z_loss: float = 0.0
    # Longest sequence the model accepts (and the length of learned position tables).
    max_seq_len: int = 256
    # Dropout probability on attention weights and residual branches.
    dropout: float = 0.0
    # Weight init: "gpt2" (N(0, 0.02), residual outputs / sqrt(2L)), "fan_in" (PaLM §2) or
    # "switch" (Switch §2.4: each weight matrix N(0, moe.init_scale / fan_in), cut at 2 sigma).
    init: str = "gpt2"
    # Base of the rotary frequencies.
    rope_theta: float = 10000.0
    # Epsilon of the normalisation layers.
    norm_eps: float = 1e-5
    # Sparse expert MLPs (Switch Transformer); dense unless moe.num_experts > 0.
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Each block's parts, a list of n_layers {mixer, ffn, extras} (blocks.py); None = derived
    # from the fields above (attention and an MLP, Switch experts where moe makes them).
    layers: list[LayerSpec] | None = None
    # Retrieval (RETRO): chunked cross-attention to encoded neighbours; None = no retrieval.
    retro: RetroConfig | None = None
    # AdaTape (Xue et al. 2023): tape tokens read from a bank appended to the input of a
    # bidirectional encoder classifier (model/encoder.py); None = none. Encoder-only.
    adatape: AdaTapeConfig | None = None
    # Output layer and loss: "chunked" (fused, in row chunks: model/loss.py), "plain" (logits,
    # then F.cross_entropy) or "auto" (chunked on a CPU, where it is measured faster; plain
    # elsewhere until measured there).
    loss_kernel: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        """Key/value heads with the default resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head width with the default resolved."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def scaled_tied_logits(self) -> bool:
        """Whether the logits are scaled by d_model^-1/2: a tied embedding table drawn from
        N(0, 1), by init "fan_in" (PaLM §2) or "switch" (Mesh TensorFlow's hidden_to_logits)."""
        return self.tie_embeddings and self.init in ("fan_in", "switch")

    @property
    def expert_ffn_size(self) -> int:
        """Hidden width of one expert with the default resolved."""
        return self.ffn_size if self.moe.d_ff is None else self.moe.d_ff

    def layer_spec(self, layer: int) -> LayerSpec:
        """The parts of block `layer` (0-based): `layers[layer]` when given, else attention and
        a dense MLP, Switch experts in the blocks moe.every makes sparse, AdaTape's "tape_mlp" for
        the dense MLPs that see tape tokens (adatape.tape_ffn); with retro set, the
        retrieval layers get chunked cross-attention ("cca") after attention (RETRO §2.4:
        ATTN, CCA, FFW), unless their explicit spec already names it."""
        if self.layers is not None:
            spec = self.layers[layer]
        else:
            dense = "tape_mlp" if self.tape_ffn_from(layer) else "mlp"
            spec = LayerSpec(ffn="switch" if self.moe.is_sparse(layer) else dense)
        if layer in self.retrieval_layers and "cca" not in spec.extras:
            spec = dataclasses.replace(spec, extras=(*spec.extras, "cca"))
        return spec

    def tape_ffn_from(self, layer: int) -> bool:
        """Whether block `layer`'s dense MLP becomes AdaTape's "tape_mlp": with adatape.tape_ffn,
        in the blocks from the one before which the tape is read (earlier ones never see it)."""
        tape = self.adatape
        return tape is not None and tape.tape_ffn and layer >= tape.read_layer

    @property
    def retrieval_layers(self) -> list[int]:
        """The blocks (0-based) with chunked cross-attention; empty without retro."""
        if self.retro is None:
            return []
        return [number - 1 for number in self.retro.layer_numbers(self.n_layers)]

    def retro_encoder(self) -> ModelConfig:
        """The neighbour encoder's shape as a ModelConfig (its width, heads, layers, norm and
        feed-forward kind; the MLP is 4x wide for GELU, 8/3x for SwiGLU), for building and
        counting its parts."""
        retro = self.retro
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=retro.encoder_width or self.d_model,
            n_layers=retro.encoder_layers, n_heads=retro.encoder_heads or self.n_heads,
            ffn=self.ffn, norm=self.norm, positions="rope", bias=self.bias,
            max_seq_len=max(retro.neighbour_length, 1), dropout=retro.dropout,
            init=self.init, rope_theta=self.rope_theta, norm_eps=self.norm_eps)

    @property
    def sparse_layers(self) -> list[int]:
        """The blocks whose feed-forward layer is a set of Switch experts."""
        return [layer for layer in range(self.n_layers) if self.layer_spec(layer).ffn == "switch"]

    @property
    def ffn_size(self) -> int:
        """MLP hidden width with the default resolved."""
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn == "gelu":
            return 4 * self.d_model
        return -(-8 * self.d_model // 3 // 8) * 8

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if the combination is invalid."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_positive(getattr(self, name), f"model.{name}")
        check_choice(self.ffn, FFN_KINDS, "model.ffn")
        check_choice(self.norm, NORM_KINDS, "model.norm")
        check_choice(self.positions, POSITION_KINDS, "model.positions")
        check_choice(self.block, BLOCK_KINDS, "model.block")
        check_choice(self.init, INIT_KINDS, "model.init")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim"
            )
        check_positive(self.head_size, "model.head_dim")
        check_positive(self.kv_heads, "model.n_kv_heads")
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.kv_heads} (MHA: equal, MQA: 1, GQA: a divisor)"
            )
        if self.positions == "rope" and self.head_size % 2:
            raise UserError(f"rotary positions need an even model.head_dim, got {self.head_size}")
        check_positive(self.ffn_size, "model.d_ff")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.z_loss < 0:
            raise UserError(f"model.z_loss must be >= 0, got {self.z_loss}")
        check_choice(self.loss_kernel, LOSS_KERNELS, "model.loss_kernel")
        if isinstance(self.moe, dict):  # built from YAML or a dict
            self.moe = build_section(MoEConfig, self.moe, "model.moe")
        self.moe.validate()
        self._validate_retro()
        self._validate_adatape()
        self._validate_layers()
        if self.moe.enabled and not self.sparse_layers:
            raise UserError(f"model.moe.every={self.moe.every} leaves none of the "
                            f"{self.n_layers} blocks sparse; lower model.moe.every")
        if self.sparse_layers and not self.moe.enabled:
            raise UserError("model.layers has Switch blocks but model.moe.num_experts is 0; "
                            "set model.moe.num_experts")

    def _validate_retro(self) -> None:
        if isinstance(self.retro, dict):  # built from YAML or a dict
            self.retro = build_section(RetroConfig, self.retro, "model.retro")
        if self.retro is None:
            return
        self.retro.validate()
        numbers = self.retro.layer_numbers(self.n_layers)
        if not numbers or numbers[0] < 1 or numbers[-1] > self.n_layers:
            raise UserError(f"model.retro.layers={numbers} must be between 1 and "
                            f"model.n_layers={self.n_layers} (one-based)")
        width = self.retro.encoder_width or self.d_model
        heads = self.retro.encoder_heads or self.n_heads
        if width % heads or (width // heads) % 2:
            raise UserError(f"the neighbour encoder's width {width} must split into "
                            f"{heads} heads of an even width (rotary positions); change "
                            "model.retro.encoder_width or model.retro.encoder_heads")
        if self.positions != "relative" and self.head_size % 2:
            raise UserError("chunked cross-attention uses rotary positions, which need an even "
                            f"model.head_dim, got {self.head_size}")

    def _validate_adatape(self) -> None:
        if isinstance(self.adatape, dict):  # built from YAML or a dict
            self.adatape = build_section(AdaTapeConfig, self.adatape, "model.adatape")
        if self.adatape is not None:
            self.adatape.validate()
            check_adatape(self)

    def _validate_layers(self) -> None:
        if self.layers is None:
            return
        if not isinstance(self.layers, (list, tuple)):
            raise UserError("model.layers must be a list of {mixer, ffn, extras}, one per block")
        specs = []
        for index, spec in enumerate(self.layers):
            if isinstance(spec, dict):
                unknown = set(spec) - {"mixer", "ffn", "extras"}
                if unknown:
                    raise UserError(f"model.layers[{index}] has unknown key(s) "
                                    f"{', '.join(sorted(unknown))}; use mixer, ffn, extras")
                spec = LayerSpec(**spec)
            elif not isinstance(spec, LayerSpec):
                raise UserError(f"model.layers[{index}] must be a mapping of mixer, ffn, extras")
            for role, name in spec.parts():
                blocks.kind(role, name)
            if "cca" in spec.extras and index not in self.retrieval_layers:
                raise UserError(f"model.layers[{index}] has chunked cross-attention (cca) but is "
                                "not a retrieval layer; set model.retro.layers to include "
                                f"{index + 1}")
            specs.append(spec)
        self.layers = specs
        if len(specs) != self.n_layers:
            raise UserError(f"model.layers describes {len(specs)} blocks but model.n_layers is "
                            f"{self.n_layers}; give one entry per block")

    def num_params(self, *, embeddings: bool = True, active: bool = False) -> int:
        """Exact parameter count of `Transformer(self)`, computed without allocating.

        With `embeddings=False`, the token embedding, the untied output head and learned
        position tables are left out (Kaplan et al.'s non-embedding parameters). With
        `active=True`, a sparse layer counts its router and the top_k experts a token goes
        through, not all of them: the parameters each token is multiplied by. With adatape
        set the model is an EncoderClassifier (model/encoder.py): its count without the
        classification head, whose width the config does not know (config/adatape.py,
        encoder_params, counts it too).
        """
        if self.adatape is not None:
            return encoder_params(self, embeddings=embeddings, active=active)
        total = blocks.norm_params(self)  # the final norm
        total += sum(blocks.block_params(self, layer, active) for layer in range(self.n_layers))
        if embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += self.max_seq_len * self.d_model
        return total


