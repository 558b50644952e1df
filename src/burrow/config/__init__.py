"""One typed config tree per run: ModelConfig, TrainConfig, DataConfig inside RunConfig.

Every field has a default and a one-line docstring (the comment above it). Configs validate
themselves and raise `UserError` naming the field and the fix; they round-trip through YAML and
accept dotted overrides (`--set model.d_model=384`).
"""

from burrow.config.adatape import AdaTapeConfig
from burrow.config.fields import field_docs, override_dict
from burrow.config.model import (
    BLOCK_KINDS,
    FFN_KINDS,
    INIT_KINDS,
    LOSS_KERNELS,
    NORM_KINDS,
    POSITION_KINDS,
    LayerSpec,
    ModelConfig,
    MoEConfig,
    RetroConfig,
)
from burrow.config.run import DataConfig, DistillConfig, RunConfig, TrainConfig

__all__ = [
    "BLOCK_KINDS",
    "FFN_KINDS",
    "INIT_KINDS",
    "LOSS_KERNELS",
    "NORM_KINDS",
    "POSITION_KINDS",
    "AdaTapeConfig",
    "DataConfig",
    "DistillConfig",
    "LayerSpec",
    "MoEConfig",
    "ModelConfig",
    "RetroConfig",
    "RunConfig",
    "TrainConfig",
    "field_docs",
    "override_dict",
]
