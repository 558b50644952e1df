"""The real command line, end to end: train -> eval -> generate, and every bad input."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from burrow.train.metrics import MetricsLog
from conftest import CORPUS, burrow_command

TINY = ["--preset", "micro", "--data", str(CORPUS), "--set", "model.vocab_size=512",
        "--set", "model.max_seq_len=64", "--set", "data.val_fraction=0.25", "--seq-len", "64",
        "--micro-batch-size", "4", "--batch-tokens", "256", "--warmup-steps", "4",
        "--eval-tokens", "2048", "--device", "cpu"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(burrow_command(*args), capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train", *TINY, "--out", str(out), "--max-steps", "12", "--log-every", "4")
    assert result.returncode == 0, result.stderr
    assert "step 12/12 | loss" in result.stdout and "tok/s" in result.stdout
    assert "ETA" in result.stdout and "MFU" in result.stdout
    return out


def test_eval_json_has_the_yardstick(trained_run):
    result = run("eval", str(trained_run), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("loss", "perplexity", "bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte"):
        assert report[key] > 0
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    assert report["xz_bits_per_byte"] < 8 and report["gzip_bits_per_byte"] < 8
    text = run("eval", str(trained_run))
    assert "gzip -9" in text.stdout and "bits/byte" in text.stdout


def test_eval_on_other_data(trained_run, tmp_path):
    (tmp_path / "notes.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    report = json.loads(run("eval", str(trained_run), "--data", str(tmp_path / "notes.txt"),
                            "--json").stdout)
    assert report["bytes"] == len(("def add(a, b):\n    return a + b\n" * 50).encode())


def test_generate(trained_run):
    result = run("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "20",
                 "--seed", "3")
    assert result.returncode == 0 and result.stdout.startswith("import ")
    again = run("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "20",
                "--seed", "3")
    assert again.stdout == result.stdout
    greedy = run("generate", str(trained_run), "--prompt", "x", "--temperature", "0")
    assert greedy.returncode == 0
    assert "tokens/s" in greedy.stderr


def test_generate_several_samples_in_one_batch(trained_run):
    from burrow.run_commands import SAMPLE_SEPARATOR

    result = run("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "20",
                 "--num-samples", "3", "--seed", "1")
    samples = result.stdout.rstrip("\n").split(SAMPLE_SEPARATOR)
    assert result.returncode == 0 and len(samples) == 3
    assert all(sample.startswith("import ") for sample in samples)
    assert len(set(samples)) > 1  # sampled independently, not one sample repeated


def test_presets_table_and_json():
    table = run("presets")
    assert "chinchilla-70b" in table.stdout and "gopher-280b" in table.stdout
    rows = json.loads(run("presets", "--json").stdout)["presets"]
    chinchilla = next(row for row in rows if row["name"] == "chinchilla-70b")
    assert round(chinchilla["params"] / 1e9) == 70


def test_interrupt_saves_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(burrow_command("train", *TINY, "--out", str(out),
                                              "--max-steps", "100000", "--log-every", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and len(metrics.rows()) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stdout
    step = int(next(path for path in (out / "checkpoints").iterdir()).name.split("_")[1])
    assert step >= 3
    result = run("train", "--out", str(out), "--resume", "--max-steps", str(step + 2))
    assert result.returncode == 0, result.stderr
    assert f"resumed from {out}/checkpoints/step_{step}" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "/no/such/path", "--out", "{tmp}/r"], ["/no/such/path"]),
    (["train", "--data", "{tmp}/empty.txt", "--out", "{tmp}/r"], ["empty"]),
    (["train", "--data", "{tmp}/binary", "--out", "{tmp}/r"], ["no readable text"]),
    (["train", "--preset", "gopher-1b", "--out", "{tmp}/r"], ["gopher-1b", "did you mean"]),
    (["train", "--set", "model.n_heads=3", "--out", "{tmp}/r"], ["model.n_heads"]),
    (["train", "--set", "model.d_modle=64", "--out", "{tmp}/r"], ["model.d_model"]),
    (["train", "--lr", "-1", "--out", "{tmp}/r"], ["train.lr"]),
    (["train", "--out", "{tmp}/r", "--resume"], ["no checkpoint"]),
    (["train", "--config", "{tmp}/missing.yaml"], ["missing.yaml"]),
    (["eval", "{tmp}"], ["not a run directory"]),
    (["generate", "{tmp}/nowhere", "--prompt", "x"], ["not a run directory"]),
    (["generate", "{tmp}/nowhere", "--num-samples", "0"], ["--num-samples"]),
    (["train", "--max-stepz", "3"], ["--max-stepz", "(see burrow train --help)"]),
    (["generate", "{tmp}/r", "--max-new-tokens", "-5"], ["--max-new-tokens", "positive"]),
    (["eval", "{tmp}/r", "--batch-size", "0"], ["--batch-size", "positive"]),
    (["train", "--config", "{tmp}"], ["is a directory"]),
    (["train", "--config", "{tmp}/bad.yaml"], ["not valid YAML", "line 3, column 6"]),
    (["train", "--out", "{tmp}/empty.txt/r"], ["{tmp}/empty.txt is not a directory"]),
    (["train", "--data", "/dev/null", "--out", "{tmp}/r"], ["exists but is a character device"]),
    (["train", "--out", "{tmp}/truncated", "--resume"], ["lacks the section(s) train, data"]),
    (["eval", "{tmp}/truncated"], ["lacks the section(s) train, data"]),
    (["train", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/r"], ["no string field 'text'",
                                                                 "--text-field"]),
    (["plan", "--law", "{tmp}/missing.json", "--flops", "1e21"], ["missing.json does not exist"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "blob.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [1, 2\ntrain: {}\n")
    (tmp_path / "d.jsonl").write_text('{"body": "some text"}\n' * 50)
    (tmp_path / "truncated").mkdir()  # a run whose config.yaml lost all but its first section
    (tmp_path / "truncated" / "config.yaml").write_text("model:\n  d_model: 64\n")
    result = run(*[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert_user_error(result, *[word.replace("{tmp}", str(tmp_path)) for word in words])
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_an_unusable_cache_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    env = {**os.environ, "BURROW_CACHE": str(tmp_path / "file")}
    result = subprocess.run(burrow_command("train", "--out", str(tmp_path / "r")),
                            capture_output=True, text=True, timeout=120, env=env)
    assert_user_error(result, f"data cache (BURROW_CACHE) {tmp_path / 'file'} is not a "
                      "directory", "point BURROW_CACHE at a writable directory")
    assert not (tmp_path / "r").exists()


def test_ctrl_c_in_data_prepare_is_one_line_from_the_parent(tmp_path):
    """Ctrl-C reaches the whole process group; the workers leave it to the parent."""
    env = {**os.environ, "BURROW_CACHE": str(tmp_path)}
    process = subprocess.Popen(burrow_command("data", "prepare", "--data", "stdlib",
                                              "--vocab-size", "512", "--json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("prepared-*.tmp-*/train-*.bin*")):
        time.sleep(0.05)  # until tokenizing has begun in the workers
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stdout == ""
    assert stderr.strip().splitlines() == ["burrow: interrupted"], stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-prepared is left


def test_prompt_longer_than_context(trained_run):
    result = run("generate", str(trained_run), "--prompt", "word " * 200)
    assert_user_error(result, "context")


def test_corrupt_checkpoint_is_a_clear_error(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    weights = next((copy / "checkpoints").iterdir()) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(run("eval", str(copy)), "corrupt or truncated")
    assert_user_error(run("generate", str(copy), "--prompt", "x"), "corrupt or truncated")
