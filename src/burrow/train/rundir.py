"""A run directory changes only once the run is sure to go on.

Before a resume writes anything, `check_resume` holds the new config against the checkpoint it
continues: the checkpoint's files against their checksums, the model's fields against those the
checkpoint was saved with (its checkpoint.json, or config.yaml for a checkpoint older than it),
and the weights' shapes against the new model's. The trainer then checks the data (tokenizer and
loader fingerprints) while loading, and only then `write_run_files` replaces config.yaml,
parallel.json, tokenizer.model and data.json, each atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from burrow.config import ModelConfig, RunConfig
from burrow.data import Tokenizer
from burrow.errors import UserError
from burrow.files import copy_file, replacing, write_text
from burrow.model import Transformer
from burrow.parallel import ParallelDims
from burrow.train.checkpoint import (
    checkpoint_shapes,
    latest_checkpoint,
    read_record,
    verify_checkpoint,
)
from burrow.train.optim import schedule_change

# Model fields a resume may change: how the model trains or reads positions, not the function
# its weights were trained to compute. Every other field must equal the checkpoint's.
CHANGEABLE = frozenset({
    "model.dropout", "model.z_loss", "model.init", "model.loss_kernel", "model.max_seq_len",
    "model.rope_theta", "model.moe.capacity_factor", "model.moe.eval_capacity_factor",
    "model.moe.dropless", "model.moe.balance_loss", "model.moe.router_z_loss",
    "model.moe.jitter", "model.moe.init_scale", "model.moe.expert_dropout"})


def checkpoint_to_continue(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a resume continues (None for a fresh run), or UserError if the run
    directory and `resume` disagree."""
    checkpoint = latest_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise UserError(f"--resume: no checkpoint in {run_dir}; start without --resume")
    if not resume and checkpoint is not None:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue that "
                        "run, or choose another --out")
    return checkpoint


def check_tokenizer(run_dir: Path, tokenizer: Tokenizer, cfg: RunConfig, *,
                    same_data: bool) -> None:
    """The data's tokenizer must fit the model and, with `same_data`, be the run's own."""
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the data's tokenizer has {tokenizer.vocab_size} tokens but "
                        f"model.vocab_size is {cfg.model.vocab_size}; pass --set "
                        f"model.vocab_size={tokenizer.vocab_size}")
    saved = run_dir / "tokenizer.model"
    if (same_data and saved.is_file()
            and Tokenizer.load(saved).fingerprint != tokenizer.fingerprint):
        raise UserError(f"{run_dir} was trained on other data (its tokenizer differs from this "
                        "data's); pass --allow-data-change to continue anyway")


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{"model.moe.num_experts": 0, "model.layers[1].ffn": "switch", ...} from nested values."""
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items()
                for key, leaf in flatten(item, f"{prefix}.{name}").items()}
    if isinstance(value, (list, tuple)):
        return {key: leaf for index, item in enumerate(value)
                for key, leaf in flatten(item, f"{prefix}[{index}]").items()}
    return {prefix: value}


def model_differences(saved: ModelConfig, new: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, config's value) for every model field that differs."""
    def fields(model: ModelConfig) -> dict[str, Any]:
        return flatten(RunConfig(model=model).to_dict()["model"], "model")

    before, after = fields(saved), fields(new)
    return [(name, before.get(name), after.get(name)) for name in sorted({*before, *after})
            if before.get(name) != after.get(name)]


def _listed(differences: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{name}: checkpoint {old}, config {new}" for name, old, new in differences)


def _saved_config(run_dir: Path, record: dict[str, Any]) -> RunConfig | None:
    """The config the checkpoint was saved with: its own record, else config.yaml."""
    if "config" in record:
        return RunConfig.from_dict(record["config"])
    saved = run_dir / "config.yaml"
    return RunConfig.load(saved) if saved.is_file() else None


def _shape_differences(checkpoint: Path, model: ModelConfig) -> list[tuple[str, Any, Any]]:
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape)
                    for name, tensor in Transformer(model).state_dict().items()}
    found = checkpoint_shapes(checkpoint)
    return [(name, found.get(name, "absent"), expected.get(name, "absent"))
            for name in sorted({*found, *expected}) if found.get(name) != expected.get(name)]


def check_resume(checkpoint: Path, run_dir: Path, cfg: RunConfig,
                 dims: ParallelDims) -> list[str]:
    """Raise UserError, naming what does not fit and the fix, if `cfg` cannot continue
    `checkpoint`; else return the one-line notes on what the resume changes."""
    verify_checkpoint(checkpoint)
    record = read_record(checkpoint) or {}
    saved = _saved_config(run_dir, record)
    differences = model_differences(saved.model, cfg.model) if saved else []
    fixed = [entry for entry in differences if entry[0] not in CHANGEABLE]
    if fixed:
        raise UserError(f"cannot resume {run_dir}: the model does not fit checkpoint "
                        f"{checkpoint.name} ({_listed(fixed)}); drop the override, or start a "
                        "new --out")
    shapes = _shape_differences(checkpoint, cfg.model)
    if shapes:
        raise UserError(f"cannot resume {run_dir}: checkpoint {checkpoint.name} does not fit "
                        f"this model ({_listed(differences or shapes[:3])}); drop the "
                        "override, or start a new --out")
    notes = []
    if differences:
        notes.append(f"note: {_listed(differences)} (the weights load as they are)")
    step = int(record.get("step", checkpoint.name.rsplit("_", 1)[-1]))
    schedule = schedule_change(saved.train, cfg.train, step) if saved and step else None
    if schedule:
        notes.append(schedule)
    layout = record.get("parallel")
    if layout:  # older records lack the degrees added since: they were 1
        saved_dims = ParallelDims(**{**asdict(ParallelDims()), **layout})
        if saved_dims != dims:
            notes.append(f"note: checkpoint {checkpoint.name} was saved by "
                         f"{saved_dims.world_size} process(es) ({saved_dims.describe()}); this "
                         f"run has {dims.world_size} ({dims.describe()}) and re-splits it")
    return notes


def write_run_files(run_dir: Path, cfg: RunConfig, dims: ParallelDims, prepared: Path,
                    fingerprint: str) -> None:
    """config.yaml, parallel.json, tokenizer.model and data.json, each replaced whole."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with replacing(run_dir / "config.yaml") as staging:
        cfg.save(staging)
    with replacing(run_dir / "parallel.json") as staging:
        dims.save(staging)
    copy_file(Path(prepared) / "tokenizer.model", run_dir / "tokenizer.model")
    write_text(run_dir / "data.json", json.dumps(
        {"prepared": str(Path(prepared).resolve()), "fingerprint": fingerprint},
        indent=1) + "\n")
