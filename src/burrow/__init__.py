"""burrow: plan, train, scale and evaluate transformer language models.

    import burrow
    cfg = burrow.presets.get("nano")
    model = burrow.Transformer(cfg)
    model, tokenizer, cfg = burrow.load_run("runs/nano")
"""

from burrow import presets
from burrow.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from burrow.errors import UserError
from burrow.model import Transformer
from burrow.run import load_run

__version__ = "0.1.0"

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "Transformer", "UserError",
           "__version__", "load_run", "presets"]
