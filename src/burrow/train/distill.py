"""Distilling a sparse teacher into a dense student (Switch Transformer §4, Tables 6 and 7).

The student is a dense model that reads the teacher's tokens: it starts from the teacher's
non-expert weights (embeddings, attention, norms, dense MLPs, head) and learns from
0.75 x cross-entropy against the data's next tokens + 0.25 x cross-entropy against the
teacher's probabilities at temperature 1 (Switch Table 6). The report compares it with a dense
baseline of its shape trained without a teacher: Switch keeps ~30% of the quality gain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from burrow import presets
from burrow.config import DistillConfig, ModelConfig, RunConfig
from burrow.data import TokenDataset, Tokenizer, prepare_data
from burrow.errors import UserError
from burrow.eval import evaluate
from burrow.files import write_text
from burrow.model import ModelOutput, Transformer
from burrow.model.loss import output_loss
from burrow.parallel import resolve_device
from burrow.run import check_run_dir, load_run, prepared_data_of
from burrow.train.checkpoint import latest_checkpoint
from burrow.train.hardware import autocast_for
from burrow.train.launch import train
from burrow.train.metrics import format_count
from burrow.train.trainer import Trainer


def copy_non_expert_weights(student: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """Copy into `student` every teacher tensor whose name and shape it shares; return them.

    Switch §4 initialises the dense model "with the non-expert weights": experts and routers
    have no namesake in a dense model, so the student's MLPs in the teacher's sparse blocks
    keep their fresh init. Works on a sharded (FSDP) student too.
    """
    shapes = {name: tensor.shape for name, tensor in student.state_dict().items()}
    shared = {name: tensor for name, tensor in teacher.state_dict().items()
              if shapes.get(name) == tensor.shape}
    # A copy: set_model_state_dict fills the dict it is given with the missing tensors.
    set_model_state_dict(student, dict(shared),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    return shared


def gain_kept(teacher_loss: float, baseline_loss: float, student_loss: float) -> float | None:
    """Switch Table 6: the share of the teacher's improvement over the dense baseline that the
    distilled student keeps, (baseline - student) / (baseline - teacher); None when the teacher
    is no better than the baseline."""
    gain = baseline_loss - teacher_loss
    return (baseline_loss - student_loss) / gain if gain > 0 else None


def trained_config(run_dir: Path, role: str) -> RunConfig:
    """The config of a run that has a checkpoint, or UserError naming its `role`."""
    run_dir = check_run_dir(run_dir)
    if latest_checkpoint(run_dir) is None:
        raise UserError(f"the {role} {run_dir} has no checkpoint yet; train it first")
    return RunConfig.load(run_dir / "config.yaml")


def student_config(teacher_dir: Path, preset: str) -> tuple[RunConfig, list[str]]:
    """The run config of a `preset`-shaped student of the teacher in teacher_dir, and notes.

    The student takes the teacher's vocabulary and context, its data (tokenized with its
    tokenizer: data.keep_tokenizer) and, until flags say otherwise, its training settings.
    """
    teacher = trained_config(teacher_dir, "teacher")
    model = presets.get(preset)
    taken = {name: getattr(teacher.model, name) for name in ("vocab_size", "max_seq_len")}
    changed = [f"{name}={value} (the preset has {getattr(model, name)})"
               for name, value in taken.items() if getattr(model, name) != value]
    notes = [f"the student takes the teacher's {' and '.join(changed)}, so that it reads the "
             "teacher's tokens"] if changed else []
    cfg = RunConfig(model=dataclasses.replace(model, **taken),
                    # experts split over ranks: the dense student has none to split
                    train=dataclasses.replace(teacher.train, expert_parallel=1),
                    data=dataclasses.replace(teacher.data, keep_tokenizer=True), preset=preset,
                    distill=DistillConfig(teacher=str(Path(teacher_dir).resolve())))
    return cfg, notes


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in Transformer(cfg).state_dict().items()}


def check_baseline(baseline_dir: Path, cfg: RunConfig) -> None:
    """UserError unless baseline_dir is a trained run shaped like the student and on the
    teacher's vocabulary; checked before training, so that a wrong baseline costs no time."""
    baseline = trained_config(baseline_dir, "baseline")
    fingerprints = {Tokenizer.load(Path(run) / "tokenizer.model").fingerprint
                    for run in (baseline_dir, cfg.distill.teacher)}
    if len(fingerprints) > 1:
        raise UserError(f"the baseline {baseline_dir} has another vocabulary than the teacher "
                        "(its tokenizer differs); train it on the teacher's data")
    if _shapes(baseline.model) != _shapes(cfg.model):
        theirs, ours = _fields(baseline.model), _fields(cfg.model)
        differences = [f"{name}={value} (student: {ours[name]})"
                       for name, value in theirs.items() if value != ours[name]]
        raise UserError(f"the baseline {baseline_dir} is not shaped like the student: "
                        f"{', '.join(differences)}; train it with the student's preset")


def _fields(cfg: ModelConfig) -> dict[str, Any]:
    """{'model.d_model': 64, ..., 'model.moe.num_experts': 0, ...}"""
    fields = dataclasses.asdict(cfg)
    moe = fields.pop("moe")
    return {**{f"model.{name}": value for name, value in fields.items()},
            **{f"model.moe.{name}": value for name, value in moe.items()}}


class DistillationLoss:
    """Switch §4's objective, label_weight x (cross-entropy + z-loss against the labels) +
    teacher_weight x cross-entropy against softmax(teacher_logits) (temperature 1), in the
    model's loss kernel (model/loss.py). An objective for Transformer.forward; the soft
    cross-entropy comes back in the output's metrics."""

    def __init__(self, teacher_logits: torch.Tensor | None, label_weight: float,
                 teacher_weight: float):
        self.teacher_logits = teacher_logits
        self.label_weight, self.teacher_weight = label_weight, teacher_weight

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 scale: float, z_loss: float, kernel: str
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss, cross_entropy, soft_cross_entropy = output_loss(
            hidden, weight, labels, kernel=kernel, teacher_logits=self.teacher_logits,
            scale=scale, z_loss=z_loss, label_weight=self.label_weight,
            teacher_weight=self.teacher_weight)
        return loss, cross_entropy, {"soft_cross_entropy": soft_cross_entropy.detach()}


class Distiller(Trainer):
    """A Trainer whose loss mixes the labels with a frozen teacher's probabilities (Switch §4).

    The teacher (cfg.distill.teacher's latest checkpoint) runs in eval mode without gradients;
    checkpoints hold the student alone, so resuming reloads the teacher. Train rows of
    metrics.jsonl add soft_cross_entropy (against the teacher) to cross_entropy (the labels),
    except with teacher_weight 0 (Switch Table 6's initialisation baseline), where the teacher
    is not run.
    """

    def setup(self) -> None:
        spec = self.cfg.distill
        self.teacher = load_run(spec.teacher, device=self.device)[0].requires_grad_(False)
        tokenizer = self.run_dir / "tokenizer.model"  # data.keep_tokenizer reads it from here
        if self.runtime.is_main and not tokenizer.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(spec.teacher) / "tokenizer.model", tokenizer)
        self.runtime.barrier()
        super().setup()
        if not self.resume:
            shared = copy_non_expert_weights(self.model, self.teacher)
            copied = sum(tensor.numel() for tensor in shared.values())
            self.log(f"student: {len(shared)} of {len(self.model.state_dict())} tensors, "
                     f"{copied:,} of {self.cfg.model.num_params():,} parameters, copied from "
                     f"the teacher's non-expert weights; the rest start fresh")
        if spec.teacher_weight == 0:
            self.teacher = None  # the initialisation baseline: no need to hold it any longer
        self.soft_cross_entropy: float | None = None

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, **inputs_more: Any
                     ) -> ModelOutput:
        spec = self.cfg.distill
        if self.teacher is None:
            # Switch Table 6's initialisation baseline: the teacher's non-expert weights, then
            # the labels alone.
            return self.forward(inputs, targets, **inputs_more,
                                objective=DistillationLoss(None, spec.label_weight, 0.0))
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).logits
        out = self.forward(inputs, targets, **inputs_more, objective=DistillationLoss(
            teacher_logits, spec.label_weight, spec.teacher_weight))
        self.soft_sum += out.metrics["soft_cross_entropy"]
        return out

    def train_step(self) -> tuple[float, float, float]:
        # The step's soft cross-entropy, averaged like its loss over micro-batches and ranks.
        self.soft_sum = torch.zeros((), device=self.device)
        result = super().train_step()
        self.soft_cross_entropy = (float(self.runtime.mean(self.soft_sum) / self.accumulation)
                                   if self.cfg.distill.teacher_weight > 0 else None)
        return result

    def record(self, row: dict[str, Any]) -> None:
        if row.get("split") == "train" and self.soft_cross_entropy is not None:
            row = {**row, "soft_cross_entropy": self.soft_cross_entropy}
        super().record(row)


def distill(cfg: RunConfig, run_dir: Path, *, resume: bool = False,
            baseline: Path | None = None, verbose: bool = True) -> dict[str, Any] | None:
    """Train the student `cfg` describes into run_dir, then report (None if stopped early)."""
    if baseline is not None:
        check_baseline(baseline, cfg)
    summary = train(cfg, run_dir, resume=resume, verbose=verbose, trainer_class=Distiller)
    if summary["interrupted"] or int(os.environ.get("RANK", "0")) != 0:
        return None  # under torchrun one process reports
    return distill_report(run_dir, baseline)


def distill_report(run_dir: Path, baseline: Path | None = None) -> dict[str, Any]:
    """Teacher, student (and baseline) on the same held-out tokens; written to distill.json.

    Every model reads the whole held-out split in windows of the same length.
    """
    cfg = RunConfig.load(Path(run_dir) / "config.yaml")
    runs = {"teacher": Path(cfg.distill.teacher), "student": Path(run_dir)}
    if baseline is not None:
        runs["baseline"] = Path(baseline)
    contexts = [RunConfig.load(path / "config.yaml").model.max_seq_len for path in runs.values()]
    seq_len = min([cfg.train.seq_len, *contexts])
    prepared = prepared_data_of(run_dir) or prepare_data(cfg, progress=False, run_dir=run_dir)
    held_out = TokenDataset(prepared, "val")
    scores = {role: _score(path, held_out, seq_len, cfg) for role, path in runs.items()}
    kept = None if baseline is None else gain_kept(
        scores["teacher"]["loss"], scores["baseline"]["loss"], scores["student"]["loss"])
    report = {"tokens": held_out.num_tokens - 1, "seq_len": seq_len,
              "teacher": scores["teacher"], "baseline": scores.get("baseline"),
              "student": scores["student"],
              "gain_kept_percent": None if kept is None else 100 * kept}
    write_text(Path(run_dir) / "distill.json", json.dumps(report, indent=1) + "\n")
    return report


def _score(run_dir: Path, held_out: TokenDataset, seq_len: int, cfg: RunConfig
           ) -> dict[str, Any]:
    """One run's held-out loss and bits per byte, evaluated as `cfg` trains, and its size."""
    device = resolve_device(cfg.train.device)
    model, _, run_cfg = load_run(run_dir, device=device)
    result = evaluate(model, held_out, seq_len=seq_len, batch_size=cfg.train.micro_batch_size,
                      device=device, autocast=autocast_for(device, cfg.train.precision))
    return {"run": str(run_dir), "loss": result["loss"], "bits_per_byte": result["bits_per_byte"],
            "params": run_cfg.model.num_params(),
            "active_params": run_cfg.model.num_params(active=True)}


def format_distill(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    lines = [f"held-out split: {report['tokens']:,} tokens, windows of {report['seq_len']}"]
    for role in ("teacher", "baseline", "student"):
        part = report[role]
        if part is None:
            continue
        active = (f" ({format_count(part['active_params'])} active)"
                  if part["active_params"] != part["params"] else "")
        lines.append(f"{role:<9} loss {part['loss']:.4f}  {part['bits_per_byte']:.3f} bits/byte  "
                     f"{format_count(part['params'])} parameters{active}  {part['run']}")
    if report["baseline"] is None:
        lines.append("no --baseline: train a dense model of the student's shape on the same "
                     "data for the same steps to measure the share of the gain kept")
    elif report["gain_kept_percent"] is None:
        lines.append("the teacher is no better than the baseline: there is no gain to keep")
    else:
        lines.append(f"gain kept  {report['gain_kept_percent']:.1f}% of the teacher's "
                     "improvement over the baseline (Switch Transformer Table 6: ~30%)")
    return "\n".join(lines)
