"""Generation with retrieval (RETRO §2.4, sampling): with a KV cache a RETRO model gives the
tokens of full forward passes over the whole sequence with the same neighbours; the retrieve
callable is called once per chunk, exactly when the chunk's last token is known and before the
pass that reads it; `burrow generate --retro-db` prints where each chunk's neighbours came from
and refuses, in one line, a database that does not fit the run."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from burrow import UserError
from burrow.cli import main
from burrow.data import Tokenizer, prepare_data
from burrow.infer import generate
from burrow.retrieval import ChunkRetriever, build_database, open_database
from burrow.retrieval.encoder import ENCODERS
from burrow.run import load_run
from burrow.train import train
from conftest import CORPUS, tiny_run_config
from test_retrieval import ByteCountEncoder
from test_retro_model import M, build, toy
from test_retro_train import retro_config


@pytest.fixture(autouse=True)
def byte_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)


class StandIn:
    """retrieve(chunks) for a toy model: each chunk's neighbours are random tokens seeded by
    the chunk's own tokens (so a full pass can be given the same ones), and each call is
    logged with the chunk and how many tokens the model had read by then."""

    def __init__(self, cfg, k=2, read=None):
        self.cfg, self.k, self.read, self.calls = cfg, k, read, []

    def neighbours(self, chunk: list[int]) -> torch.Tensor:
        seed = sum(token * 37 ** i for i, token in enumerate(chunk)) % 2**31
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.cfg.vocab_size, (self.k, self.cfg.retro.neighbour_length),
                             generator=generator)

    def __call__(self, chunks):
        self.calls.append((chunks, None if self.read is None else sum(self.read)))
        return torch.stack([self.neighbours(chunk) for chunk in chunks]), [len(chunks)]


def full_passes(model, prompt, new, retrieve):
    """Greedy decoding by a full forward pass over the whole sequence for each token, with the
    neighbours of every complete chunk."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(new):
            chunks = tokens.shape[1] // M
            neighbours = torch.stack([torch.stack([retrieve.neighbours(row[u * M:(u + 1) * M])
                                                   for u in range(chunks)])
                                      for row in tokens.tolist()])
            logits = model(tokens, neighbours=neighbours).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("positions, blocked", [("rope", False), ("relative", False),
                                                ("rope", True)])
def test_cached_generation_gives_the_tokens_of_full_passes_with_the_same_neighbours(
        positions, blocked, monkeypatch):
    if blocked:  # the CPU decoding copy with its block-by-block products (infer/matvec.py)
        monkeypatch.setattr("burrow.infer.matvec.MIN_BYTES", 0)
    model = build(toy(positions=positions))
    prompt = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(1))
    retrieve = StandIn(model.cfg)
    # 10 prompt tokens: chunks 0 and 1 complete; 18 more cross the boundaries at 12 ... 28
    cached = generate(model, prompt, 18, temperature=0.0, retrieve=retrieve)
    assert torch.equal(cached, full_passes(model, prompt, 18, retrieve))
    # retrieval matters here: without it the same model continues otherwise
    assert not torch.equal(cached, generate(model, prompt, 18, temperature=0.0))


@pytest.mark.parametrize("positions", ["rope", "relative"])
def test_cached_passes_of_any_length_give_the_full_passs_logits(positions):
    """The RetroCache carries H_u and E_u across passes that start and end anywhere in a
    chunk: one token at a time, passes that cross several chunks, and a whole prefill."""
    from burrow.infer import KVCache
    from test_retro_model import random_neighbours

    model = build(toy(positions=positions))
    ids = torch.randint(0, 37, (2, 23), generator=torch.Generator().manual_seed(3))
    neighbours = random_neighbours(model.cfg, 2, 23)
    with torch.no_grad():
        full = model(ids, neighbours=neighbours).logits
        for lengths in ([23], [1] * 23, [6, 1, 1, 5, 3, 7], [3, 9, 11]):
            cache, start, pieces = KVCache(model.cfg, 2, 32), 0, []
            for length in lengths:
                end = start + length
                pieces.append(model(ids[:, start:end], cache=cache, start=start,
                                    neighbours=neighbours[:, :end // M]).logits)
                start = end
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt_length", [3, 4, 9])
def test_retrieve_is_called_once_per_chunk_when_its_last_token_is_known(prompt_length):
    model = build(toy())
    read = []  # tokens of each pass the model ran
    model.embed.register_forward_hook(
        lambda module, args, out: read.append(args[0].shape[1]) if args[0].dim() == 2 else None)
    retrieve = StandIn(model.cfg, k=3, read=read)
    prompt = torch.randint(0, 37, (2, prompt_length), generator=torch.Generator().manual_seed(2))
    tokens, sources = generate(model, prompt, 14, temperature=0.0, retrieve=retrieve,
                               return_sources=True)
    length = tokens.shape[1]
    # every chunk some pass reads the last token of: all but one the final token completes
    chunks = (length - 1) // M
    assert [chunk for chunk, _ in retrieve.calls] == [
        [row[u * M:(u + 1) * M] for row in tokens.tolist()] for u in range(chunks)]
    for u, (_, already) in enumerate(retrieve.calls):
        last = (u + 1) * M - 1  # the chunk's last token
        # a prompt's chunks before the prompt's pass; a later one just before its last token
        assert already == (0 if last < prompt_length else last)
    assert sources == [[2]] * chunks  # what the callable said, chunk by chunk


def test_generate_refuses_retrieval_it_cannot_do():
    model = build(toy())
    dense = build(dataclasses.replace(toy(), retro=None))
    prompt = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(UserError, match="without retrieval"):
        generate(dense, prompt, 3, retrieve=StandIn(model.cfg))
    with pytest.raises(UserError, match="compiled decode step does not retrieve"):
        generate(model, prompt, 3, retrieve=StandIn(model.cfg), compile=True)
    with pytest.raises(UserError, match="return_sources needs"):
        generate(model, prompt, 3, return_sources=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny RETRO run trained a few steps with its database, and a dense run."""
    root = tmp_path_factory.mktemp("generate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)
        prepared = prepare_data(tiny_run_config(), progress=False)
        db = build_database(str(CORPUS), Tokenizer.load(prepared), root / "db",
                            encoder=ByteCountEncoder.name, progress=False)
        train(retro_config(db, max_steps=3), root / "retro", verbose=False)
        train(tiny_run_config(max_steps=1), root / "dense", verbose=False)
    return {"db": db, "retro": root / "retro", "dense": root / "dense", "root": root}


def cli(*argv) -> int:
    try:
        return main([str(arg) for arg in argv])
    except SystemExit as stop:
        return stop.code


def test_generate_prints_the_sources_of_each_chunks_neighbours(runs, capsys):
    # a separator, the prompt and 100 new tokens: chunk 0 is 64 tokens, chunk 1 the rest
    argv = ["generate", runs["retro"], "--prompt", "def f", "--max-new-tokens", 100,
            "--temperature", 0, "--retro-db", runs["db"], "--k", 3, "--show-sources"]
    assert cli(*argv) == 0
    out = capsys.readouterr().out
    text, listing = out.split("\n\nsources: ", 1)
    assert "attending to the neighbours retrieved for chunk v - 1" in listing
    # the same generation through the API: chunk 0's neighbours are what chunk 1 attended to
    model, tokenizer, _ = load_run(runs["retro"])
    db = open_database(runs["db"])
    ids = [tokenizer.eos_id, *tokenizer.encode("def f")]
    tokens, sources = generate(model, torch.tensor([ids]), 100, temperature=0.0,
                               eos_id=tokenizer.eos_id, retrieve=ChunkRetriever(db, tokenizer, 3),
                               return_sources=True)
    assert text == tokenizer.decode([i for i in tokens[0, 1:].tolist() if i != tokenizer.eos_id])
    assert len(sources) >= 1 and len(sources[0][0]) == 3
    printed = re.findall(r"#(\d) (\S+) at token ([\d,]+)  distance ([\d.]+)", listing)
    expected = [(str(rank), found["source"], f"{found['offset']:,}", f"{found['distance']:.3f}")
                for rank, found in enumerate(sources[0][0], start=1)]
    assert tokens.shape[1] > 64  # the generation reached chunk 1, which attended to chunk 0's
    assert f"chunk 0 (generated tokens {len(ids)}-63:" in listing
    assert listing.splitlines()[2] == "  no neighbours: no chunk before it"
    assert "chunk 1 (generated tokens 64-" in listing
    assert printed == expected
    for _, source, offset, _ in printed:  # each names a chunk of the database
        document = db.document_names.index(source)
        assert int(offset.replace(",", "")) in db.offsets[db.documents == document]


def test_a_retro_run_without_a_database_generates_with_a_note(runs, capsys):
    assert cli("generate", runs["retro"], "--max-new-tokens", 5) == 0
    err = capsys.readouterr().err
    assert "generating without retrieval" in err and "--retro-db DB" in err


def edited_copy(db: Path, out: Path, **fields) -> Path:
    shutil.copytree(db, out)
    manifest = json.loads((out / "database.json").read_text())
    (out / "database.json").write_text(json.dumps({**manifest, **fields}))
    return out


@pytest.mark.parametrize("case, message", [
    ("dense", "has no retrieval blocks"),
    ("missing", "no RETRO database at"),
    ("half", "half-built database"),
    ("tokenizer", "built with another tokenizer"),
    ("chunks", "holds chunks of 32 tokens"),
    ("compile", "--compile does not retrieve"),
    ("k alone", "--k needs --retro-db DB"),
])
def test_generate_refuses_a_database_that_does_not_fit_in_one_line(runs, case, message, capsys,
                                                                   tmp_path):
    run, db, extra = runs["retro"], runs["db"], []
    if case == "dense":
        run = runs["dense"]
    elif case == "missing":
        db = tmp_path / "nothing"
    elif case == "half":
        db = edited_copy(db, tmp_path / "db", complete=False)
    elif case == "tokenizer":
        db = edited_copy(db, tmp_path / "db", tokenizer_fingerprint="0" * 16)
    elif case == "chunks":
        db = edited_copy(db, tmp_path / "db", chunk_tokens=32)
    elif case == "compile":
        extra = ["--compile"]
    before = sorted(path.name for path in run.iterdir())
    argv = ["generate", run, "--max-new-tokens", 5, *extra]
    argv += ["--k", 2] if case == "k alone" else ["--retro-db", db]
    assert cli(*argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: ") and message in lines[0]
    assert captured.out == ""
    assert sorted(path.name for path in run.iterdir()) == before  # nothing written
