"""How a run trains (TrainConfig), on what (DataConfig), distilling what (DistillConfig), and the
whole run (RunConfig, saved as config.yaml)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from burrow.config.fields import build_section, check_choice, check_positive, yaml_problem
from burrow.config.model import ModelConfig
from burrow.errors import UserError


@dataclass
class TrainConfig:
    """How a model is trained: steps, batch, optimiser, schedule, precision, checkpoints."""

    # Number of optimiser steps.
    max_steps: int = 1000
    # Tokens per optimiser step (batch_size * seq_len * accumulation * world size).
    batch_tokens: int = 8192
    # Batch ramp (PaLM §5): "STEP:TOKENS,..." = TOKENS tokens per step from optimiser step STEP
    # (0-based) on; batch_tokens before the first STEP; "" = batch_tokens throughout.
    batch_ramp: str = ""
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
    # Schedule after warmup: "cosine" (Gopher), "constant", "wsd" (warmup-stable-decay),
    # "rsqrt" (T5's inverse square root exactly: lr * sqrt(k / max(step, k)), k = warmup_steps,
    # no linear warmup, no floor; lr 1e-2 and k 10,000 are T5's and PaLM's) or "warmup_rsqrt"
    # (a linear warmup to lr, then lr * sqrt(warmup_steps / step), not below the floor).
    schedule: str = "cosine"
    # Fraction of the steps spent in the final linear decay of the "wsd" schedule.
    decay_fraction: float = 0.2
    # Steps of the "wsd" decay, ending at the schedule's last step; 0 = decay_fraction of them.
    # Fixed, it lets a run be extended in its stable phase and decayed when it ends.
    decay_steps: int = 0
    # Steps the "cosine" and "wsd" schedules span, then the floor; 0 = max_steps. Fixed, a run
    # resumed with a larger max_steps keeps the rates of the run it continues.
    schedule_steps: int = 0
    # "adamw" (Gopher's Adam is AdamW with weight_decay 0; Chinchilla) or "adafactor" (PaLM's:
    # not factored, with momentum beta1 and parameter scaling; train/adafactor.py).
    optimizer: str = "adamw"
    # Weight decay on matrices: each step multiplies them by 1 - lr * weight_decay.
    weight_decay: float = 0.1
    # p > 0: weight decay follows the rate, each step multiplying matrices by 1 - lr^p in place
    # of weight_decay (PaLM §5: "dynamic weight decay of lr^2.0", p = 2); 0 = off.
    weight_decay_lr_power: float = 0.0
    # beta1 (AdamW; Adafactor's momentum, 0 = none).
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.95
    # Adafactor's second-moment decay: beta2 at step t (1-based) = 1 - t^-beta2_decay (PaLM: 0.8).
    beta2_decay: float = 0.8
    # AdamW epsilon.
    eps: float = 1e-8
    # Clip the global gradient norm to this value; 0 = off.
    grad_clip: float = 1.0
    # Evaluate on held-out data every N steps (and at the end); 0 = only at the end.
    eval_every: int = 200
    # Held-out tokens per periodic evaluation (the final `burrow eval` uses all of them).
    eval_tokens: int = 65536
    # lm-evaluation-harness tasks evaluated during training, comma-separated (docs/evaluation.md,
    # e.g. "stdlib_docstrings"); "" = none.
    eval_tasks: str = ""
    # Evaluate eval_tasks every N steps (and at the end); 0 = only at the end.
    eval_tasks_every: int = 0
    # Documents per task in those evaluations; 0 = all.
    eval_tasks_limit: int = 0
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
    # Parameters stored in "fp32" (master weights) or "bf16", updated by stochastic rounding.
    param_dtype: str = "fp32"
    # Data parallelism under torchrun: "none", "ddp" or "fsdp" (FSDP2, sharded checkpoints).
    parallel: str = "none"
    # Split each block's heads and hidden units and the vocabulary over this many ranks
    # (tensor parallelism, with fsdp or none).
    tensor_parallel: int = 1
    # Data-parallel replicas; 0 = every data-parallel rank under ddp, 1 under fsdp (more:
    # HSDP, replicas of the shards).
    data_parallel_replicate: int = 0
    # Data-parallel shards (fsdp); 0 = the ranks left: world / (replicas x tensor_parallel).
    data_parallel_shard: int = 0
    # Split each sparse layer's experts over this many ranks (expert parallelism, with ddp).
    expert_parallel: int = 1
    # Pipeline stages (torch.distributed.pipelining): the blocks cut into this many consecutive
    # parts, the embedding on the first, the final norm, head and loss on the last.
    pipeline_parallel: int = 1
    # Pipeline schedule: "1f1b" (a backward after each forward once the pipeline is full) or
    # "gpipe" (every forward, then every backward: more activations held at once).
    pipeline_schedule: str = "1f1b"
    # Micro-batches per step under pipeline parallelism; 0 = as many as batch_tokens gives with
    # micro_batch_size, at least the number of stages. Set, it cuts each data-parallel rank's
    # sequences of a step into this many micro-batches (micro_batch_size then follows).
    pipeline_microbatches: int = 0
    # Blocks per pipeline stage, first stage first, e.g. "3,3"; "" = balanced.
    pipeline_split: str = ""
    # Blocks whose activations are recomputed in the backward pass (activation
    # checkpointing): "none", "all", or block indices such as "0,2,5".
    checkpoint_layers: str = "none"
    # Each layer's data-parallel layout under fsdp (Galvatron: a strategy per layer): "none"
    # (every layer as data_parallel_replicate x data_parallel_shard), or REPLICASxSHARDS for
    # the embedding, each block and the head in order, e.g. "1x4,4x1,2x2,1x4" for two blocks
    # on 4 data-parallel ranks; each product is the data-parallel degree.
    layer_layouts: str = "none"
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
                     "expert_parallel", "tensor_parallel", "pipeline_parallel"):
            check_positive(getattr(self, name), f"train.{name}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "grad_clip",
                     "weight_decay", "weight_decay_lr_power", "eval_tokens", "eval_tasks_every",
                     "eval_tasks_limit", "spike_factor",
                     "spike_rollback", "spike_skip", "decay_steps", "schedule_steps",
                     "data_parallel_replicate", "data_parallel_shard", "pipeline_microbatches"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        check_choice(self.schedule, ("cosine", "constant", "wsd", "rsqrt", "warmup_rsqrt"),
                     "train.schedule")
        check_choice(self.optimizer, ("adamw", "adafactor"), "train.optimizer")
        check_positive(self.beta2_decay, "train.beta2_decay")
        check_choice(self.precision, ("auto", "fp32", "bf16"), "train.precision")
        check_choice(self.param_dtype, ("fp32", "bf16"), "train.param_dtype")
        self.check_bf16_parameters()
        check_choice(self.parallel, ("none", "ddp", "fsdp"), "train.parallel")
        check_choice(self.pipeline_schedule, ("1f1b", "gpipe"), "train.pipeline_schedule")
        self.checkpointed(None)
        self.layouts(None)
        self.pipeline_stages(None)
        self.batch_changes()
        if self.spike_factor and self.spike_factor <= 1.0:
            raise UserError(f"train.spike_factor must be above 1 (or 0 = off), got "
                            f"{self.spike_factor}")
        check_positive(self.spike_window, "train.spike_window")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")

    def check_bf16_parameters(self) -> None:
        """bf16 parameters compute in bf16, and their update swaps each parameter's storage for
        the step (train/stochastic_rounding.py), which sharded (distributed-tensor) parameters
        forbid."""
        if self.param_dtype != "bf16":
            return
        if self.precision == "fp32":
            raise UserError("train.param_dtype=bf16 computes in bf16: set train.precision to "
                            "auto or bf16, or train.param_dtype to fp32")
        if self.parallel == "fsdp" or self.tensor_parallel > 1 or self.pipeline_parallel > 1:
            raise UserError("train.param_dtype=bf16 trains with --parallel none or ddp, without "
                            "tensor or pipeline parallelism; use param_dtype fp32 with these")

    def checkpointed(self, n_layers: int | None) -> frozenset[int]:
        """The blocks checkpoint_layers names, of a model with `n_layers` (None: only check
        the spelling); UserError for a value that names none."""
        spec = self.checkpoint_layers.strip().lower()
        if spec == "none":
            return frozenset()
        if spec == "all":
            return frozenset(range(n_layers or 0))
        parts = [part.strip() for part in spec.strip("[]").split(",")]
        if not all(part.isdigit() for part in parts):
            raise UserError(f"train.checkpoint_layers={self.checkpoint_layers!r} is not none, "
                            "all or a list of block indices such as 0,2,5")
        layers = frozenset(int(part) for part in parts)
        if n_layers is not None and max(layers) >= n_layers:
            raise UserError(f"train.checkpoint_layers names block {max(layers)}, but the model "
                            f"has blocks 0 to {n_layers - 1}")
        return layers

    def layouts(self, n_layers: int | None) -> list[tuple[int, int]] | None:
        """(replicas, shards) of each layer that layer_layouts names, the embedding first and
        the head last, of a model with `n_layers` blocks (None: only check the spelling);
        None for "none"."""
        spec = self.layer_layouts.replace(" ", "").lower()
        if spec == "none":
            return None
        entries = spec.split(",")
        if not all(re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", entry) for entry in entries):
            raise UserError(f"train.layer_layouts={self.layer_layouts!r} is not none or a list "
                            "of REPLICASxSHARDS, one per layer, such as 1x4,4x1,2x2,1x4")
        if n_layers is not None and len(entries) != n_layers + 2:
            raise UserError(f"train.layer_layouts gives {len(entries)} layouts, but the model "
                            f"has {n_layers + 2} layers (the embedding, {n_layers} blocks, the "
                            "head); give one per layer, or none")
        return [(int(replicas), int(shards))
                for replicas, shards in (entry.split("x") for entry in entries)]

    def batch_changes(self) -> list[tuple[int, int]]:
        """(first step, tokens per step) of each entry of batch_ramp, in order; UserError for a
        ramp that is misspelt, starts at step 0 (that batch is batch_tokens) or goes back in
        steps. Whole micro-batches are checked by train/batches.py, which knows the ranks."""
        spec = self.batch_ramp.replace(" ", "")
        if not spec:
            return []
        entries = spec.split(",")
        if not all(re.fullmatch(r"[0-9]+:[0-9]+", entry) for entry in entries):
            raise UserError(f"train.batch_ramp={self.batch_ramp!r} is not a list of STEP:TOKENS "
                            "such as 50000:2097152,115000:4194304")
        changes = [tuple(map(int, entry.split(":"))) for entry in entries]
        previous = None
        for step, tokens in changes:
            if previous is not None and step <= previous:
                raise UserError(f"train.batch_ramp={self.batch_ramp!r}: step {step} comes after "
                                f"step {previous}; list the steps in increasing order, each once")
            if step == 0:
                raise UserError(f"train.batch_ramp={self.batch_ramp!r} starts at step 0, whose "
                                "batch is train.batch_tokens; set --batch-tokens instead")
            if tokens == 0:
                raise UserError(f"train.batch_ramp={self.batch_ramp!r}: the batch from step "
                                f"{step} has 0 tokens; give a positive number")
            previous = step
        return changes

    def pipeline_stages(self, n_layers: int | None) -> list[int]:
        """Blocks per pipeline stage of a model with `n_layers` (None: only check the
        spelling): pipeline_split, or the blocks spread evenly, the earlier stages taking one
        more where they do not divide; UserError for a split that cannot be."""
        spec, pp = self.pipeline_split.strip(), self.pipeline_parallel
        if not spec:
            if n_layers is None:
                return []
            if n_layers < pp:
                raise UserError(f"train.pipeline_parallel={pp} stages need at least {pp} "
                                f"blocks; the model has {n_layers}")
            return [n_layers // pp + (stage < n_layers % pp) for stage in range(pp)]
        parts = [part.strip() for part in spec.split(",")]
        if not all(part.isdigit() for part in parts):
            raise UserError(f"train.pipeline_split={spec!r} is not a list of block counts such "
                            "as 3,3")
        counts = [int(part) for part in parts]
        if len(counts) != pp:
            raise UserError(f"train.pipeline_split={spec!r} gives {len(counts)} stages, but "
                            f"train.pipeline_parallel is {pp}; give one count per stage")
        if any(count == 0 for count in counts[1:-1]) or (pp > 1 and not any(counts)):
            raise UserError(f"train.pipeline_split={spec!r}: a middle stage needs at least one "
                            "block (the first holds the embedding, the last the head)")
        if n_layers is not None and sum(counts) != n_layers:
            raise UserError(f"train.pipeline_split={spec!r} holds {sum(counts)} blocks, the "
                            f"model has {n_layers}; make the counts add up to {n_layers}")
        return counts


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
    # RETRO: the chunk database (`burrow retro build`) a model with model.retro retrieves from;
    # each chunk's neighbours are looked up once and stored in it.
    retro_db: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        check_choice(self.tokenizer_type, ("bpe", "unigram"), "data.tokenizer_type")


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
    # Name of the paper's recipe the run was set up with (`--recipe`, burrow/recipes.py), for
    # the record: its values are in the train and model sections.
    recipe: str | None = None
    # Set in runs made by `burrow distill`: the teacher and the weights of the loss.
    distill: DistillConfig | None = None
    # Set in runs made by `burrow train --retro-fit RUN`: the trained run whose weights the
    # RETRO model starts from and keeps frozen (RETRO §4.4).
    retro_fit: str | None = None

    def validate(self) -> None:
        """Check each part and the constraints between them."""
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.distill is not None:
            self.distill.validate()
            if self.train.tensor_parallel > 1:
                raise UserError("distillation under tensor parallelism is not supported (the "
                                "teacher's logits would be split); drop --tensor-parallel")
            if self.model.moe.enabled:
                raise UserError(
                    f"the student {self.preset or 'model'} is sparse (model.moe.num_experts="
                    f"{self.model.moe.num_experts}); distillation makes a dense model (Switch "
                    "§4): choose a dense --student preset")
        retro = self.model.retro
        if retro is None and self.data.retro_db is not None:
            raise UserError(f"--retro-db {self.data.retro_db}: this model has no retrieval "
                            "blocks; choose a retro- preset or set model.retro")
        if self.retro_fit is not None and retro is None:
            raise UserError("retro-fitting adds retrieval to a model: model.retro must be set")
        if retro is not None and self.train.seq_len % retro.chunk_size:
            raise UserError(f"train.seq_len={self.train.seq_len} must be a multiple of "
                            f"model.retro.chunk_size={retro.chunk_size} (RETRO retrieves for "
                            "whole chunks)")
        self.train.checkpointed(self.model.n_layers)
        self.train.layouts(self.model.n_layers)
        self.train.pipeline_stages(self.model.n_layers)
        if self.train.seq_len > self.model.max_seq_len:
            raise UserError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; lower --seq-len or raise model.max_seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["distill"] is None:  # an ordinary run: no section to show
            del raw["distill"]
        if raw["retro_fit"] is None:
            del raw["retro_fit"]
        for section in ("retro", "adatape"):  # no retrieval, no tape: no section to show
            if raw["model"][section] is None:
                del raw["model"][section]
        if self.model.layers is None:  # derived from the other fields: nothing to show
            del raw["model"]["layers"]
        else:
            raw["model"]["layers"] = [spec.to_dict() for spec in self.model.layers]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw)
        parts = {name: build_section(kind, raw.pop(name, {}) or {}, name)
                 for name, kind in (("model", ModelConfig), ("train", TrainConfig),
                                    ("data", DataConfig))}
        preset, distill = raw.pop("preset", None), raw.pop("distill", None)
        retro_fit, recipe = raw.pop("retro_fit", None), raw.pop("recipe", None)
        if raw:
            raise UserError(f"unknown config section(s): {', '.join(sorted(raw))}")
        if distill is not None:
            distill = build_section(DistillConfig, distill, "distill")
        cfg = cls(preset=preset, distill=distill, retro_fit=retro_fit, recipe=recipe, **parts)
        cfg.validate()
        return cfg

    def save(self, path: Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path, *, partial: bool = False) -> RunConfig:
        """Read a config file. A run's own config.yaml is written whole, so one that lacks a
        section (model, train or data) is refused; `partial=True` is for a user's file for a new
        run (`burrow train --config`), whose missing sections take their defaults."""
        from burrow.paths import problem_of

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"config file {path} is a directory; give the YAML file itself "
                            f"(e.g. {path / 'config.yaml'})") from None
        except OSError as error:
            raise UserError(f"config file {path} cannot be read ({problem_of(error)})") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text; give a YAML file") from None
        except yaml.YAMLError as error:
            raise UserError(f"config file {path} is not valid YAML: {yaml_problem(error)}"
                            ) from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
        missing = [name for name in ("model", "train", "data") if name not in raw]
        known = {"model", "train", "data", "preset", "distill"}
        if missing and not partial and set(raw) <= known:  # unknown sections: from_dict says
            raise UserError(f"config file {path} lacks the section(s) {', '.join(missing)}: a "
                            "run's config.yaml holds model, train and data; restore the file, or "
                            "start a new run with --config FILE (which may leave sections out)")
        return cls.from_dict(raw)
