"""Checkpoints that are either whole or absent.

A checkpoint is the directory `checkpoints/step_N/` holding
    model.safetensors   the weights
    optimizer.pt        the optimiser state (tensors and numbers only: loaded with weights_only)
    trainer.pt          step, loader state, RNG states, anything else the loop needs
It is written into `step_N.tmp/`, each file fsynced, then renamed: a reader trusts only
directories that carry their final name, so a crash at any moment leaves the last good one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from burrow.errors import UserError

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer.pt")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous CPU tensors, ready for safetensors."""
    return {name: tensor.detach().to("cpu").contiguous()
            for name, tensor in model.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
                    keep: int = 0) -> Path:
    """Write checkpoints/step_{step}/ atomically; keep only the newest `keep` (0 = all)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    staging = root / f"step_{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(model_state(model), staging / "model.safetensors", metadata={"step": str(step)})
    torch.save(optimizer.state_dict() if optimizer is not None else {}, staging / "optimizer.pt")
    torch.save(trainer_state, staging / "trainer.pt")
    for name in CHECKPOINT_FILES:
        _fsync(staging / name)
    if final.exists():  # the same step saved again (e.g. at the end): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync(root)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := _STEP_DIR.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model`, or raise UserError if it is corrupt or mismatched."""
    path = Path(checkpoint) / "model.safetensors"
    try:
        weights = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise UserError(f"checkpoint {checkpoint} is corrupt or truncated ({error}); delete it "
                        "to fall back to the previous one") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UserError(f"checkpoint {checkpoint} does not fit this model's config: "
                        f"{' '.join(first[:2])}") from None


def load_training_state(checkpoint: Path,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimiser and return the trainer state saved with a checkpoint."""
    try:
        optimizer.load_state_dict(torch.load(Path(checkpoint) / "optimizer.pt",
                                             weights_only=True))
        return torch.load(Path(checkpoint) / "trainer.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
        raise UserError(f"checkpoint {checkpoint} is corrupt or truncated ({error}); delete it "
                        "to fall back to the previous one") from None
