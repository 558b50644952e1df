"""`burrow eval RUN --retro-db DB`: a RETRO run evaluated with retrieval and without on the same
tokens, bits per byte filtered by overlap (RETRO §2.6, Figure 6), a dense baseline on the same
chunks, and one-line refusals that leave the run and the database as they were."""

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from burrow.cli import main
from burrow.data import TokenDataset, train_tokenizer
from burrow.errors import UserError
from burrow.eval import evaluate, split_text
from burrow.eval.evaluate import token_nats
from burrow.eval.retro import chunk_totals, control_rows
from burrow.retrieval.encoder import ENCODERS
from burrow.run import load_run, prepared_data_of
from burrow.train import train
from burrow.train.retrieval import Retrieval
from conftest import CORPUS, tiny_run_config
from test_retrieval import ByteCountEncoder
from test_retro_train import database, retro_config  # noqa: F401  (the module's database)

STEPS = 12


@pytest.fixture(autouse=True)
def byte_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)


def dense_config():
    cfg = tiny_run_config(seq_len=128, batch_tokens=512, micro_batch_size=4, max_steps=STEPS)
    cfg.model = dataclasses.replace(cfg.model, max_seq_len=128)
    return cfg


@pytest.fixture(scope="module")
def runs(database, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A tiny RETRO run trained with its neighbours, and its dense twin (same tokenizer)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)
        train(retro_config(database, max_steps=STEPS), root / "retro", verbose=False)
        train(dense_config(), root / "dense", verbose=False)
    return {"retro": root / "retro", "dense": root / "dense"}


def cli(*args) -> tuple[int, str]:
    """Exit status and stdout of `burrow ARGS`, in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def report(runs, database, tmp_path_factory) -> dict:  # noqa: F811
    """The JSON of `eval RETRO --retro-db DB --baseline DENSE --plot PATH --json`."""
    plot = tmp_path_factory.mktemp("plot") / "bpb.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)
        code, out = cli("eval", runs["retro"], "--retro-db", database, "--baseline",
                        runs["dense"], "--plot", plot, "--json")
    assert code == 0
    return json.loads(out)


def held_out(run: Path) -> TokenDataset:
    return TokenDataset(prepared_data_of(run), "val")


def test_the_report_has_both_bits_per_byte_and_the_filtered_curves(report):
    for key in ("loss", "perplexity", "bits_per_byte", "bits_per_byte_no_retrieval",
                "gzip_bits_per_byte", "xz_bits_per_byte", "filtered", "filtered_no_retrieval",
                "bits_per_byte_random_neighbours", "filtered_random_neighbours",
                "retrieval", "baseline", "plot"):
        assert key in report
    assert list(report["filtered"]) == ["0", "0.125", "0.25", "0.5", "1"]
    assert set(report["filtered"]["1"]) == {"bits_per_byte", "chunks"}
    assert report["retrieval"]["k"] == 2 and report["retrieval"]["stored_neighbours"] == 4
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alpha_one_is_the_plain_bits_per_byte(report):
    """Every chunk kept: the chunks' nats and bytes add up to the whole split's, exactly."""
    for filtered, plain in ((report["filtered"], report["bits_per_byte"]),
                            (report["filtered_no_retrieval"], report["bits_per_byte_no_retrieval"]),
                            (report["baseline"]["filtered"], report["baseline"]["bits_per_byte"])):
        assert filtered["1"]["bits_per_byte"] == plain
        assert filtered["1"]["chunks"] == report["retrieval"]["chunks"]


def test_chunk_counts_grow_with_alpha_and_the_baseline_sees_the_same_chunks(report):
    counts = [entry["chunks"] for entry in report["filtered"].values()]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    for other in (report["filtered_no_retrieval"], report["filtered_random_neighbours"],
                  report["baseline"]["filtered"]):
        assert [entry["chunks"] for entry in other.values()] == counts


def test_retrieval_on_and_off_match_evaluating_by_hand(report, runs, database):  # noqa: F811
    model, _, cfg = load_run(runs["retro"])
    dataset = held_out(runs["retro"])
    assert report["bits_per_byte"] != report["bits_per_byte_no_retrieval"]
    off = evaluate(model, dataset, seq_len=cfg.train.seq_len)  # neighbours=None
    assert report["bits_per_byte_no_retrieval"] == pytest.approx(off["bits_per_byte"], rel=1e-5)
    retrieval = Retrieval(cfg, prepared_data_of(runs["retro"]), splits=["val"], progress=False)
    on = evaluate(model, dataset, seq_len=cfg.train.seq_len,
                  inputs_more=lambda starts: retrieval.batch("val", starts, cfg.train.seq_len))
    assert report["bits_per_byte"] == pytest.approx(on["bits_per_byte"], rel=1e-5)
    rows = control_rows(len(retrieval.ids["val"]))
    control = evaluate(model, dataset, seq_len=cfg.train.seq_len, inputs_more=lambda starts:
                       retrieval.batch("val", starts, cfg.train.seq_len, rows=rows))
    assert report["bits_per_byte_random_neighbours"] == pytest.approx(control["bits_per_byte"],
                                                                      rel=1e-5)
    assert report["bits_per_byte_random_neighbours"] != report["bits_per_byte"]
    dense, _, dense_cfg = load_run(runs["dense"])
    baseline = evaluate(dense, dataset, seq_len=dense_cfg.train.seq_len)
    assert report["baseline"]["bits_per_byte"] == pytest.approx(baseline["bits_per_byte"],
                                                                rel=1e-5)


@pytest.mark.parametrize("num_chunks", [2, 3, 7, 2198])
def test_the_control_reads_another_chunks_neighbours_for_every_chunk(num_chunks):
    rows = control_rows(num_chunks)
    assert sorted(rows.tolist()) == list(range(num_chunks))  # each row read once
    assert not np.any(rows == np.arange(num_chunks))         # never the chunk's own
    assert np.array_equal(rows, control_rows(num_chunks))    # seeded


def test_token_nats_add_up_to_evaluate_and_chunk_bytes_to_the_text(runs):
    model, tokenizer, cfg = load_run(runs["dense"])
    dataset = held_out(runs["dense"])
    nats = token_nats(model, dataset, seq_len=cfg.train.seq_len, batch_size=3)
    assert nats.shape == (dataset.num_tokens,) and nats[0] == 0 and np.all(nats[1:] > 0)
    total = evaluate(model, dataset, seq_len=cfg.train.seq_len)
    assert nats.sum() == pytest.approx(total["loss"] * total["tokens"], rel=1e-5)
    lengths = np.asarray(tokenizer.byte_lengths())
    chunk_nats, chunk_bytes = chunk_totals(nats, dataset.window(0, len(nats)), lengths, 64)
    assert len(chunk_nats) == -(-dataset.num_tokens // 64)
    assert chunk_nats.sum() == pytest.approx(nats.sum(), rel=1e-12)
    assert chunk_bytes.sum() == len(split_text(dataset, tokenizer)) == dataset.num_bytes
    short = token_nats(model, dataset, seq_len=cfg.train.seq_len, max_tokens=300)
    assert short.shape == (301,) and np.allclose(short[:129], nats[:129], rtol=1e-4)


def test_the_default_plot_goes_to_the_run_and_the_text_report(runs, database):  # noqa: F811
    code, out = cli("eval", runs["retro"], "--retro-db", database, "--k", 4)
    assert code == 0
    assert "bits/byte of the chunks whose overlap" in out and "k=4" in out
    assert (runs["retro"] / "filtered_bpb.png").read_bytes()[:4] == b"\x89PNG"


def test_a_retro_run_without_a_database_is_evaluated_without_retrieval(runs, capsys):
    before = snapshot(runs["retro"])
    code, out = cli("eval", runs["retro"], "--json")
    assert code == 0
    assert "without retrieval" in capsys.readouterr().err
    result = json.loads(out)
    assert "filtered" not in result and result["bits_per_byte"] > 0
    assert snapshot(runs["retro"]) == before


def snapshot(*directories: Path) -> dict[str, str]:
    """sha256 of every file under the directories."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for directory in directories for path in sorted(directory.rglob("*"))
            if path.is_file()}


def edited_copy(database: Path, where: Path, **changes) -> Path:  # noqa: F811
    copy = where / "db"
    shutil.copytree(database, copy)
    manifest = json.loads((copy / "database.json").read_text())
    (copy / "database.json").write_text(json.dumps({**manifest, **changes}))
    return copy


def test_bad_inputs_are_refused_in_one_line_and_change_nothing(runs, database, tmp_path,  # noqa: F811
                                                               capsys):
    other_tokenizer = train_tokenizer(str(CORPUS), vocab_size=400, out_dir=tmp_path / "tok",
                                      progress=False)
    other_baseline = tmp_path / "other"
    shutil.copytree(runs["dense"], other_baseline)
    shutil.copyfile(other_tokenizer, other_baseline / "tokenizer.model")
    cases = {
        "no retrieval blocks": [runs["dense"], "--retro-db", database],
        "no RETRO database": [runs["retro"], "--retro-db", tmp_path / "missing"],
        "half-built": [runs["retro"], "--retro-db",
                       edited_copy(database, tmp_path / "half", complete=False)],
        "another tokenizer than": [runs["retro"], "--retro-db",
                                   edited_copy(database, tmp_path / "tok-db",
                                               tokenizer_fingerprint="0" * 16)],
        "chunks of 32 tokens": [runs["retro"], "--retro-db",
                                edited_copy(database, tmp_path / "m", chunk_tokens=32)],
        "--k 5 asks for more": [runs["retro"], "--retro-db", database, "--k", 5],
        "baseline .* has another tokenizer": [runs["retro"], "--retro-db", database,
                                              "--baseline", other_baseline],
        "need --retro-db": [runs["retro"], "--baseline", runs["dense"]],
        "plot directory": [runs["retro"], "--retro-db", database, "--plot",
                           runs["retro"] / "config.yaml" / "bpb.png"],
        "does not exist": [runs["retro"], "--retro-db", database, "--data",  # after the checks
                           tmp_path / "nothing"],
    }
    capsys.readouterr()
    for message, args in cases.items():
        watched = [runs["retro"], runs["dense"], database]
        watched += [Path(a) for a in args if Path(str(a)).is_dir()]
        before = snapshot(*watched)
        code, out = cli("eval", *args)
        err = capsys.readouterr().err
        assert code == 2 and out == "", message
        assert err.count("\n") == 1 and err.startswith("burrow: error:"), err
        assert re.search(message, err), (message, err)
        assert snapshot(*watched) == before, message


def test_a_run_that_cannot_be_written_is_evaluated_without_the_default_plot(
        runs, database, monkeypatch, capsys):  # noqa: F811
    import burrow.run_commands

    def read_only(path, what, fix):
        raise UserError(f"{what} {path} cannot be written (read-only file system); {fix}")

    monkeypatch.setattr(burrow.run_commands, "check_writable_dir", read_only)
    before = snapshot(runs["retro"])
    code, out = cli("eval", runs["retro"], "--retro-db", database, "--json")
    assert code == 0 and json.loads(out)["plot"] is None
    assert "no plot" in capsys.readouterr().err
    assert snapshot(runs["retro"]) == before


def test_other_text_and_a_prefix_are_filtered_too(runs, database):  # noqa: F811
    """--data: a tokenized source gets its neighbours looked up (its own document excluded);
    --max-tokens: the chunks cover the prefix, and alpha = 1 is still the plain figure."""
    for extra in (["--data", CORPUS / "abc.py"], ["--max-tokens", 1000]):
        code, out = cli("eval", runs["retro"], "--retro-db", database, "--json", *extra)
        assert code == 0
        result = json.loads(out)
        assert result["filtered"]["1"]["bits_per_byte"] == result["bits_per_byte"]
        assert result["retrieval"]["chunks"] == -(-(result["tokens"] + 1) // 64)
        assert not result["bytes_estimated"]
