"""Checkpoints that are either whole or absent, from one process or many.

A checkpoint is the directory `checkpoints/step_N/` holding either
    model.safetensors   the full weights              (one process, or DDP: rank 0 writes)
    optimizer.pt        the optimiser state, keyed by parameter name (tensors and numbers only)
or, under FSDP2, the same two as sharded torch.distributed.checkpoint directories
    model/  optimizer/  (every rank writes its shard)
and in both cases
    trainer.pt          step, loader state, RNG states: what the loop needs to continue exactly.
Both kinds load into any number of processes: a run saved by N processes resumes with M or 1.
Experts split over ranks (parallel/expert.py) are gathered before saving and sliced when
loading, so the files always hold every expert, whatever the expert-parallel degree.
Everything is written into `step_N.tmp/`, fsynced, then renamed by rank 0: a reader trusts only
directories that carry their final name, so a crash at any moment leaves the last good one.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from burrow.errors import UserError
from burrow.parallel.expert import full_expert_optimizer_state, full_expert_weights, local_experts
from burrow.parallel.runtime import Runtime

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_ALONE = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _fsync_tree(path: Path) -> None:
    for item in [*sorted(path.rglob("*")), path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights as contiguous CPU tensors, ready for safetensors (on rank 0
    when distributed; collective, as split experts are gathered from their ranks)."""
    experts = full_expert_weights(model)
    return {name: experts.get(name, tensor).detach().to("cpu").contiguous()
            for name, tensor in get_model_state_dict(model, options=_FULL).items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimiser state keyed by parameter name (on rank 0 when distributed;
    collective, as split experts' moments are gathered from their ranks)."""
    experts = full_expert_optimizer_state(model, optimizer)
    state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if state:
        state["state"].update(experts)
    return state


def save_checkpoint(run_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
                    keep: int = 0, *, sharded: bool = False,
                    runtime: Runtime = _ALONE) -> Path:
    """Write checkpoints/step_{step}/ atomically; keep only the newest `keep` (0 = all).

    Collective when `runtime` is distributed: every rank must call it.
    """
    root = Path(run_dir) / "checkpoints"
    final, staging = root / f"step_{step}", root / f"step_{step}.tmp"
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    runtime.barrier()
    if sharded:
        dcp.save(get_model_state_dict(model), checkpoint_id=staging / "model")
        if optimizer is not None:
            dcp.save(get_optimizer_state_dict(model, optimizer),
                     checkpoint_id=staging / "optimizer")
    else:
        weights = model_state(model)
        optimizer_full = optimizer_state(model, optimizer) if optimizer is not None else {}
        if runtime.is_main:
            save_file(weights, staging / "model.safetensors", metadata={"step": str(step)})
            torch.save(optimizer_full, staging / "optimizer.pt")
    runtime.barrier()
    if runtime.is_main:
        torch.save(trainer_state, staging / "trainer.pt")
        _fsync_tree(staging)
        if final.exists():  # the same step saved again (e.g. at the end): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_tree(root)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
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


def _corrupt(checkpoint: Path, error: BaseException) -> UserError:
    reason = " ".join(str(error).strip().splitlines()[:1])
    return UserError(f"checkpoint {checkpoint} is corrupt or truncated ({reason}); delete it "
                     "to fall back to the previous one")


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into `model` (plain or FSDP-sharded), or raise UserError."""
    checkpoint = Path(checkpoint)
    try:
        if (checkpoint / "model").is_dir():
            # Room for every expert, however this model splits them: the shards hold them all.
            weights = {**get_model_state_dict(model), **full_expert_weights(model)}
            with warnings.catch_warnings():  # loading shards into one process is intended
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(weights, checkpoint_id=checkpoint / "model")
            options = StateDictOptions()
        else:
            weights = load_file(checkpoint / "model.safetensors")
            options = StateDictOptions(full_state_dict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        raise _corrupt(checkpoint, error) from None
    try:
        set_model_state_dict(model, local_experts(model, weights), options=options)
    except (RuntimeError, KeyError, ValueError) as error:
        first = " ".join(str(error).strip().splitlines()[:2])
        raise UserError(f"checkpoint {checkpoint} does not fit this model's config: "
                        f"{first}") from None


def load_training_state(checkpoint: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimiser and return the trainer state saved with a checkpoint."""
    checkpoint = Path(checkpoint)
    try:
        if (checkpoint / "optimizer").is_dir():
            state = get_optimizer_state_dict(model, optimizer)  # as for the weights above
            state["state"].update(full_expert_optimizer_state(model, optimizer))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(state, checkpoint_id=checkpoint / "optimizer")
            options = StateDictOptions()
        else:
            state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
            options = StateDictOptions(full_state_dict=True)
        if state:
            state["state"] = local_experts(model, state["state"])
            set_optimizer_state_dict(model, optimizer, state, options=options)
        return torch.load(checkpoint / "trainer.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
        raise _corrupt(checkpoint, error) from None
