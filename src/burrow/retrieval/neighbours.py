"""Neighbours of a prepared dataset's chunks, looked up once in a database and stored on disk.

RETRO (Borgeaud et al. 2021, §2.3) splits each training sequence into chunks of m = 64 tokens
and gives chunk C_u the k nearest database entries Ret(C_u); since retrieval is frozen, the
neighbours of every chunk of the training data are computed once, before training. Here a split's
token stream (documents separated by </s>, as burrow's shards hold it) is cut at c * m, so chunk
c is tokens [c*m, c*m + m) and lines up with any training sequence whose length is a multiple of
m. §2.4: a chunk's neighbours never come from a document the chunk is part of (matched by the
document's source name), or the model would be handed its own continuation.

The result lives in the database directory, keyed by the prepared data's fingerprint, since the
prepared cache may be read-only and one prepared dataset may meet several databases::

    DB/neighbours/<prepared fingerprint>/<split>.bin        (num_chunks, k) int64 database ids
    DB/neighbours/<prepared fingerprint>/<split>.json       manifest, "complete": true last
    DB/neighbours/<prepared fingerprint>/<split>-progress.json   while computing

Like the database it is computed in batches and a rerun continues after the last batch written.
A database made with another tokenizer or chunk size than the data is refused.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from burrow.data.shards import TokenDataset, read_manifest
from burrow.data.sources import iter_documents, source_fingerprint, split_of
from burrow.data.tokenizer import Tokenizer
from burrow.errors import UserError
from burrow.files import write_text
from burrow.retrieval.database import Database, open_database

DEFAULT_K = 4  # RETRO trains with k = 2 (§4); a few more let evaluation try larger k


def neighbours_dir(db: Database, prepared: Path) -> Path:
    """Where the neighbours of a prepared dataset's splits live in a database directory."""
    manifest = read_manifest(prepared)
    if manifest is None:
        raise UserError(f"{prepared} is not a prepared dataset; make one with `burrow data "
                        "prepare`")
    return db.path / "neighbours" / manifest["fingerprint"]


def split_document_names(dataset: TokenDataset) -> list[str]:
    """The source names of a prepared split's documents, in the order of its shards (the split
    "all" of a tokenized source, burrow.data.tokenize_source, holds every document)."""
    manifest = dataset.manifest
    source = manifest["source"]
    if source_fingerprint(source) != manifest["source_fingerprint"]:
        raise UserError(f"the text of {source} changed since {dataset.directory} was prepared; "
                        "prepare it again to name its documents")
    names = [d.name for d in iter_documents(source, text_field=manifest["text_field"])
             if dataset.split == "all"
             or split_of(d.name, manifest["val_fraction"]) == dataset.split]
    if len(names) != dataset.num_documents:
        raise UserError(f"{source} gives {len(names)} {dataset.split} documents but "
                        f"{dataset.directory} holds {dataset.num_documents}; prepare it again")
    return names


def compute_neighbours(database: Path | str | Database, prepared: Path | str, split: str, *,
                       k: int = DEFAULT_K, chunk_tokens: int | None = None, batch: int = 256,
                       progress: bool = True, stop_after: int | None = None) -> Path:
    """Store the k database neighbours of every chunk of a prepared split; returns the .bin path.

    chunk_tokens, when given (the model's chunk size), must equal the database's m.
    """
    db = database if isinstance(database, Database) else open_database(database)
    prepared = Path(prepared).expanduser()
    dataset = TokenDataset(prepared, split)
    tokenizer = Tokenizer.load(prepared)
    if tokenizer.fingerprint != db.manifest["tokenizer_fingerprint"]:
        raise UserError(f"{db.path} was built with another tokenizer than {prepared}; build a "
                        "database with the prepared data's tokenizer (--tokenizer PREPARED_DIR)")
    m = db.chunk_tokens
    if chunk_tokens is not None and chunk_tokens != m:
        raise UserError(f"{db.path} holds {m}-token chunks, not {chunk_tokens}; build a "
                        f"database with chunks of {chunk_tokens} tokens")
    directory = neighbours_dir(db, prepared)
    directory.mkdir(parents=True, exist_ok=True)
    out, manifest_file = directory / f"{split}.bin", directory / f"{split}.json"
    progress_file = directory / f"{split}-progress.json"
    num_chunks = -(-dataset.num_tokens // m)
    manifest = {"split": split, "k": k, "chunk_tokens": m, "num_chunks": num_chunks,
                "prepared_fingerprint": dataset.fingerprint, "database": db.manifest["settings"]}
    if manifest_file.is_file():
        if json.loads(manifest_file.read_text()) == {**manifest, "complete": True}:
            return out
        manifest_file.unlink()  # other settings (k, a rebuilt database): start again
        progress_file.unlink(missing_ok=True)
    recorded = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    done = recorded["done"] if recorded.get("settings") == manifest and out.is_file() else 0
    ids = np.memmap(out, dtype=np.int64, mode="r+" if done else "w+", shape=(num_chunks, k))
    names = split_document_names(dataset)
    started = time.perf_counter()
    for batches, start in enumerate(range(done, num_chunks, batch), start=1):
        stop = min(num_chunks, start + batch)
        texts, excluded = [], []
        for c in range(start, stop):
            tokens = dataset.window(c * m, m)
            texts.append(tokenizer.decode(tokens))
            first, last = np.searchsorted(dataset.doc_offsets, [c * m, c * m + len(tokens) - 1],
                                          side="right") - 1
            excluded.append(names[first:last + 1])
        ids[start:stop], _ = db.query(texts, k, exclude_documents=excluded)
        ids.flush()
        write_text(progress_file, json.dumps({"done": stop, "settings": manifest}))
        if progress:
            rate = (stop - done) / max(time.perf_counter() - started, 1e-9)
            print(f"retro neighbours: {split} {stop:,}/{num_chunks:,} chunks  "
                  f"{rate:.1f} chunks/s", file=sys.stderr)
        if stop_after is not None and batches >= stop_after and stop < num_chunks:
            return out
    write_text(manifest_file, json.dumps({**manifest, "complete": True}))
    progress_file.unlink(missing_ok=True)
    return out


def open_neighbours(database: Path | str | Database, prepared: Path | str, split: str
                    ) -> np.ndarray:
    """The stored neighbours (num_chunks, k) of a prepared split, as a read-only memmap."""
    db = database if isinstance(database, Database) else open_database(database)
    directory = neighbours_dir(db, Path(prepared).expanduser())
    try:
        manifest = json.loads((directory / f"{split}.json").read_text())
    except FileNotFoundError:
        raise UserError(f"no complete neighbours of the {split} split of {prepared} in "
                        f"{db.path}; compute them with compute_neighbours") from None
    return np.memmap(directory / f"{split}.bin", dtype=np.int64, mode="r",
                     shape=(manifest["num_chunks"], manifest["k"]))
