"""AdaTape's section of a model config (Xue et al., ICML 2023, "Adaptive Computation with Elastic
Input Sequence"), the checks that need the whole model, and the encoder's parameter count.

Defaults come from the paper and from the reference code (google-research/scenic,
scenic/projects/adatape: layers.py and adatape_vit/configs/imagenet_adatape_vit_config.py,
"the ImageNet config" below). Arithmetic only: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from burrow import blocks
from burrow.config.fields import check_choice, check_positive
from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.config.model import ModelConfig

BANK_KINDS = ("input", "learnable")
QUERY_KINDS = ("cls", "mean")
PONDER_KINDS = ("entropy", "max")


@dataclass
class AdaTapeConfig:
    """Adaptive tape reading (the paper's ATR) from a tape bank; the tape tokens it reads are
    appended to the input sequence of a bidirectional encoder (model/encoder.py)."""

    # Tape bank: "input" (a second embedding of the input tokens: the reference's parity
    # model and ImageNet config) or "learnable" (a trainable matrix of bank_size entries).
    bank: str = "input"
    # Entries of the learnable bank (the ImageNet config's tape_bank_size: 10,000).
    bank_size: int = 10000
    # Most tape tokens read, one per ATR step (the ImageNet config's num_tape_tokens: 10).
    max_tape_len: int = 10
    # Bank entries merged into one tape token per step (the reference reads num_tape_tokens //
    # threshold = 10 // 2.0 = 5, so that max_tape_len steps always reach the threshold).
    top_k: int = 5
    # Halting threshold on the accumulated top weights (the ImageNet config's act_epsilon: 2.0).
    threshold: float = 2.0
    # Weight of the ponder loss, the per-step remainder term (the ImageNet config: 0.01).
    act_loss_weight: float = 0.01
    # The remainder term of a step: "entropy" = 1 - sum_i w_i^2 (the ImageNet config) or
    # "max" = 1 - max_i w_i (the reference's other act_loss_type; "comparable" in its comment).
    ponder: str = "entropy"
    # The query that reads the bank: "cls" (the CLS token) or "mean" (the mean of the input
    # tokens; the ImageNet config's query_type follows its classifier, "gap").
    query: str = "mean"
    # The block before which the tape is read and appended: 0 = to the input (the paper's
    # overview; the reference README: "appended to inputs and fed to the transformer encoder");
    # the ImageNet config reads before block 1 (add_tape_token_to_layers = (1,)).
    read_layer: int = 0
    # Tape tokens get their own feed-forward layer in every block after the tape is read
    # (ffn part "tape_mlp"); False = the ordinary MLP for every position.
    tape_ffn: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the field and the fix if a value is invalid."""
        check_choice(self.bank, BANK_KINDS, "model.adatape.bank")
        check_choice(self.query, QUERY_KINDS, "model.adatape.query")
        check_choice(self.ponder, PONDER_KINDS, "model.adatape.ponder")
        for name in ("bank_size", "max_tape_len", "top_k", "threshold"):
            check_positive(getattr(self, name), f"model.adatape.{name}")
        if self.act_loss_weight < 0:
            raise UserError(f"model.adatape.act_loss_weight must be >= 0, got "
                            f"{self.act_loss_weight}")
        if self.read_layer < 0:
            raise UserError(f"model.adatape.read_layer must be >= 0, got {self.read_layer}")
        if self.bank == "learnable" and self.bank_size < self.top_k:
            raise UserError(f"model.adatape.bank_size={self.bank_size} is smaller than "
                            f"model.adatape.top_k={self.top_k}: a step reads top_k entries")


def check_adatape(cfg: ModelConfig) -> None:
    """UserError for a model AdaTape cannot run in: checks that need the whole model."""
    tape = cfg.adatape
    if tape.read_layer >= cfg.n_layers:
        raise UserError(f"model.adatape.read_layer={tape.read_layer} must be below "
                        f"model.n_layers={cfg.n_layers} (the tape is read before that block)")
    if cfg.positions == "relative":
        raise UserError("model.positions='relative' is causal-only here; AdaTape's encoder "
                        "takes 'learned' or 'rope'")
    if cfg.retro is not None:
        raise UserError("model.adatape and model.retro cannot be combined: unset one")
    if tape.query == "cls" and tape.bank == "learnable" and tape.read_layer == 0:
        # Before the first block the CLS token is one learned vector: every input would read
        # the same tape from a bank that does not depend on the input either.
        raise UserError("model.adatape.query='cls' with a learnable bank reads the same tape "
                        "for every input at read_layer=0; set model.adatape.read_layer >= 1 "
                        "or model.adatape.query='mean'")


def reader_params(cfg: ModelConfig) -> int:
    """The tape reader (model/adatape.py): the norm shared by query and bank (the reference's
    TapeBank.bank_norm) and the bank, a vocab x d embedding ("input") or a bank_size x d
    matrix ("learnable")."""
    tape = cfg.adatape
    rows = cfg.vocab_size if tape.bank == "input" else tape.bank_size
    return blocks.norm_params(cfg) + rows * cfg.d_model


def encoder_params(cfg: ModelConfig, num_classes: int = 0, *, embeddings: bool = True,
                   active: bool = False) -> int:
    """Exact parameter count of `EncoderClassifier(cfg, num_classes)` (model/encoder.py).

    Blocks and final norm, the CLS vector, the tape reader when cfg.adatape is set, the
    classification head (d x C weights and C biases; none for num_classes=0) and, unless
    `embeddings=False`, the token embedding and learned position table (there is no output
    embedding: the head reads the CLS token).
    """
    d = cfg.d_model
    total = blocks.norm_params(cfg) + d  # final norm, CLS
    total += sum(blocks.block_params(cfg, layer, active) for layer in range(cfg.n_layers))
    if cfg.adatape is not None:
        total += reader_params(cfg)
    total += num_classes * (d + 1)
    if embeddings:
        total += cfg.vocab_size * d
        if cfg.positions == "learned":
            total += cfg.max_seq_len * d
    return total
