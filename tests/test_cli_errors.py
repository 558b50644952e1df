"""Every way a user can get the command line wrong ends in one line on stderr, exit status 2, no
traceback: numeric flags (walked from the parser itself, so new flags are covered), files and
directories that cannot be read or written, configs, and messages that say what is true."""

import argparse
import errno
import json
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from burrow import RunConfig
from burrow.cli import build_parser, main
from burrow.errors import UserError
from burrow.flags import ConfigField, Number
from burrow.paths import check_writable_dir, os_error_message
from conftest import CORPUS, tiny_run_config

EPOCH_CSV = CORPUS.parent / "chinchilla" / "svg_extracted_data.csv"


def exit_status(argv: list[str]) -> int:
    """main's status, also for usage errors, which argparse raises as SystemExit."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: "), lines
    return lines[0]


def verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words that call a verb, its parser) for every verb and sub-verb (`data prepare`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from verbs(sub, (*path, name))
            return
    yield path, parser


def numeric_flags():
    """(verb words, positional placeholders, flag, its type) of every numeric flag."""
    for path, parser in verbs(build_parser()):
        positionals = ["x" for action in parser._actions if not action.option_strings]
        for action in parser._actions:
            kind = getattr(action.type, "kind", None)
            if action.option_strings and kind in (int, float):
                yield path, positionals, action.option_strings[0], action.type


def test_every_numeric_flag_declares_its_range():
    """A flag typed plain int or float would take -5 or 0 and fail later, with a traceback."""
    plain = [f"{' '.join(path)} {action.option_strings[0]}"
             for path, parser in verbs(build_parser()) for action in parser._actions
             if action.type in (int, float)]
    assert not plain, plain
    flags = {(" ".join(path), flag): kind for path, _, flag, kind in numeric_flags()}
    assert len(flags) > 60 and all(isinstance(kind, (Number, ConfigField))
                                   for kind in flags.values())
    # the ranges are the declared ones: 0 is a greedy temperature, a seed, a step count of none
    assert flags["generate", "--temperature"]("0") == 0
    assert flags["generate", "--seed"]("0") == 0 and flags["train", "--seed"]("0") == 0
    assert flags["train", "--eval-every"]("0") == 0
    assert flags["generate", "--top-p"].high == 1 and flags["eval", "--batch-size"].low == 1


def accepts(kind, text: str) -> bool:
    """Whether the flag's own type (its declared range) takes `text`."""
    try:
        kind(text)
    except argparse.ArgumentTypeError:
        return False
    return True


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_every_numeric_flag_refuses_what_its_range_excludes_in_one_line(value, capsys):
    checked = 0
    for path, positionals, flag, kind in numeric_flags():
        if value != "abc" and accepts(kind, value):
            continue  # in the flag's declared range (e.g. --seed 0): nothing to refuse
        argv = [*path, *positionals, f"{flag}={value}"]
        assert exit_status(argv) == 2, argv
        line = one_error_line(capsys)
        assert flag in line and f"(see burrow {' '.join(path)} --help)" in line, line
        checked += 1
    assert checked > (60 if value == "abc" else 20)


def test_usage_errors_point_to_the_verbs_own_help(capsys):
    assert exit_status(["train", "--max-stepz", "3"]) == 2
    assert one_error_line(capsys).endswith("--max-stepz 3 (see burrow train --help)")
    assert exit_status(["data"]) == 2
    assert one_error_line(capsys).endswith("required: {prepare} (see burrow data --help)")
    assert exit_status(["train", "--lr", "0"]) == 2
    assert "train.lr must be positive" in one_error_line(capsys)


def test_text_field_is_a_flag_wherever_data_is():
    """The .jsonl error tells the user to pass --text-field: every verb with --data takes it."""
    for path, parser in verbs(build_parser()):
        flags = {flag for action in parser._actions for flag in action.option_strings}
        if "--data" in flags:
            assert "--text-field" in flags, path
    from burrow.commands import run_config_from_args

    args = build_parser().parse_args(["train", "--data", str(CORPUS), "--text-field", "body"])
    assert run_config_from_args(args)[0].data.text_field == "body"


def read_only(monkeypatch):
    """Make every write probe fail as on a read-only mount (as root, chmod would not)."""
    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_places_are_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                      private_cache):
    before = sorted(private_cache.iterdir())
    read_only(monkeypatch)
    assert exit_status(["train", "--data", str(CORPUS), "--out", str(tmp_path / "r")]) == 2
    line = one_error_line(capsys)
    assert f"run directory {tmp_path / 'r'} cannot be written" in line
    assert "read-only" in line and "choose another --out" in line
    run = tmp_path / "run"
    run.mkdir()
    tiny_run_config().save(run / "config.yaml")
    assert exit_status(["train", "--out", str(run), "--resume"]) == 2
    assert f"run directory {run} cannot be written (the file system is read-only)" in (
        one_error_line(capsys))
    assert exit_status(["fit", str(EPOCH_CSV), "--out", str(tmp_path / "fit")]) == 2
    assert "fit directory" in one_error_line(capsys)
    assert sorted(private_cache.iterdir()) == before  # nothing was prepared
    with pytest.raises(UserError, match="cannot be written"):
        check_writable_dir(tmp_path, "place", "choose another")


def test_a_read_only_cache_is_refused_before_tokenizing(tmp_path, monkeypatch):
    from burrow.data import prepare

    monkeypatch.setenv("BURROW_CACHE", str(tmp_path / "cache"))
    read_only(monkeypatch)
    with pytest.raises(UserError, match=r"data cache \(BURROW_CACHE\) .* cannot be written "
                                        r"\(the file system is read-only\); point BURROW_CACHE"):
        prepare(str(CORPUS), vocab_size=400, progress=False)


def test_a_file_system_error_nobody_foresaw_is_one_line(monkeypatch, capsys):
    from burrow import commands

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")

    monkeypatch.setattr(commands, "presets_command", full)
    assert exit_status(["presets"]) == 2
    assert one_error_line(capsys) == ("burrow: error: /data/out.bin: no space left on the "
                                      "device; free some space or choose another place")
    assert os_error_message(PermissionError(errno.EACCES, "Permission denied", "/x")) == (
        "/x: permission denied; choose a place you may write, or change its permissions")


def test_data_prepare_workers_leave_ctrl_c_to_the_parent(tmp_path):
    from burrow.data import Tokenizer
    from burrow.data.workers import worker_pool

    Tokenizer.train([path.read_text() for path in sorted(CORPUS.glob("*.py"))], 600, tmp_path)
    with worker_pool(2, tmp_path / "tokenizer.model") as pool:
        handlers = pool.map(signal.getsignal, [signal.SIGINT] * 4)
    assert set(handlers) == {signal.SIG_IGN}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the parent's own


def test_a_runs_config_is_whole_or_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  d_model: 64\n  n_heads: 2\n")
    with pytest.raises(UserError, match=r"lacks the section\(s\) train, data"):
        RunConfig.load(run / "config.yaml")
    assert RunConfig.load(run / "config.yaml", partial=True).model.d_model == 64  # --config
    with pytest.raises(UserError, match=r"is a directory; give the YAML file itself"):
        RunConfig.load(run)


def test_yaml_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("model:\n  d_model: [1, 2\ntrain: {}\n")
    assert exit_status(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "not valid YAML: expected ',' or ']'" in one_error_line(capsys)
    assert exit_status(["train", "--set", "model.d_model=[", "--out", str(tmp_path / "r")]) == 2
    assert "--set 'model.d_model=[': the value is not valid YAML" in one_error_line(capsys)


def test_messages_say_what_is_true(tmp_path, capsys):
    from burrow.data import iter_documents
    from burrow.scaling.laws import get_law

    with pytest.raises(UserError, match="/dev/null' exists but is a character device"):
        list(iter_documents("/dev/null"))
    with pytest.raises(UserError, match=r"law file missing\.json does not exist"):
        get_law("missing.json")
    with pytest.raises(UserError, match="unknown law 'nope'"):
        get_law("nope")
    (tmp_path / "afile").write_text("x")
    assert exit_status(["train", "--out", str(tmp_path / "afile" / "run")]) == 2
    assert f"cannot be made: {tmp_path / 'afile'} is not a directory" in one_error_line(capsys)


def test_fit_writes_beside_the_current_directory_not_into_the_tables_folder(
        tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(EPOCH_CSV, data / "runs.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(data / "runs.csv"), "--bootstrap", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["law"] == str(Path("fits") / "runs" / "law.json")
    assert sorted(path.name for path in data.iterdir()) == ["runs.csv"]
    assert sorted(path.name for path in (tmp_path / "fits" / "runs").iterdir()) == [
        "fit.json", "frontier.png", "isoflop.png", "law.json"]
