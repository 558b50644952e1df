"""Resuming is a transaction: a resume that cannot go on changes nothing in the run directory,
says what does not fit, and calls a checkpoint corrupt only when its checksums say so."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from burrow import UserError, load_run
from burrow.train import train
from burrow.train.checkpoint import latest_checkpoint
from conftest import CORPUS, burrow_command, tiny_run_config


def hashes(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory and its sha256."""
    return {str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A 4-step run with checkpoints at steps 2 and 4, and the config it was trained with."""
    cfg = tiny_run_config(max_steps=4, save_every=2)
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    train(cfg, run_dir, verbose=False)
    return cfg, run_dir


def other_data(tmp_path: Path) -> str:
    other = tmp_path / "other"
    shutil.copytree(CORPUS, other)
    (other / "extra.txt").write_text("some different text\n" * 200)
    return str(other)


def changed(cfg, section: str, **fields):
    cfg = copy.deepcopy(cfg)
    for name, value in fields.items():
        target = getattr(cfg, section)
        *parents, last = name.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, last, value)
    cfg.validate()
    return cfg


FAILING = [  # (what changes, what the message must say)
    (("model", {"n_layers": 3}), "model.n_layers: checkpoint 2, config 3"),
    (("model", {"d_model": 64}), "model.d_model: checkpoint 32, config 64"),
    (("model", {"moe.num_experts": 4}), "model.moe.num_experts: checkpoint 0, config 4"),
    (("model", {"vocab_size": 1024}), "model.vocab_size: checkpoint 512, config 1024"),
    (("model", {"ffn": "gelu"}), "model.ffn: checkpoint swiglu, config gelu"),
    (("train", {"seq_len": 32}), "sequence length 64"),
    (("data", {"source": "OTHER"}), "other data"),
]


def test_failing_resumes_leave_every_file_byte_identical(trained, tmp_path):
    cfg, run_dir = trained
    before = hashes(run_dir)
    source = other_data(tmp_path)
    for (section, fields), expected in FAILING:
        fields = {name: source if value == "OTHER" else value for name, value in fields.items()}
        with pytest.raises(UserError) as caught:
            train(changed(cfg, section, **fields), run_dir, resume=True, verbose=False)
        message = str(caught.value)
        assert expected in message, message
        assert "corrupt" not in message and "\n" not in message, message
        if section == "model":
            assert "drop the override" in message and "--out" in message, message
        assert hashes(run_dir) == before, fields


def test_a_resume_already_at_its_end_changes_nothing(trained):
    cfg, run_dir = trained
    before = hashes(run_dir)
    summary = train(changed(cfg, "train", max_steps=2), run_dir, resume=True, verbose=False)
    assert summary["step"] == 4
    assert hashes(run_dir) == before


def test_the_command_line_refuses_another_model_and_changes_nothing(trained):
    _, run_dir = trained
    before = hashes(run_dir)
    result = subprocess.run(burrow_command("train", "--out", str(run_dir), "--resume", "--set",
                                           "model.n_layers=5"),
                            capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.n_layers: checkpoint 2, config 5" in lines[0], lines
    assert "corrupt" not in lines[0]
    assert hashes(run_dir) == before


def test_training_settings_of_the_model_may_change_with_a_note(trained, tmp_path, capsys):
    cfg, run_dir = trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    summary = train(changed(changed(cfg, "model", dropout=0.1), "train", max_steps=5), copy_dir,
                    resume=True)
    assert summary["step"] == 5
    out = capsys.readouterr().out
    assert "note: model.dropout: checkpoint 0.0, config 0.1" in out


def test_checkpoints_carry_checksums_and_the_config(trained):
    cfg, run_dir = trained
    record = json.loads((latest_checkpoint(run_dir) / "checkpoint.json").read_text())
    assert record["step"] == 4
    assert set(record["files"]) == {"model.safetensors", "optimizer.pt", "trainer.pt"}
    for name, entry in record["files"].items():
        data = (latest_checkpoint(run_dir) / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert record["config"]["model"]["n_layers"] == cfg.model.n_layers


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensors: the header still parses
    path.write_bytes(bytes(data))


def test_corrupt_is_said_only_of_a_file_that_fails_its_checksum(trained, tmp_path):
    cfg, run_dir = trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    flip_a_byte(latest_checkpoint(copy_dir) / "model.safetensors")
    before = hashes(copy_dir)
    more = changed(cfg, "train", max_steps=6)
    with pytest.raises(UserError, match=r"step_4 is corrupt: model.safetensors does not match"):
        train(more, copy_dir, resume=True, verbose=False)
    with pytest.raises(UserError, match="corrupt"):
        load_run(copy_dir)
    assert hashes(copy_dir) == before
    shutil.rmtree(latest_checkpoint(copy_dir))  # as the message says: back to step_2
    assert train(more, copy_dir, resume=True, verbose=False)["step"] == 6


def test_old_checkpoints_without_checksums_still_load(trained, tmp_path):
    cfg, run_dir = trained
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    for record in copy_dir.glob("checkpoints/*/checkpoint.json"):
        record.unlink()
    load_run(copy_dir)
    assert train(changed(cfg, "train", max_steps=5), copy_dir, resume=True,
                 verbose=False)["step"] == 5
    # Without the checkpoint's own record, config.yaml is compared with the weights' shapes.
    for record in copy_dir.glob("checkpoints/*/checkpoint.json"):
        record.unlink()
    with pytest.raises(UserError, match="does not fit") as caught:
        train(changed(cfg, "model", n_layers=3), copy_dir, resume=True, verbose=False)
    assert "corrupt" not in str(caught.value)


def test_files_get_the_umask_mode(trained, tmp_path):
    from burrow.interop import export_hf

    _, run_dir = trained
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask  # 0644 under the usual umask 022
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert "model.safetensors" in {path.name for path in files}
    assert {path.name: path.stat().st_mode & 0o777 for path in files} == {
        path.name: expected for path in files}
    out = export_hf(run_dir, tmp_path / "hf")
    assert (out / "model.safetensors").stat().st_mode & 0o777 == expected


FAILING_COMMANDS = [  # every verb that reads or writes a run, given something it must refuse
    ["train", "--out", "{run}"],                                    # holds checkpoints
    ["train", "--out", "{run}", "--resume", "--max-steps", "0"],
    ["train", "--out", "{run}", "--resume", "--lr", "-1"],
    ["train", "--out", "{run}", "--resume", "--set", "model.n_layers=5"],
    ["train", "--out", "{run}", "--resume", "--set", "model.moe.num_experts=4"],
    ["train", "--out", "{run}", "--resume", "--data", "{missing}"],
    ["train", "--out", "{run}", "--resume", "--config", "{run}"],    # a directory
    ["train", "--out", "{run}", "--resume", "--set", "train.nonsense=1"],
    ["eval", "{run}", "--batch-size", "0"],
    ["eval", "{run}", "--data", "/dev/null"],
    ["generate", "{run}", "--max-new-tokens", "-5"],
    ["generate", "{run}", "--top-p", "2"],
    ["distill", "--teacher", "{run}", "--student", "switch-micro", "--out", "{run}"],
    ["distill", "--teacher", "{run}", "--student", "micro", "--out", "{run}"],
    ["export-hf", "{run}", "{run}/config.yaml"],                    # onto a file of the run
    ["import-hf", "{missing}", "{run}"],
]


@pytest.mark.parametrize("argv", FAILING_COMMANDS, ids=lambda argv: " ".join(argv[:4]))
def test_no_failing_command_changes_a_file_of_the_run(trained, tmp_path, capsys, argv):
    from burrow.cli import main

    _, run_dir = trained
    before = hashes(run_dir)
    fill = {"{run}": str(run_dir), "{missing}": str(tmp_path / "missing")}
    for key, value in fill.items():
        argv = [arg.replace(key, value) for arg in argv]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        status = stop.code
    assert status == 2, argv
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if "note:" not in line]
    assert len(lines) == 1 and lines[0].startswith("burrow: error: "), lines
    assert hashes(run_dir) == before, argv
    assert not (run_dir / "train.lock").exists()
