"""burrow: plan, train, scale and evaluate transformer language models.

    import burrow
    cfg = burrow.presets.get("nano")
    model = burrow.Transformer(cfg)
    model, tokenizer, cfg = burrow.load_run("runs/demo")
    tokens = burrow.generate(model, input_ids, max_new_tokens=50)

The configs and presets are plain arithmetic; the model, generation and runs (which need torch)
are imported on first use.
"""

from typing import TYPE_CHECKING, Any

from burrow import presets
from burrow.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.infer import generate
    from burrow.model import Transformer
    from burrow.run import load_run

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read (PEP 562)
_LAZY = {"Transformer": "burrow.model", "generate": "burrow.infer", "load_run": "burrow.run"}

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "Transformer", "UserError",
           "__version__", "generate", "load_run", "presets"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'burrow' has no attribute {name!r}")
