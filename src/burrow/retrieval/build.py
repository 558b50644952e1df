"""Building a RETRO chunk database (Borgeaud et al. 2021, §2.3), resumably, in flat memory.

Three phases, each leaving the directory in a state a rerun of the same command continues from:

1. chunk: tokenize the source's documents with burrow's tokenizer, cut them into entries
   (chunks.py) and stream values, documents and offsets to disk; then write the manifest with
   "complete": false. Fast (seconds for the stdlib); an interrupted chunking starts again.
2. embed: decode each chunk with our tokenizer, embed the text with the frozen encoder (which
   re-tokenizes it with its own WordPiece vocabulary, as Megatron's RETRO does with BERT) and
   write the keys into a float32 memmap, a batch at a time. After each batch's keys are flushed,
   progress.json (keys written) is replaced atomically; a rerun continues after the last batch
   it records. This is where the time goes.
3. index: train and fill the faiss index from the keys on disk, write it atomically, then write
   the manifest with "complete": true: the last write, so no reader takes a half-built database.

Memory stays flat in the database's size: documents are read one at a time, the keys are
streamed, and the index is filled in batches from the memmap (a flat index itself holds the keys).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from burrow.data.shards import read_manifest, token_dtype
from burrow.data.sources import STDLIB, iter_documents, source_fingerprint
from burrow.data.tokenizer import MODEL_FILE, Tokenizer
from burrow.errors import UserError
from burrow.files import replacing, write_text
from burrow.paths import check_writable_dir
from burrow.retrieval.chunks import CHUNK_TOKENS, VALUE_TOKENS, chunk_lengths, document_chunks
from burrow.retrieval.database import (
    FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    embedded_count,
    read_database_manifest,
)
from burrow.retrieval.encoder import DEFAULT_ENCODER, get_encoder
from burrow.retrieval.index import INDEX_FILE, build_index, index_params, write_index

DEFAULT_BATCH = 256  # chunks embedded between two progress records
REPORT_SECONDS = 10.0


def build_database(source: str, tokenizer: Tokenizer, out: Path | str, *,
                   max_chunks: int | None = None, index: str = "auto",
                   batch: int = DEFAULT_BATCH, progress: bool = True, text_field: str = "text",
                   encoder: str = DEFAULT_ENCODER, encoder_dtype: str = "auto",
                   stop_after: int | None = None) -> Path:
    """Build (or finish building) the database of source's documents in out; returns out.

    source is anything `burrow train --data` takes (a prepared directory stands for the source
    it was prepared from). max_chunks keeps the first chunks in document order; index is "auto"
    (flat up to index.FLAT_MAX_CHUNKS chunks, else IVF-PQ), "flat", "ivfpq" or "opq". A rerun
    with the same arguments continues an interrupted build; one with other data, tokenizer or
    settings is refused. stop_after stops after that many embedded batches, as a kill would
    (for tests of the resume).
    """
    out = Path(out).expanduser()
    source, text_field = _underlying_source(source, text_field)
    settings = {"source": source, "source_fingerprint": source_fingerprint(source),
                "text_field": text_field, "tokenizer_fingerprint": tokenizer.fingerprint,
                "chunk_tokens": CHUNK_TOKENS, "value_tokens": VALUE_TOKENS,
                "max_chunks": max_chunks, "index_request": index, "encoder_request": encoder}
    manifest = read_database_manifest(out)
    if manifest is not None:
        _check_same(out, manifest["settings"], settings)
        if manifest["complete"]:
            return out
    elif out.exists() and (not out.is_dir()
                           or any(not _left_by_chunking(f, tokenizer) for f in out.iterdir())):
        raise UserError(f"{out} already holds other files; choose an empty or new --out")
    check_writable_dir(out, "database directory", "choose another --out")
    index_params(index, 0, 8)  # an unknown kind is refused before any work
    keys_encoder = get_encoder(encoder, dtype=encoder_dtype if manifest is None
                               else manifest["encoder"]["dtype"])
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.iterdir():
            leftover.unlink()  # what a killed chunking phase left (checked above)
        manifest = _write_chunks(source, text_field, tokenizer, out, max_chunks, progress)
        manifest.update(format=FORMAT, version=FORMAT_VERSION, complete=False, settings=settings,
                        encoder={"name": keys_encoder.name, "dim": keys_encoder.dim,
                                 "dtype": keys_encoder.dtype})
        tokenizer.save(out)
        write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    if not _embed(out, manifest, tokenizer, keys_encoder, batch, progress, stop_after):
        return out
    keys = np.memmap(out / FILES["keys"], dtype=np.float32, mode="r",
                     shape=(manifest["num_chunks"], manifest["encoder"]["dim"]))
    params = index_params(index, len(keys), keys.shape[1])
    started = time.perf_counter()
    write_index(build_index(keys, params), out / INDEX_FILE)
    manifest.update(index=params, complete=True)
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)
    if progress:
        print(f"retro build: {params['factory']} index of {len(keys):,} keys in "
              f"{time.perf_counter() - started:.1f} s; database complete in {out}",
              file=sys.stderr)
    return out


def _left_by_chunking(file: Path, tokenizer: Tokenizer) -> bool:
    """Whether a file in a directory without a manifest is one a killed chunking phase left (a
    staging file, a chunk file, this tokenizer): the phase then starts again over them."""
    if file.name == MODEL_FILE:
        return file.is_file() and Tokenizer.load(file).fingerprint == tokenizer.fingerprint
    staging = file.name.startswith(".") and ".tmp" in file.name  # files.staging_path's names
    return file.is_file() and (staging or file.name in FILES.values())


def _underlying_source(source: str, text_field: str) -> tuple[str, str]:
    """A prepared directory stands for the text it was prepared from, with its text field."""
    if source != STDLIB and (prepared := read_manifest(Path(source).expanduser())) is not None:
        return prepared["source"], prepared.get("text_field", text_field)
    return source, text_field


def _check_same(out: Path, built: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to continue or reuse a database in out made from other data or settings."""
    if built.get("tokenizer_fingerprint") != wanted["tokenizer_fingerprint"]:
        raise UserError(f"{out} holds a database built with another tokenizer "
                        f"({built.get('tokenizer_fingerprint')}, not "
                        f"{wanted['tokenizer_fingerprint']}); pass that tokenizer or choose "
                        "another --out")
    for key, value in wanted.items():
        if built.get(key) != value:
            raise UserError(f"{out} holds a database built with {key} {built.get(key)!r}, not "
                            f"{value!r}; rerun with the same flags or choose another --out")


def _write_chunks(source: str, text_field: str, tokenizer: Tokenizer, out: Path,
                  max_chunks: int | None, progress: bool) -> dict[str, Any]:
    """Phase 1: stream every document's entries to values/documents/offsets; their manifest."""
    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    documents: list[dict[str, Any]] = []
    num_chunks = 0
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(replacing(out / FILES[name]))
                 for name in ("values", "documents", "offsets")}
        streams = {name: stack.enter_context(open(path, "wb")) for name, path in files.items()}
        for document in iter_documents(source, text_field=text_field):
            if max_chunks is not None and num_chunks >= max_chunks:
                break
            ids = np.array(tokenizer.encode(document.text), dtype=dtype)
            entries = document_chunks(ids, tokenizer.eos_id, dtype=dtype)
            take = len(entries.offsets) if max_chunks is None else min(
                len(entries.offsets), max_chunks - num_chunks)
            streams["values"].write(entries.values[:take].tobytes())
            streams["offsets"].write(entries.offsets[:take].tobytes())
            streams["documents"].write(np.full(take, len(documents), np.int32).tobytes())
            documents.append({"name": document.name, "tokens": len(ids), "chunks": take,
                              "first_chunk": num_chunks})
            num_chunks += take
        for stream in streams.values():
            stream.close()  # flushed before `replacing` syncs and renames
    if progress:
        print(f"retro build: {num_chunks:,} chunks of {len(documents):,} documents in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {"num_chunks": num_chunks, "chunk_tokens": CHUNK_TOKENS,
            "value_tokens": VALUE_TOKENS, "dtype": dtype.name, "pad_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint, "source": source,
            "documents": documents}


def _embed(out: Path, manifest: dict[str, Any], tokenizer: Tokenizer, encoder, batch: int,
           progress: bool, stop_after: int | None) -> bool:
    """Phase 2: embed the chunks not yet embedded; True when every key is written."""
    n, dim = manifest["num_chunks"], manifest["encoder"]["dim"]
    values = np.memmap(out / FILES["values"], dtype=manifest["dtype"], mode="r",
                       shape=(n, manifest["value_tokens"]))
    documents = np.memmap(out / FILES["documents"], dtype=np.int32, mode="r", shape=(n,))
    offsets = np.memmap(out / FILES["offsets"], dtype=np.int64, mode="r", shape=(n,))
    document_tokens = np.array([d["tokens"] for d in manifest["documents"]], dtype=np.int64)
    keys_file = out / FILES["keys"]
    whole = keys_file.is_file() and keys_file.stat().st_size == n * dim * 4  # else made anew
    done = embedded_count(out) if whole else 0
    keys = np.memmap(keys_file, dtype=np.float32, mode="r+" if whole else "w+", shape=(n, dim))
    started, last_report = time.perf_counter(), 0.0
    first = done
    for batches, start in enumerate(range(done, n, batch), start=1):
        stop = min(n, start + batch)
        lengths = chunk_lengths(offsets[start:stop], document_tokens[documents[start:stop]],
                                manifest["chunk_tokens"])
        texts = [tokenizer.decode(row[:length])
                 for row, length in zip(values[start:stop], lengths, strict=True)]
        keys[start:stop] = encoder.embed(texts)
        keys.flush()
        write_text(out / PROGRESS, json.dumps({"embedded": stop}))
        elapsed = time.perf_counter() - started
        if progress and (elapsed - last_report >= REPORT_SECONDS or stop == n):
            last_report = elapsed
            rate = (stop - first) / max(elapsed, 1e-9)
            print(f"retro build: embedded {stop:,}/{n:,} chunks  {rate:.1f} chunks/s  "
                  f"ETA {_duration((n - stop) / max(rate, 1e-9))}", file=sys.stderr)
        if stop_after is not None and batches >= stop_after and stop < n:
            return False
    return True


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"
