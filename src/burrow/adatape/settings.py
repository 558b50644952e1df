"""What a parity comparison is: ParityConfig, its defaults and their sources. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from burrow.errors import UserError

MODELS = ("adatape", "transformer", "universal_transformer")


@dataclass
class ParityConfig:
    """AdaTape, a Transformer and a Universal Transformer trained on one parity stream.

    The task's defaults are scenic's (scenic/projects/adatape/dataset/parity_dataset.py), the
    optimiser's its AdaTape recipe (adatape_vit/configs/imagenet_adatape_vit_config.py: Adam
    with weight decay 0.1, base learning rate 1e-3, linear warmup then cosine decay, gradient
    norm clipped at 1), with the peak learning rate at 3e-3 and the reference's one-token input,
    the settings measured to solve length 32 (docs/adatape.md). Sizes and steps are scaled down
    so that the three models train in about twenty minutes on two CPU cores.
    """

    length: int = 32  # scenic: seq_len 32
    sampling: str = "uniform"  # scenic: each element uniform over (+1, 0, -1)
    # "tokens": a position per element; "whole": the sequence embedded as one token, as
    # scenic's AdaTapeParity does (AdaTape and the Transformer; the UT halts per position and
    # keeps its tokens)
    input: str = "whole"
    eval_size: int = 2048  # scenic: 6,400 (num_train_examples // 10); fewer, for two cores
    models: list[str] = field(default_factory=lambda: list(MODELS))
    steps: int = 8000  # length 32 is learned from ~5,000 (docs/adatape.md)
    batch_size: int = 128
    lr: float = 3e-3  # scenic's ImageNet base_learning_rate is 1e-3; 3e-3 measured here
    warmup_steps: int | None = None  # None: steps // 10 (scenic: 10k of ~94k steps)
    eval_every: int | None = None  # None: steps // 20
    weight_decay: float = 0.1  # scenic: optimizer_configs.weight_decay
    grad_clip: float = 1.0  # scenic: max_grad_norm
    seed: int = 0
    device: str = "cpu"
    # AdaTape's fields (AdaTapeConfig); None = its default
    bank: str | None = None
    threshold: float | None = None
    max_tape_len: int | None = None
    top_k: int | None = None
    bank_size: int | None = None
    # tensor2tensor's Universal Transformer: act_loss_weight 0.01, act_epsilon 0.01
    ponder_cost: float = 0.01
    act_epsilon: float = 0.01
    # AdaTape's shape; the others' widths match its parameter count
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4

    def positions(self, name: str) -> int:
        """The positions model `name` reads besides its tape: the class token and the input."""
        whole = self.input == "whole" and name != "universal_transformer"
        return 1 + (1 if whole else self.length)

    @property
    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

    @property
    def evaluate_every(self) -> int:
        return max(1, self.steps // 20) if self.eval_every is None else self.eval_every

    @property
    def ut_max_steps(self) -> int:
        """tensor2tensor: act_max_steps = 2 x num_hidden_layers."""
        return 2 * self.n_layers

    def adatape_fields(self) -> dict:
        """The AdaTapeConfig fields given (the others keep AdaTapeConfig's defaults)."""
        names = ("bank", "threshold", "max_tape_len", "top_k", "bank_size")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def adatape_config(self):
        """model.adatape for this comparison, validated by AdaTapeConfig itself."""
        from burrow.config import AdaTapeConfig

        return AdaTapeConfig(**self.adatape_fields())

    def validate(self) -> ParityConfig:
        """self, or UserError naming the fix."""
        if self.length < 1:
            raise UserError(f"--length must be at least 1, got {self.length}")
        if self.input not in ("tokens", "whole"):
            raise UserError(f"unknown --input {self.input!r}; choose tokens or whole")
        if self.sampling not in ("uniform", "graves"):
            raise UserError(f"unknown --sampling {self.sampling!r}; choose uniform or graves")
        unknown = [name for name in self.models if name not in MODELS]
        if unknown or not self.models:
            raise UserError(f"unknown model {', '.join(unknown) or '(none given)'} in --models; "
                            f"choose among {','.join(MODELS)}")
        if len(set(self.models)) != len(self.models):
            raise UserError(f"--models names a model twice: {','.join(self.models)}")
        for name in ("steps", "batch_size", "eval_size", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % (2 * self.n_heads):
            raise UserError(f"--d-model {self.d_model} must be a multiple of twice --heads "
                            f"({2 * self.n_heads}): heads of an even width")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise UserError("lr and grad_clip must be > 0 and weight_decay >= 0")
        if self.warmup > self.steps:
            raise UserError(f"--warmup-steps {self.warmup} exceeds --steps {self.steps}")
        tape = self.adatape_config()
        if tape.bank == "input" and tape.top_k > self.length:
            raise UserError(f"--top-k {tape.top_k} exceeds the {self.length} entries of the "
                            "input-driven bank (one per element); lower --top-k or raise "
                            "--length")
        return self

    def describe(self) -> dict:
        """The config as plain JSON values, AdaTape's resolved."""
        return {**dataclasses.asdict(self), "warmup_steps": self.warmup,
                "eval_every": self.evaluate_every,
                "adatape": dataclasses.asdict(self.adatape_config())}


DEFAULTS = ParityConfig()
