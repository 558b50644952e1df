"""Token shards, the manifest, and `prepare`: complete or absent, and a no-op when done."""

import importlib
import json

import numpy as np
import pytest

from burrow.config import DataConfig, ModelConfig, RunConfig
from burrow.data import (
    ShardWriter,
    TokenDataset,
    Tokenizer,
    iter_documents,
    prepare,
    prepare_data,
    read_manifest,
    split_of,
    token_dtype,
    tokenize_source,
    train_tokenizer,
)
from burrow.data.shards import write_manifest
from burrow.data.sources import source_files
from burrow.errors import UserError

prepare_module = importlib.import_module("burrow.data.prepare")  # the package exports the function
VAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 150 KB of stdlib files under their own relative paths, plus a trap or two."""
    root = tmp_path_factory.mktemp("corpus")
    total = 0
    for name, path in source_files("stdlib")[::25]:
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        target = root / name.replace("/", "__")
        target.write_text(text, "utf-8")
        total += len(text)
        if total > 150_000:
            break
    (root / "traps.txt").write_text("a\u2581b <s> \x00 \r\n 日本 😀\n", "utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    return prepare(
        str(corpus),
        vocab_size=400,
        val_fraction=VAL_FRACTION,
        out_dir=out,
        shard_tokens=4_000,
        num_workers=2,
        progress=False,
    )


def make_dataset(directory, documents, vocab_size=1000, shard_tokens=5, eos_id=0):
    writer = ShardWriter(
        directory, "train", vocab_size=vocab_size, eos_id=eos_id, shard_tokens=shard_tokens
    )
    for ids in documents:
        writer.add_document(np.array(ids), num_bytes=len(ids))
    manifest = {
        "fingerprint": "test",
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "splits": {"train": writer.close()},
    }
    write_manifest(directory, manifest)
    return TokenDataset(directory, "train")


def test_shards_round_trip_across_shard_boundaries(tmp_path):
    documents = [[5, 6, 7], [8], list(range(10, 23)), [9, 9]]
    dataset = make_dataset(tmp_path, documents, shard_tokens=5)
    expected = np.concatenate([np.array([*doc, 0]) for doc in documents])
    assert dataset.num_tokens == len(expected) == 23
    assert [len(shard) for shard in dataset.tokens.shards] == [5, 5, 5, 5, 3]
    assert dataset.num_documents == 4 and dataset.num_bytes == 19
    assert dataset.doc_offsets.tolist() == [0, 4, 6, 20]
    assert dataset.tokens[:].tolist() == expected.tolist()
    for start in range(24):
        for length in range(0, 25 - start):
            assert (
                dataset.window(start, length).tolist() == expected[start : start + length].tolist()
            )
    assert not list(tmp_path.glob("*.tmp"))
    assert dataset.tokens.dtype == np.uint16 and not dataset.tokens.shards[0].flags.writeable


def test_wide_vocabularies_use_uint32(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    dataset = make_dataset(tmp_path, [[70_000, 65_536, 1]], vocab_size=100_000)
    assert dataset.tokens.dtype == np.uint32
    assert dataset.tokens[:].tolist() == [70_000, 65_536, 1, 0]


def test_a_directory_without_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        TokenDataset(tmp_path, "train")
    make_dataset(tmp_path, [[1, 2]])
    with pytest.raises(UserError, match="unknown split 'test'"):
        TokenDataset(tmp_path, "test")


def test_prepared_tokens_are_the_documents_encoded(prepared, corpus):
    tokenizer = Tokenizer.load(prepared)
    manifest = read_manifest(prepared)
    assert manifest["skipped_non_utf8"] == 1 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        dataset = TokenDataset(prepared, split)
        docs = [d for d in iter_documents(str(corpus)) if split_of(d.name, VAL_FRACTION) == split]
        assert dataset.num_documents == len(docs) > 0
        assert dataset.num_bytes == sum(len(d.text.encode()) for d in docs)
        expected = [i for d in docs for i in [*tokenizer.encode(d.text), tokenizer.eos_id]]
        assert dataset.tokens[:].tolist() == expected
        offsets = np.cumsum([0] + [len(tokenizer.encode(d.text)) + 1 for d in docs])[:-1]
        assert dataset.doc_offsets.tolist() == offsets.tolist()
        assert dataset.fingerprint == f"{manifest['fingerprint']}/{split}"
    assert len(TokenDataset(prepared, "train").tokens.shards) > 1  # shard_tokens=4,000


def test_prepare_again_is_a_no_op(prepared, corpus):
    manifest = prepared / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = prepare(
        str(corpus), vocab_size=400, val_fraction=VAL_FRACTION, out_dir=prepared, progress=False
    )
    assert again == prepared and manifest.stat().st_mtime_ns == before
    # a prepared directory is a source of its own
    assert prepare(str(prepared), vocab_size=123) == prepared


def test_prepare_refuses_to_overwrite_other_data(prepared, corpus):
    with pytest.raises(UserError, match="already holds other data"):
        prepare(str(corpus), vocab_size=400, out_dir=prepared, progress=False)


def test_prepare_uses_the_cache_and_a_key_per_setting(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BURROW_CACHE", str(tmp_path / "cache"))
    first = prepare(str(corpus), vocab_size=400, num_workers=1, progress=False)
    assert first.parent == tmp_path / "cache" and first.name.startswith("prepared-")
    other = prepare(str(corpus), vocab_size=400, val_fraction=0.5, num_workers=1, progress=False)
    assert other != first
    (corpus / "new.txt").write_text("one more document")
    try:
        changed = prepare(str(corpus), vocab_size=400, num_workers=1, progress=False)
    finally:
        (corpus / "new.txt").unlink()
    assert changed not in (first, other)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        p.name for p in (first, other, changed)
    )


class Interrupted(Exception):
    pass


def test_an_interrupted_prepare_leaves_nothing_complete(corpus, tmp_path, monkeypatch):
    calls = []

    def fail_midway(self, ids, num_bytes):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupted
        original(self, ids, num_bytes)

    original = ShardWriter.add_document
    monkeypatch.setattr(ShardWriter, "add_document", fail_midway)
    with pytest.raises(Interrupted):
        prepare(str(corpus), vocab_size=400, out_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ShardWriter, "add_document", original)

    def fail_at_manifest(directory, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_manifest", fail_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), vocab_size=400, out_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_prepare_warns_once_about_skipped_documents_and_empty_validation(tmp_path, capsys):
    names = [f"{i}.txt" for i in range(40) if split_of(f"{i}.txt", 0.02) == "train"][:3]
    for name in names:
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_text("print('hello, world')\n" * 20)
    (tmp_path / "src" / "bad.txt").write_bytes(b"\xff\xfe")
    prepare(str(tmp_path / "src"), vocab_size=280, out_dir=tmp_path / "out", progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: skipped 1 documents that are not valid UTF-8",
        f"warning: no document of {tmp_path / 'src'} fell into the validation split, so there "
        "is nothing to evaluate on; use a source with more documents",
    ]
    assert TokenDataset(tmp_path / "out", "val").num_tokens == 0


def test_prepare_user_errors(tmp_path):
    (tmp_path / "val.txt").write_text("text")
    assert split_of("val.txt", 0.999) == "val"
    with pytest.raises(UserError, match="fell into the validation split"):
        prepare(str(tmp_path / "val.txt"), vocab_size=400, val_fraction=0.999, progress=False)
    with pytest.raises(UserError, match="val_fraction"):
        prepare(str(tmp_path / "val.txt"), vocab_size=400, val_fraction=1.0, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare(str(tmp_path / "nothing"), vocab_size=400, progress=False)
    assert not any(p.name.startswith("prepared-") for p in tmp_path.iterdir())


def test_tokenize_source_with_a_given_tokenizer(prepared, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BURROW_CACHE", str(tmp_path))
    tokenizer = Tokenizer.load(prepared)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "x = [1, 2]\n"}) + "\n")
    dataset = tokenize_source(str(tmp_path / "other.jsonl"), tokenizer, progress=False)
    assert dataset.split == "all"
    assert dataset.tokens[:].tolist() == [*tokenizer.encode("x = [1, 2]\n"), tokenizer.eos_id]
    again = tokenize_source(str(tmp_path / "other.jsonl"), tokenizer, progress=False)
    assert again.directory == dataset.directory
    assert tokenize_source(str(prepared), tokenizer).fingerprint.endswith("/val")


def test_train_tokenizer_writes_a_model_from_the_train_split(corpus, tmp_path):
    path = train_tokenizer(str(corpus), vocab_size=400, out_dir=tmp_path, progress=False)
    assert path == tmp_path / "tokenizer.model"
    assert Tokenizer.load(path).vocab_size == 400


def test_prepare_data_keeps_the_run_tokenizer(prepared, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BURROW_CACHE", str(tmp_path / "cache"))
    model = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    data = DataConfig(source=str(corpus), val_fraction=VAL_FRACTION, keep_tokenizer=True)
    cfg = RunConfig(model=model, data=data)
    with pytest.raises(UserError, match="keep_tokenizer"):
        prepare_data(cfg, progress=False, run_dir=tmp_path)
    tokenizer = Tokenizer.load(prepared)
    tokenizer.save(tmp_path)
    out = prepare_data(cfg, progress=False, run_dir=tmp_path)
    assert out.parent == tmp_path / "cache"
    assert Tokenizer.load(out).fingerprint == tokenizer.fingerprint
    assert read_manifest(out)["source"] == str(corpus)
    assert TokenDataset(out, "val").num_tokens == TokenDataset(prepared, "val").num_tokens
