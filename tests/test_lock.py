"""One writer per run directory: a lock file names the holder; a second writer is refused, a
dead one's lock is taken over; files are staged under names of their own."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from burrow import UserError
from burrow.files import write_text
from burrow.train import train
from burrow.train.lock import LOCK_FILE, RunLock
from conftest import burrow_command, tiny_run_config


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).exists()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = RunLock(run_dir)
    note = lock.acquire()
    assert note is not None and f"process {pid}" in note and "no longer running" in note
    assert "\n" not in note
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(UserError, match=rf"elsewhere.example.*delete {run_dir / LOCK_FILE}"):
        RunLock(run_dir).acquire()
    assert (run_dir / LOCK_FILE).exists()


def test_a_trainer_is_refused_on_a_locked_run_and_the_lock_is_released_after_errors(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(max_steps=2)
    with RunLock(run_dir):
        with pytest.raises(UserError, match="another burrow train"):
            train(cfg, run_dir, verbose=False)
        assert [path.name for path in run_dir.iterdir()] == [LOCK_FILE]
    train(cfg, run_dir, verbose=False)
    assert not (run_dir / LOCK_FILE).exists()  # released at the end
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg, run_dir, verbose=False)
    cfg.model.n_layers = 3
    with pytest.raises(UserError, match=r"model\.n_layers"):
        train(cfg, run_dir, resume=True, verbose=False)
    assert not (run_dir / LOCK_FILE).exists()  # and after an error


def test_a_second_command_line_writer_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        result = subprocess.run(burrow_command("train", "--out", str(run_dir), "--resume"),
                                capture_output=True, text=True, timeout=300,
                                env=os.environ.copy())
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "another burrow train" in lines[0], lines
        assert f"pid {os.getpid()}" in lines[0]


def test_the_trainer_takes_over_a_stale_lock_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert train(tiny_run_config(max_steps=1), run_dir)["step"] == 1
    notes = [line for line in capsys.readouterr().out.splitlines() if "no longer running" in line]
    assert len(notes) == 1 and f"process {pid}" in notes[0]
    assert not (run_dir / LOCK_FILE).exists()


def test_staging_names_are_unique_so_writers_do_not_collide(tmp_path, monkeypatch):
    staged = []
    replace = os.replace

    def record(source, target):
        staged.append(Path(source))
        replace(source, target)

    monkeypatch.setattr(os, "replace", record)
    threads = [threading.Thread(target=write_text, args=(tmp_path / "loss.txt", str(i) * 1000))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(staged)) == 8
    assert (tmp_path / "loss.txt").read_text() in {str(i) * 1000 for i in range(8)}
    assert [path.name for path in tmp_path.iterdir()] == ["loss.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path):
    from burrow.files import replacing

    (tmp_path / "config.yaml").write_text("old\n")
    with pytest.raises(RuntimeError), replacing(tmp_path / "config.yaml") as staging:
        staging.write_text("half")
        raise RuntimeError("writer died")
    assert (tmp_path / "config.yaml").read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]
