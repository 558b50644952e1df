"""Reading a run directory back: config, tokenizer, latest weights, prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from burrow.config import RunConfig
from burrow.data import Tokenizer
from burrow.errors import UserError
from burrow.model import Transformer
from burrow.train.checkpoint import latest_checkpoint, load_weights


def check_run_dir(run_dir: Path) -> Path:
    """The run directory, or UserError if it is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); train one with "
                        "`burrow train --out DIR`")
    return run_dir


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             checkpoint: str | Path | None = None) -> tuple[Transformer, Tokenizer, RunConfig]:
    """(model in eval mode, tokenizer, config) of a run, from its latest checkpoint."""
    run_dir = check_run_dir(Path(run_dir))
    cfg = RunConfig.load(run_dir / "config.yaml")
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first or resume it with "
                        f"`burrow train --out {run_dir} --resume`")
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model = model.to_empty(device=device)
    load_weights(path, model)
    model.eval()
    return model, tokenizer, cfg


def prepared_data_of(run_dir: Path) -> Path | None:
    """Where the run's prepared data lives, if it is still there."""
    record = Path(run_dir) / "data.json"
    if not record.is_file():
        return None
    prepared = Path(json.loads(record.read_text())["prepared"])
    return prepared if (prepared / "manifest.json").is_file() else None
