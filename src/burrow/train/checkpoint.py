"""Checkpoints that are either whole or absent, from one process or many.

A checkpoint is the directory `checkpoints/step_N/` holding either
    model.safetensors   the full weights              (one process, or DDP: rank 0 writes)
    optimizer.pt        the optimiser state, keyed by parameter name (tensors and numbers only)
or, under FSDP2, the same two as sharded torch.distributed.checkpoint directories
    model/  optimizer/  (every rank writes its shard)
and in both cases
    trainer.pt          step, tokens trained on, loader state, RNG states: what the loop needs
                        to continue exactly.
Both kinds load into any number of processes: a run saved by N processes resumes with M or 1.
Experts split over ranks (parallel/expert.py) are gathered before saving and sliced when
loading, so the files always hold every expert, whatever the expert-parallel degree.
    checkpoint.json     the size and sha256 of every other file, and what the trainer records
                        (the run config, the parallel layout), written last.
Everything is written into `step_N.tmp-TOKEN/`, fsynced, then renamed by rank 0: a reader trusts
only directories that carry their final name, so a crash at any moment leaves the last good one.
A checkpoint is called corrupt only when a file fails its checksum; checkpoints written before
checksums load as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
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
from burrow.files import new_file_mode, write_text
from burrow.model import Transformer
from burrow.parallel.expert import full_expert_optimizer_state, full_expert_weights, local_experts
from burrow.parallel.runtime import Runtime

_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^step_\d+\.tmp")
RECORD = "checkpoint.json"
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


def whole_copy(model: nn.Module, device: torch.device, runtime: Runtime) -> nn.Module | None:
    """A plain copy of a split model with all its weights, on rank 0 (None elsewhere); for what
    needs every weight at hand, e.g. sampling with a KV cache. Collective."""
    # Weights split over two mesh dimensions (FSDP x TP) are gathered by two all-gathers,
    # which torch logs as a warning on every rank: expected here, nothing to act on.
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        weights = model_state(model)
    finally:
        log.setLevel(level)
    if not runtime.is_main:
        return None
    copy = Transformer(model.cfg).to(device)
    copy.load_state_dict(weights)
    return copy


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
                    keep: int = 0, *, sharded: bool = False, runtime: Runtime = _ALONE,
                    record: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step_{step}/ atomically; keep only the newest `keep` (0 = all).

    `record` (plain values: the run config, the parallel layout) goes into checkpoint.json with
    the files' checksums. Collective when `runtime` is distributed: every rank must call it.
    """
    root = Path(run_dir) / "checkpoints"
    final, staging = root / f"step_{step}", root / f"step_{step}.tmp-{_staging_token(runtime)}"
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():  # a writer that died mid-checkpoint (the run is locked)
            if _STAGING_DIR.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
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
            os.chmod(staging / "model.safetensors", new_file_mode())  # safetensors says 0600
            torch.save(optimizer_full, staging / "optimizer.pt")
    runtime.barrier()
    if runtime.is_main:
        torch.save(trainer_state, staging / "trainer.pt")
        write_text(staging / RECORD, json.dumps(
            {"step": step, "files": _digests(staging), **(record or {})}, indent=1) + "\n")
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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random number generators' states a checkpoint keeps (the CPU's, and the GPU's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the generators back to `rng_state`'s (a GPU's only where it was saved on one)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _staging_token(runtime: Runtime) -> str:
    """A name part unique to this save, the same on every rank (rank 0's, broadcast)."""
    token = [f"{os.getpid()}-{secrets.token_hex(4)}"]
    if runtime.distributed:
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _digests(directory: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the named files (default: every file but the record), in threads:
    hashlib lets go of the interpreter while it hashes."""
    if names is None:
        names = sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                       if path.is_file() and path.name != RECORD)
    with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: _digest(directory / name), names)))


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


def read_record(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's checkpoint.json (checksums, config, layout), or None for one written
    before checkpoints had it."""
    try:
        return json.loads((Path(checkpoint) / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint {checkpoint} is corrupt: {RECORD} cannot be read "
                        f"({error}); delete it to fall back to the previous one") from None


def verify_checkpoint(checkpoint: Path, part: str | None = None) -> None:
    """Check the files of a checkpoint against their recorded sizes and checksums: all of
    them, or those of `part` ("model": the weights; "state": optimiser and trainer state).
    Raise UserError saying "corrupt" if one fails; a checkpoint without a record passes."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    if record is None:
        return
    expected = {name: entry for name, entry in record["files"].items()
                if part is None or (part == "model") == name.startswith("model")}
    present = {name for name in expected if (checkpoint / name).is_file()}
    sized = {name for name in present
             if (checkpoint / name).stat().st_size == expected[name]["bytes"]}
    actual = _digests(checkpoint, sorted(sized))
    for name in sorted(expected):
        if name not in present:
            problem = f"is corrupt or truncated: {name} is missing"
        elif name not in sized:
            problem = (f"is corrupt or truncated: {name} has "
                       f"{(checkpoint / name).stat().st_size:,} bytes, "
                       f"{expected[name]['bytes']:,} when saved")
        elif actual[name]["sha256"] != expected[name]["sha256"]:
            problem = f"is corrupt: {name} does not match the checksum it was saved with"
        else:
            continue
        raise UserError(f"checkpoint {checkpoint} {problem}; delete it to fall back to the "
                        "previous one")


def checkpoint_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every weight in a checkpoint, read from the files' headers alone."""
    checkpoint = Path(checkpoint)
    try:
        if (checkpoint / "model").is_dir():
            metadata = dcp.FileSystemReader(checkpoint / "model").read_metadata()
            return {name: tuple(entry.size) for name, entry in
                    metadata.state_dict_metadata.items() if hasattr(entry, "size")}
        with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
            names = weights.keys()
            return {name: tuple(weights.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise _load_failed(checkpoint, error) from None


def _load_failed(checkpoint: Path, error: BaseException) -> UserError:
    """What to say when checked files (or files without checksums) fail to load."""
    reason = " ".join(str(error).strip().splitlines()[:1])
    if read_record(checkpoint) is None:  # no checksums: damage and misfit look alike
        return UserError(f"cannot load checkpoint {checkpoint} ({reason}); if it is damaged, "
                         "delete it to fall back to the previous one")
    return UserError(f"checkpoint {checkpoint} does not fit this run ({reason}); drop the "
                     "overrides that change the model, or start a new --out")


def load_weights(checkpoint: Path, model: nn.Module, *, verify: bool = True,
                 alone: bool = False) -> None:
    """Load a checkpoint's weights into `model` (plain or FSDP-sharded), or raise UserError.
    `verify` checks their checksums first (the trainer has checked them already). `alone`:
    this process reads shards by itself while its peers wait (not collective)."""
    checkpoint = Path(checkpoint)
    if verify:
        verify_checkpoint(checkpoint, "model")
    try:
        if (checkpoint / "model").is_dir():
            # Room for every expert, however this model splits them: the shards hold them all.
            weights = {**get_model_state_dict(model), **full_expert_weights(model)}
            with warnings.catch_warnings():  # loading shards into one process is intended
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(weights, checkpoint_id=checkpoint / "model", no_dist=alone)
            options = StateDictOptions()
        else:
            weights = load_file(checkpoint / "model.safetensors")
            options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, _stage_part(model, local_experts(model, weights)),
                             options=options)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        raise _load_failed(checkpoint, error) from None


def _stage_part(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """What a pipeline stage holds of a whole model's weights or optimiser state (a
    checkpoint of one process); all of it for a whole model."""
    from burrow.parallel.pipeline import StageModule

    return model.own(state) if isinstance(model, StageModule) else state


def load_training_state(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        *, verify: bool = True) -> dict[str, Any]:
    """Restore the optimiser and return the trainer state saved with a checkpoint."""
    checkpoint = Path(checkpoint)
    if verify:
        verify_checkpoint(checkpoint, "state")
    try:
        if (checkpoint / "optimizer").is_dir():
            state = get_optimizer_state_dict(model, optimizer)  # as for the weights above
            state["state"].update(full_expert_optimizer_state(model, optimizer))
            # The moments alone are read; the groups' settings stay this run's (the schedule
            # sets the rate and decay every step). DCP keeps one rank's copy of the groups,
            # which under pipeline parallelism names one stage's parameters only.
            groups = state.pop("param_groups")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(state, checkpoint_id=checkpoint / "optimizer")
            state["param_groups"] = groups
            options = StateDictOptions()
        else:
            state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
            options = StateDictOptions(full_state_dict=True)
        if state:
            state["state"] = local_experts(model, state["state"])
            if options.full_state_dict:
                state = _stage_part(model, state)
            set_optimizer_state_dict(model, optimizer, state, options=options)
        return torch.load(checkpoint / "trainer.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
        raise _load_failed(checkpoint, error) from None
