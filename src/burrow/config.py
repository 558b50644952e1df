"""One typed config tree per run: ModelConfig, TrainConfig, DataConfig inside RunConfig.

Every field has a default and a one-line docstring (the comment above it). Configs validate
themselves and raise `UserError` naming the field and the fix; they round-trip through YAML and
accept dotted overrides (`--set model.d_model=384`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from burrow import blocks
from burrow.blocks import LayerSpec
from burrow.errors import UserError

FFN_KINDS = ("swiglu", "gelu")
NORM_KINDS = ("rmsnorm", "layernorm")
POSITION_KINDS = ("rope", "relative", "learned")
BLOCK_KINDS = ("serial", "parallel")
INIT_KINDS = ("gpt2", "fan_in")
LOSS_KERNELS = ("auto", "chunked", "plain")


def _choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


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
    # Experts per token: 1 = Switch, 2 = GShard (gates renormalised over the two).
    top_k: int = 1
    # Expert capacity in training = capacity_factor x top_k x tokens / num_experts (Switch: 1.25).
    capacity_factor: float = 1.25
    # Capacity factor in evaluation and generation (Switch: 2.0).
    eval_capacity_factor: float = 2.0
    # Capacity = the busiest expert's load, so no token is dropped.
    dropless: bool = False
    # Load-balancing loss alpha * N * sum_i f_i * P_i (Switch eq. 4: alpha = 0.01).
    balance_loss: float = 0.01
    # Router z-loss coefficient on mean log^2 Z of the router logits (ST-MoE eq. 5: 1e-3).
    router_z_loss: float = 1e-3
    # Multiply the router's input by U(1 - jitter, 1 + jitter) in training (Switch: 0.01); 0 = off.
    jitter: float = 0.0
    # Experts and router init N(0, init_scale / fan_in) truncated at 2 sigma (Switch §2.4: 0.1).
    init_scale: float = 0.1
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
        _positive(self.every, "model.moe.every")
        if not 1 <= self.top_k <= max(1, self.num_experts):
            raise UserError(f"model.moe.top_k={self.top_k} must be between 1 and "
                            f"model.moe.num_experts={self.num_experts}")
        for name in ("capacity_factor", "eval_capacity_factor", "init_scale"):
            _positive(getattr(self, name), f"model.moe.{name}")
        for name in ("balance_loss", "router_z_loss"):
            if getattr(self, name) < 0:
                raise UserError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.jitter < 1.0:
            raise UserError(f"model.moe.jitter must be in [0, 1), got {self.jitter}")
        if self.d_ff is not None:
            _positive(self.d_ff, "model.moe.d_ff")


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
    # Weight init: "gpt2" (N(0, 0.02), residual outputs / sqrt(2L)) or "fan_in" (PaLM §2).
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
    def expert_ffn_size(self) -> int:
        """Hidden width of one expert with the default resolved."""
        return self.ffn_size if self.moe.d_ff is None else self.moe.d_ff

    def layer_spec(self, layer: int) -> LayerSpec:
        """The parts of block `layer` (0-based): `layers[layer]` when given, else attention and
        a dense MLP, Switch experts in the blocks moe.every makes sparse."""
        if self.layers is not None:
            return self.layers[layer]
        return LayerSpec(ffn="switch" if self.moe.is_sparse(layer) else "mlp")

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
            _positive(getattr(self, name), f"model.{name}")
        _choice(self.ffn, FFN_KINDS, "model.ffn")
        _choice(self.norm, NORM_KINDS, "model.norm")
        _choice(self.positions, POSITION_KINDS, "model.positions")
        _choice(self.block, BLOCK_KINDS, "model.block")
        _choice(self.init, INIT_KINDS, "model.init")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim"
            )
        _positive(self.head_size, "model.head_dim")
        _positive(self.kv_heads, "model.n_kv_heads")
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.kv_heads} (MHA: equal, MQA: 1, GQA: a divisor)"
            )
        if self.positions == "rope" and self.head_size % 2:
            raise UserError(f"rotary positions need an even model.head_dim, got {self.head_size}")
        _positive(self.ffn_size, "model.d_ff")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.z_loss < 0:
            raise UserError(f"model.z_loss must be >= 0, got {self.z_loss}")
        _choice(self.loss_kernel, LOSS_KERNELS, "model.loss_kernel")
        if isinstance(self.moe, dict):  # built from YAML or a dict
            self.moe = _build(MoEConfig, self.moe, "model.moe")
        self.moe.validate()
        self._validate_layers()
        if self.moe.enabled and not self.sparse_layers:
            raise UserError(f"model.moe.every={self.moe.every} leaves none of the "
                            f"{self.n_layers} blocks sparse; lower model.moe.every")
        if self.sparse_layers and not self.moe.enabled:
            raise UserError("model.layers has Switch blocks but model.moe.num_experts is 0; "
                            "set model.moe.num_experts")

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
        through, not all of them: the parameters each token is multiplied by.
        """
        total = blocks.norm_params(self)  # the final norm
        total += sum(blocks.block_params(self, layer, active) for layer in range(self.n_layers))
        if embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += self.max_seq_len * self.d_model
        return total


@dataclass
class TrainConfig:
    """How a model is trained: steps, batch, optimiser, schedule, precision, checkpoints."""

    # Number of optimiser steps.
    max_steps: int = 1000
    # Tokens per optimiser step (batch_size * seq_len * accumulation * world size).
    batch_tokens: int = 8192
    # Sequences per forward pass; gradient accumulation fills batch_tokens.
    micro_batch_size: int = 16
    # Tokens per training sequence; at most model.max_seq_len.
    seq_len: int = 256
    # Peak learning rate.
    lr: float = 3e-3
    # Final learning rate as a fraction of lr (Gopher: cosine decay to 10%).
    min_lr_ratio: float = 0.1
    # Linear warmup steps from warmup_init_lr to lr.
    warmup_steps: int = 100
    # Learning rate at step 0 (Gopher: 1e-7).
    warmup_init_lr: float = 1e-7
    # Schedule after warmup: "cosine" (Gopher), "constant", "wsd" (warmup-stable-decay) or
    # "rsqrt" (T5's inverse square root, which needs no end).
    schedule: str = "cosine"
    # Fraction of the steps spent in the final linear decay of the "wsd" schedule.
    decay_fraction: float = 0.2
    # AdamW weight decay on matrices (Gopher's Adam = AdamW with 0).
    weight_decay: float = 0.1
    # AdamW beta1.
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.95
    # AdamW epsilon.
    eps: float = 1e-8
    # Clip the global gradient norm to this value; 0 = off.
    grad_clip: float = 1.0
    # Evaluate on held-out data every N steps (and at the end); 0 = only at the end.
    eval_every: int = 200
    # Held-out tokens per periodic evaluation (the final `burrow eval` uses all of them).
    eval_tokens: int = 65536
    # Write a checkpoint every N steps (and at the end); 0 = only at the end.
    save_every: int = 500
    # Checkpoints kept on disk (the newest); 0 = keep all.
    keep_checkpoints: int = 2
    # Print a progress line every N steps.
    log_every: int = 10
    # Seed of the data order, the init and dropout.
    seed: int = 0
    # torch.compile the model.
    compile: bool = False
    # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", "mps".
    device: str = "auto"
    # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16".
    precision: str = "auto"
    # Data parallelism under torchrun: "none", "ddp" or "fsdp" (FSDP2, sharded checkpoints).
    parallel: str = "none"
    # Split each sparse layer's experts over this many ranks (expert parallelism, with ddp).
    expert_parallel: int = 1
    # Loss-spike recovery (PaLM §5.1): a loss above spike_factor x the mean of the last
    # spike_window losses is a spike; 0 = off.
    spike_factor: float = 0.0
    # Steps of loss history the spike threshold is computed from.
    spike_window: int = 100
    # After a spike, resume from the newest checkpoint at least this many steps earlier.
    spike_rollback: int = 100
    # Optimiser steps' worth of data batches skipped after rolling back (PaLM: 200 to 500).
    spike_skip: int = 300

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        for name in ("max_steps", "batch_tokens", "micro_batch_size", "seq_len", "lr", "log_every",
                     "expert_parallel"):
            _positive(getattr(self, name), f"train.{name}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "grad_clip",
                     "weight_decay", "eval_tokens", "spike_factor", "spike_rollback",
                     "spike_skip"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        _choice(self.schedule, ("cosine", "constant", "wsd", "rsqrt"), "train.schedule")
        _choice(self.precision, ("auto", "fp32", "bf16"), "train.precision")
        _choice(self.parallel, ("none", "ddp", "fsdp"), "train.parallel")
        if self.spike_factor and self.spike_factor <= 1.0:
            raise UserError(f"train.spike_factor must be above 1 (or 0 = off), got "
                            f"{self.spike_factor}")
        _positive(self.spike_window, "train.spike_window")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized and split."""

    # "stdlib" (the running Python's standard library), a file, a directory, a .jsonl file,
    # or a prepared directory.
    source: str = "stdlib"
    # Field holding the text in .jsonl sources.
    text_field: str = "text"
    # Fraction of documents held out for validation (split by document, deterministic).
    val_fraction: float = 0.02
    # Tokenizer algorithm: "bpe" or "unigram" (sentencepiece).
    tokenizer_type: str = "bpe"
    # Tokenize with the run directory's own tokenizer.model instead of training one on the
    # data: fine-tuning a model whose vocabulary is fixed (e.g. one imported with import-hf).
    keep_tokenizer: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _choice(self.tokenizer_type, ("bpe", "unigram"), "data.tokenizer_type")


@dataclass
class DistillConfig:
    """Distilling a teacher (a sparse one, in Switch Transformer §4) into a dense student."""

    # Run directory of the teacher; its latest checkpoint teaches.
    teacher: str = ""
    # Weight of the cross-entropy against the data's next tokens (Switch Table 6: 0.75).
    label_weight: float = 0.75
    # Weight of the cross-entropy against the teacher's probabilities (Switch Table 6: 0.25).
    teacher_weight: float = 0.25

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        if not self.teacher:
            raise UserError("distill.teacher is empty; name the teacher's run directory")
        for name in ("label_weight", "teacher_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.label_weight + self.teacher_weight <= 0:
            raise UserError("distill.label_weight and distill.teacher_weight are both 0; "
                            "give one of them a positive weight")


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as config.yaml in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Name of the preset the model came from, for the record.
    preset: str | None = None
    # Set in runs made by `burrow distill`: the teacher and the weights of the loss.
    distill: DistillConfig | None = None

    def validate(self) -> None:
        """Check each part and the constraints between them."""
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.distill is not None:
            self.distill.validate()
            if self.model.moe.enabled:
                raise UserError(
                    f"the student {self.preset or 'model'} is sparse (model.moe.num_experts="
                    f"{self.model.moe.num_experts}); distillation makes a dense model (Switch "
                    "§4): choose a dense --student preset")
        if self.train.seq_len > self.model.max_seq_len:
            raise UserError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; lower --seq-len or raise model.max_seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["distill"] is None:  # an ordinary run: no section to show
            del raw["distill"]
        if self.model.layers is None:  # derived from the other fields: nothing to show
            del raw["model"]["layers"]
        else:
            raw["model"]["layers"] = [spec.to_dict() for spec in self.model.layers]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw)
        parts = {name: _build(kind, raw.pop(name, {}) or {}, name)
                 for name, kind in (("model", ModelConfig), ("train", TrainConfig),
                                    ("data", DataConfig))}
        preset, distill = raw.pop("preset", None), raw.pop("distill", None)
        if raw:
            raise UserError(f"unknown config section(s): {', '.join(sorted(raw))}")
        if distill is not None:
            distill = _build(DistillConfig, distill, "distill")
        cfg = cls(preset=preset, distill=distill, **parts)
        cfg.validate()
        return cfg

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise UserError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
        return cls.from_dict(raw)


def field_docs(kind: type) -> dict[str, str]:
    """Each field's one-line documentation: the comment above it in this file."""
    import inspect

    lines = inspect.getsource(kind).splitlines()
    docs, comment = {}, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if comment and ":" in stripped and name.isidentifier():
            docs[name] = " ".join(comment)
        comment = []
    return docs


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config section {section!r} must be a mapping")
    names = [f.name for f in dataclasses.fields(kind)]
    for key in values:
        if key not in names:
            raise UserError(f"unknown field {section}.{key}{_suggest(key, names, section)}")
    hints = get_type_hints(kind)
    return kind(**{key: _build(hints[key], value or {}, f"{section}.{key}")
                   if dataclasses.is_dataclass(hints[key])
                   else _coerce(value, hints[key], f"{section}.{key}")
                   for key, value in values.items()})


def _suggest(name: str, names: list[str], section: str) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(f'{section}.{c}' for c in close)}?)" if close else ""


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise UserError."""
    text = getattr(hint, "__name__", str(hint))
    if value is None:
        if "None" in text:
            return None
        raise UserError(f"{name} cannot be empty")
    if text.startswith("list"):  # checked by the config's own validate
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {value!r}")
        return list(value)
    try:
        if hint is bool or text == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int or text.startswith("int"):
            if isinstance(value, str) and value.lower() in ("none", "null") and "None" in text:
                return None
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        if hint is float or text.startswith("float"):
            return float(value)
        if isinstance(value, str) and value.lower() in ("none", "null") and "None" in text:
            return None
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a valid {text}") from None


def override_dict(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `section.field=value` (or `section.sub.field=value`) in a config's dict form,
    unvalidated: the caller validates once, after every change (flags and --set) is in."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("model", "train", "data"):
            raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of "
                            "model, train, data (e.g. --set model.d_model=384)")
        *parents, leaf = name.split(".")
        target = raw[section]
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise UserError(f"--set {item!r}: {section}.{part} is not a section of fields")
            target = target[part]
        target[leaf] = yaml.safe_load(value) if value.strip() else None
    return raw
