"""Distilling a sparse teacher into a dense student (Switch Transformer §4): the mixed loss, the
weights copied, the share of the gain kept, the command end to end and its bad inputs."""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from burrow import ModelConfig, Transformer
from burrow.cli import main
from burrow.config import MoEConfig
from burrow.data import train_tokenizer
from burrow.train import train
from burrow.train.distill import (
    DistillationLoss,
    Distiller,
    copy_non_expert_weights,
    gain_kept,
    student_config,
)
from burrow.train.trainer import Trainer
from conftest import CORPUS, burrow_command

TINY = ["--set", "model.vocab_size=512", "--set", "model.max_seq_len=64", "--set",
        "data.val_fraction=0.25", "--seq-len", "64", "--micro-batch-size", "4",
        "--batch-tokens", "256", "--warmup-steps", "2", "--eval-tokens", "1024",
        "--eval-every", "0", "--log-every", "2", "--max-steps", "6", "--device", "cpu"]


def dense(**fields) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                 max_seq_len=16), **fields})


def sparse() -> ModelConfig:
    return dense(moe=MoEConfig(num_experts=4, every=2))


@pytest.mark.parametrize("kernel", ["chunked", "plain"])
@pytest.mark.parametrize("label_weight, teacher_weight, z_loss",
                         [(0.75, 0.25, 0.0), (0.0, 1.0, 0.0), (0.75, 0.25, 1e-2)])
def test_mixed_loss_is_the_weighted_sum_of_the_two_cross_entropies(label_weight,
                                                                   teacher_weight, z_loss,
                                                                   kernel):
    torch.manual_seed(0)
    teacher = Transformer(sparse()).eval()
    student = Transformer(dataclasses.replace(dense(z_loss=z_loss), loss_kernel=kernel))
    inputs = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    targets[0, :5] = -100
    teacher_logits = teacher(inputs).logits
    out = student(inputs, targets,
                  objective=DistillationLoss(teacher_logits, label_weight, teacher_weight))
    soft = out.metrics["soft_cross_entropy"]
    out.loss.backward()
    fused = {name: p.grad.clone() for name, p in student.named_parameters()}

    student.zero_grad()
    logits = student(inputs).logits
    hard_by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    teacher_probs = teacher_logits.detach().softmax(dim=-1)
    per_token = -(teacher_probs * logits.log_softmax(dim=-1)).sum(dim=-1)
    soft_by_hand = per_token[targets != -100].mean()
    z_by_hand = z_loss * logits.logsumexp(dim=-1)[targets != -100].square().mean()
    by_hand = label_weight * (hard_by_hand + z_by_hand) + teacher_weight * soft_by_hand
    by_hand.backward()

    assert float(out.loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)
    assert float(soft) == pytest.approx(float(soft_by_hand.detach()), rel=1e-5)
    assert float(out.cross_entropy) == pytest.approx(float(hard_by_hand.detach()), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("student_cfg, fresh", [
    (dense(), ["blocks.1.mlp.gate_proj.weight", "blocks.1.mlp.up_proj.weight",
               "blocks.1.mlp.down_proj.weight"]),
    # Another MLP width: no MLP fits, the rest does.
    (dense(d_ff=48), [f"blocks.{b}.mlp.{m}.weight" for b in (0, 1)
                      for m in ("gate_proj", "up_proj", "down_proj")]),
])
def test_non_expert_weights_are_copied_exactly_and_nothing_else(student_cfg, fresh):
    torch.manual_seed(0)
    teacher, student = Transformer(sparse()), Transformer(student_cfg)
    with torch.no_grad():  # norms away from their init of ones, so copies are visible
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    before = {name: t.clone() for name, t in student.state_dict().items()}
    copied = copy_non_expert_weights(student, teacher)
    theirs, ours = teacher.state_dict(), student.state_dict()
    assert set(copied) == set(ours) - set(fresh)
    for name in copied:
        assert torch.equal(ours[name], theirs[name]), name
    for name in fresh:
        assert torch.equal(ours[name], before[name]), name


def test_gain_kept():
    assert gain_kept(teacher_loss=3.0, baseline_loss=4.0, student_loss=3.7) == pytest.approx(0.3)
    assert gain_kept(teacher_loss=3.0, baseline_loss=4.0, student_loss=4.0) == 0.0
    assert gain_kept(teacher_loss=3.0, baseline_loss=4.0, student_loss=3.0) == 1.0
    assert gain_kept(teacher_loss=3.0, baseline_loss=4.0, student_loss=4.5) == pytest.approx(-0.5)
    assert gain_kept(teacher_loss=4.0, baseline_loss=4.0, student_loss=3.9) is None


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(burrow_command(*args), capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A Switch teacher and a dense baseline trained for 6 steps on a small directory, by the
    command line's own function (in this process: no second start of Python and torch)."""
    root = tmp_path_factory.mktemp("distill")
    shutil.copytree(CORPUS, root / "corpus")
    paths = {"root": root, "data": root / "corpus", "teacher": root / "teacher",
             "baseline": root / "baseline"}
    assert main(["train", "--preset", "micro", "--set", "model.moe.num_experts=4", *TINY,
                 "--data", str(paths["data"]), "--out", str(paths["teacher"])]) == 0
    assert main(["train", "--preset", "micro", *TINY, "--data", str(paths["data"]),
                 "--out", str(paths["baseline"])]) == 0
    return paths


def test_distill_end_to_end(runs, capsys):
    out = runs["root"] / "student"
    result = run("distill", "--teacher", str(runs["teacher"]), "--student", "micro",
                 "--out", str(out), "--baseline", str(runs["baseline"]), "--max-steps", "6",
                 "--log-every", "2")
    assert result.returncode == 0, result.stderr
    assert "note: the student takes the teacher's vocab_size=512" in result.stderr
    # micro has 2 blocks; the teacher's block 1 is sparse, so its 3 MLP matrices start fresh.
    assert "student: 18 of 21 tensors" in result.stdout
    assert "step 6/6 | loss" in result.stdout and "gain kept" in result.stdout
    report = json.loads((out / "distill.json").read_text())
    kept = gain_kept(report["teacher"]["loss"], report["baseline"]["loss"],
                     report["student"]["loss"])
    assert report["gain_kept_percent"] == pytest.approx(100 * kept)
    assert report["teacher"]["active_params"] < report["teacher"]["params"]
    assert report["student"]["params"] == report["baseline"]["params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == [2, 4, 6]
    assert all(row["soft_cross_entropy"] > 0 and row["cross_entropy"] > 0 for row in train_rows)

    capsys.readouterr()
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "8", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # one JSON object: the trainer is quiet
    assert again["baseline"] is None and again["gain_kept_percent"] is None
    assert again["teacher"] == report["teacher"]
    assert json.loads((out / "distill.json").read_text()) == again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
             .splitlines() if json.loads(line)["split"] == "train"]
    assert steps == [2, 4, 6, 8]


def test_resume_gives_the_same_losses_as_not_stopping(runs, tmp_path, monkeypatch):
    cfg, _ = student_config(runs["teacher"], "micro")
    cfg.train = dataclasses.replace(cfg.train, max_steps=4, log_every=1, eval_tokens=256)

    def losses(run_dir: Path) -> list[float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(row["loss"], row["soft_cross_entropy"]) for row in rows
                if row["split"] == "train"]

    train(cfg, tmp_path / "straight", verbose=False, trainer_class=Distiller)
    original = Distiller.train_step

    def stop_after_two(self):
        result = original(self)
        if self.step == 2:
            self._on_signal(2, None)
        return result

    monkeypatch.setattr(Distiller, "train_step", stop_after_two)
    assert train(cfg, tmp_path / "stopped", verbose=False, trainer_class=Distiller)["interrupted"]
    monkeypatch.setattr(Distiller, "train_step", original)
    train(cfg, tmp_path / "stopped", resume=True, verbose=False, trainer_class=Distiller)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_teacher_weight_zero_is_the_initialisation_baseline(runs, tmp_path, monkeypatch):
    """Switch Table 6's "init. non-expert weights from teacher" row: the teacher's weights, then
    the labels alone, as plain training would take them; the teacher is let go, never run."""
    cfg, _ = student_config(runs["teacher"], "micro")
    cfg.train = dataclasses.replace(cfg.train, max_steps=4, log_every=1, eval_tokens=256)
    cfg.distill = dataclasses.replace(cfg.distill, label_weight=1.0, teacher_weight=0.0)

    def rows(run_dir: Path) -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [row for row in map(json.loads, lines) if row["split"] == "train"]

    class LabelsOnly(Distiller):  # the reference: the plain trainer's objective
        forward_loss = Trainer.forward_loss

    train(cfg, tmp_path / "reference", verbose=False, trainer_class=LabelsOnly)
    setup = Distiller.setup

    def setup_without_a_teacher(self):
        setup(self)
        assert self.teacher is None, "the teacher is kept, so it may run"

    monkeypatch.setattr(Distiller, "setup", setup_without_a_teacher)
    train(cfg, tmp_path / "init-only", verbose=False, trainer_class=Distiller)
    ours, reference = rows(tmp_path / "init-only"), rows(tmp_path / "reference")
    assert [row["loss"] for row in ours] == [row["loss"] for row in reference]
    assert len(ours) == 4 and not any("soft_cross_entropy" in row for row in ours)


@pytest.fixture(scope="module")
def other_vocabulary(runs) -> Path:
    """The baseline run with another tokenizer in it."""
    copy = runs["root"] / "other-vocabulary"
    shutil.copytree(runs["baseline"], copy)
    train_tokenizer(str(runs["data"]), vocab_size=400, out_dir=copy)
    return copy


@pytest.mark.parametrize("args, words", [
    (["--teacher", "{root}/nowhere", "--student", "micro"], ["nowhere", "not a run directory"]),
    (["--teacher", "{root}/untrained", "--student", "micro"], ["teacher", "no checkpoint"]),
    (["--teacher", "{teacher}", "--student", "switch-micro"], ["switch-micro", "sparse"]),
    (["--teacher", "{teacher}", "--student", "mikro"], ["mikro", "did you mean micro"]),
    (["--teacher", "{teacher}", "--student", "micro", "--set", "model.moe.num_experts=2"],
     ["sparse"]),
    (["--teacher", "{teacher}", "--student", "micro", "--baseline", "{teacher}"],
     ["not shaped like the student", "model.moe.num_experts=4 (student: 0)"]),
    (["--teacher", "{teacher}", "--student", "micro", "--baseline", "{root}/other-vocabulary"],
     ["another vocabulary"]),
    (["--teacher", "{teacher}", "--student", "micro", "--teacher-weight", "-1"],
     ["--teacher-weight", "expected a number >= 0"]),
    (["--student", "micro"], ["--teacher"]),
])
def test_bad_input_is_one_line_and_exit_2(runs, other_vocabulary, capsys, args, words):
    untrained = runs["root"] / "untrained"
    untrained.mkdir(exist_ok=True)
    shutil.copyfile(runs["teacher"] / "config.yaml", untrained / "config.yaml")
    out = runs["root"] / "refused"
    fill = {"{root}": str(runs["root"]), "{teacher}": str(runs["teacher"])}
    for key, value in fill.items():
        args = [arg.replace(key, value) for arg in args]
    assert main(["distill", *args, "--out", str(out), "--max-steps", "1"]) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.strip().splitlines() if "note:" not in line]
    assert len(lines) == 1 and lines[0].startswith("burrow: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (out / "checkpoints").exists()
