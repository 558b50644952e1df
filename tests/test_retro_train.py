"""A RETRO model trains, evaluates and resumes with its neighbours: windows start at whole
chunks, each chunk's stored neighbours reach the model, and a resume is exact."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from burrow.config import RetroConfig
from burrow.data import Tokenizer, prepare_data
from burrow.errors import UserError
from burrow.retrieval import build_database, retrieved_tokens
from burrow.retrieval.encoder import ENCODERS
from burrow.retrieval.neighbours import open_neighbours
from burrow.train import train
from burrow.train.retrieval import Retrieval
from burrow.train.trainer import Trainer
from conftest import CORPUS, tiny_run_config
from test_retrieval import ByteCountEncoder


@pytest.fixture(autouse=True)
def byte_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)


def retro_config(db: Path | None, **train_fields):
    fields = {"seq_len": 128, "batch_tokens": 512, "micro_batch_size": 4, **train_fields}
    cfg = tiny_run_config(**fields)
    cfg.model = dataclasses.replace(cfg.model, max_seq_len=128,
                                    retro=RetroConfig(layers=[2], encoder_layers=1))
    cfg.data = dataclasses.replace(cfg.data, retro_db=None if db is None else str(db))
    return cfg


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> Path:
    """A database over the test corpus with the tiny run's own tokenizer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)
        cfg = tiny_run_config()
        prepared = prepare_data(cfg, progress=False)
        return build_database(str(CORPUS), Tokenizer.load(prepared),
                              tmp_path_factory.mktemp("db") / "db", encoder=ByteCountEncoder.name,
                              progress=False)


def test_a_batch_carries_the_stored_neighbours_of_its_chunks(database, tmp_path):
    cfg = retro_config(database)
    prepared = prepare_data(cfg, progress=False)
    retrieval = Retrieval(cfg, prepared, progress=False)
    table = open_neighbours(retrieval.db, prepared, "train")
    starts = [0, 64, 640]
    got = retrieval.batch("train", starts, 128)["neighbours"]
    assert got.shape == (3, 2, 2, 128) and got.dtype == torch.int64
    for row, start in enumerate(starts):
        for chunk in range(2):
            ids = table[start // 64 + chunk, :2]
            assert got[row, chunk].numpy().tolist() == retrieved_tokens(
                retrieval.db, ids).tolist()
    with pytest.raises(ValueError, match="not whole chunks"):
        retrieval.batch("train", [10], 128)


def test_a_retro_model_trains_with_neighbours_and_logs_cca(database, tmp_path):
    run = tmp_path / "run"
    summary = train(retro_config(database, max_steps=8, eval_every=4), run, verbose=False)
    assert summary["step"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if row.get("split") == "train"]
    assert trained[-1]["loss"] < trained[0]["loss"]
    rms = trained[-1]["aux"]["cca_output_rms"]["values"]
    assert rms[0] > 0  # the output projection starts at zero and has learned
    assert [row for row in rows if row.get("split") == "val"]


def test_resume_with_retrieval_is_exact(database, tmp_path):
    straight = train(retro_config(database, max_steps=6, save_every=3), tmp_path / "a",
                     verbose=False)
    train(retro_config(database, max_steps=3, save_every=3), tmp_path / "b", verbose=False)
    resumed = train(retro_config(database, max_steps=6, save_every=3), tmp_path / "b",
                    resume=True, verbose=False)
    assert resumed["train_losses"] == straight["train_losses"]  # bit for bit


def test_windows_start_at_whole_chunks(database, tmp_path):
    trainer = Trainer(retro_config(database, max_steps=1), tmp_path / "run", verbose=False)
    trainer.setup()
    for _ in range(5):
        trainer.loader.next_batch()
        assert all(start % 64 == 0 for start in trainer.loader.last_starts)
    trainer.release()


def test_a_database_is_required_and_must_fit(database, tmp_path):
    with pytest.raises(UserError, match="--retro-db DB"):
        train(retro_config(None), tmp_path / "no-db", verbose=False)
    assert not any((tmp_path / "no-db").iterdir())
    dense = tiny_run_config()
    dense.data = dataclasses.replace(dense.data, retro_db=str(database))
    with pytest.raises(UserError, match="no retrieval blocks"):
        dense.validate()
    with pytest.raises(UserError, match=r"multiple of model\.retro\.chunk_size"):
        retro_config(database, seq_len=100).validate()
    other = retro_config(database)
    other.model = dataclasses.replace(
        other.model, retro=dataclasses.replace(other.model.retro, continuation=32))
    with pytest.raises(UserError, match=r"model\.retro\.continuation=64"):
        train(other, tmp_path / "run", verbose=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A dense tiny run with 128-token windows, the base to retro-fit."""
    cfg = tiny_run_config(seq_len=128, batch_tokens=512, max_steps=6, save_every=6)
    cfg.model = dataclasses.replace(cfg.model, max_seq_len=128)
    run = tmp_path_factory.mktemp("dense") / "run"
    train(cfg, run, verbose=False)
    return run


def test_retro_fitting_trains_retrieval_alone_and_keeps_the_baseline_without_it(
        database, dense_run, tmp_path):
    from burrow.model.retro import retro_parameters
    from burrow.run import load_run
    from burrow.train.retrofit import retrofit_config

    cfg = retrofit_config(dense_run, RetroConfig(layers=[2], encoder_layers=1))
    cfg.data = dataclasses.replace(cfg.data, retro_db=str(database))
    cfg.train = dataclasses.replace(cfg.train, max_steps=4, save_every=4)
    run = tmp_path / "fit"
    train(cfg, run, verbose=False)
    base, _, _ = load_run(dense_run)
    fitted, _, saved = load_run(run)
    assert saved.retro_fit == str(dense_run.resolve())
    added = retro_parameters(fitted)
    base_state = base.state_dict()
    for name, tensor in fitted.state_dict().items():
        if name in added:
            continue
        assert torch.equal(tensor, base_state[name]), name  # frozen, bit for bit
    cca = [tensor for name, tensor in added.items() if "o_proj" in name]
    assert cca and any(tensor.abs().sum() > 0 for tensor in cca)  # retrieval has trained
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fitted(ids).logits, base(ids).logits)  # retrieval off: the baseline


def test_retro_fit_from_the_command_line(database, dense_run, tmp_path, capsys):
    from burrow.cli import main

    out = tmp_path / "fit"
    assert main(["train", "--retro-fit", str(dense_run), "--retro-db", str(database), "--out",
                 str(out), "--max-steps", "2", "--set", "model.retro.layers=[2]"]) == 0
    assert "retro-fit: the decoder of" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3"]) == 0
    for argv, words in [
        (["--retro-fit", str(dense_run), "--out", str(tmp_path / "a")], "--retro-db DB"),
        (["--retro-fit", str(dense_run), "--preset", "nano", "--retro-db", str(database)],
         "drop --preset"),
        (["--retro-fit", str(tmp_path / "nowhere"), "--retro-db", str(database)],
         "not a run directory"),
    ]:
        assert main(["train", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines
