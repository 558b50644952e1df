"""Reading run directories back (burrow.run)."""

import pytest

from burrow.errors import UserError
from burrow.run import check_run_dir, load_run
from conftest import tiny_run_config


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        check_run_dir(tmp_path)


def test_run_without_checkpoint_names_its_directory(tmp_path):
    tiny_run_config().save(tmp_path / "config.yaml")
    with pytest.raises(UserError) as raised:
        load_run(tmp_path)
    message = str(raised.value)
    assert f"burrow train --out {tmp_path} --resume" in message
    assert "{run_dir}" not in message
