"""A built RETRO chunk database, opened through memory maps, and its nearest-neighbour query.

A database directory (written by `burrow.retrieval.build.build_database`)::

    database.json    the manifest: tokenizer fingerprint, m, r, encoder, chunk count, index,
                     documents (source name, tokens, first chunk); "complete": true written last
    tokenizer.model  the tokenizer the values were made with (to decode them)
    values.bin       (N, r) token ids: each chunk and its continuation (uint16, or uint32)
    documents.bin    (N,) int32: the document of each chunk (an index into the manifest's list)
    offsets.bin      (N,) int64: the token offset of each chunk within its document
    keys.bin         (N, dim) float32: the encoder's embedding of each chunk's text
    index.faiss      the faiss index over the keys
    progress.json    only while building: how many keys are written (see build.py)

A reader trusts only a manifest that says "complete": an interrupted build is refused.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from burrow.data.tokenizer import Tokenizer
from burrow.errors import UserError
from burrow.retrieval.chunks import chunk_lengths
from burrow.retrieval.encoder import Encoder, get_encoder
from burrow.retrieval.index import INDEX_FILE, read_index, search

MANIFEST = "database.json"
FORMAT = "burrow-retro-database"
FORMAT_VERSION = 1
FILES = {"values": "values.bin", "documents": "documents.bin", "offsets": "offsets.bin",
         "keys": "keys.bin"}
PROGRESS = "progress.json"
BUILD_HINT = "build it with `burrow retro build`"


def embedded_count(path: Path) -> int:
    """How many keys of a database being built are written (0 before any)."""
    try:
        return int(json.loads((Path(path) / PROGRESS).read_text())["embedded"])
    except (FileNotFoundError, NotADirectoryError):
        return 0


def read_database_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest in path, or None when there is none; UserError when it is not ours."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{Path(path) / MANIFEST} is not a database manifest; {BUILD_HINT}"
                        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} holds a {MANIFEST} that is not a RETRO database's; {BUILD_HINT}")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} is a version {manifest.get('version')} database; this burrow "
                        f"reads version {FORMAT_VERSION}: rebuild it with `burrow retro build`")
    return manifest


class Database:
    """A complete database: values, documents, offsets and keys as read-only memmaps, the index.

    `query` finds each query's nearest chunks; `values[ids]` are their tokens (chunk and
    continuation) and `text(i)` a chunk's text.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.num_chunks: int = manifest["num_chunks"]
        self.chunk_tokens: int = manifest["chunk_tokens"]
        self.value_tokens: int = manifest["value_tokens"]
        self.dim: int = manifest["encoder"]["dim"]
        self.document_names: list[str] = [d["name"] for d in manifest["documents"]]
        self.document_tokens = np.array([d["tokens"] for d in manifest["documents"]], np.int64)
        self.document_chunks = np.array([d["chunks"] for d in manifest["documents"]], np.int64)
        self._document_of_name = {name: i for i, name in enumerate(self.document_names)}
        self.values = self._map("values", manifest["dtype"], (self.num_chunks, self.value_tokens))
        self.documents = self._map("documents", np.int32, (self.num_chunks,))
        self.offsets = self._map("offsets", np.int64, (self.num_chunks,))
        self.keys = self._map("keys", np.float32, (self.num_chunks, self.dim))
        self.index = read_index(self.path / INDEX_FILE)
        if self.index.ntotal != self.num_chunks or self.index.d != self.dim:
            raise UserError(f"{self.path / INDEX_FILE} does not match {self.path / MANIFEST}; "
                            "rebuild the database")

    def _map(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        file = self.path / FILES[name]
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise UserError(f"{file} is missing or has the wrong size; rebuild the database")
        return np.memmap(file, dtype=dtype, mode="r", shape=shape)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)

    @cached_property
    def encoder(self) -> Encoder:
        """The encoder that made the keys, with the same settings (loaded on first use)."""
        spec = self.manifest["encoder"]
        return get_encoder(spec["name"], dtype=spec["dtype"])

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of text in each chunk of ids (the rest of its value's first m is padding)."""
        ids = np.asarray(ids)
        return chunk_lengths(self.offsets[ids], self.document_tokens[self.documents[ids]],
                             self.chunk_tokens)

    def text(self, chunk: int) -> str:
        """The text of one chunk (its first m tokens, without padding)."""
        length = int(self.lengths(np.array([chunk]))[0])
        return self.tokenizer.decode(self.values[chunk, :length])

    def document_ids(self, names: Collection[str]) -> list[int]:
        """The database's documents with these source names (names it lacks are skipped)."""
        return [self._document_of_name[n] for n in names if n in self._document_of_name]

    def query(self, queries: Sequence[str] | np.ndarray, k: int = 2, *, nprobe: int | None = None,
              exclude_documents: Sequence[Collection[str]] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances), each (n, k): the k nearest chunks to each query, nearest first.

        queries are texts (embedded with the database's encoder) or an (n, dim) array of keys.
        Distances are squared L2. exclude_documents[i] names the source documents whose chunks
        query i must not return (RETRO §2.4: a chunk never retrieves its own document, hence
        its own continuation); the search over-fetches by those documents' chunk counts, so an
        exact index still returns k neighbours. Missing neighbours are id -1, distance inf.
        """
        if isinstance(queries, np.ndarray):
            vectors = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        else:
            vectors = self.encoder.embed(list(queries))
        n = len(vectors)
        ids = np.full((n, k), -1, dtype=np.int64)
        distances = np.full((n, k), np.inf, dtype=np.float32)
        excluded = [np.array(self.document_ids(names), dtype=np.int64)
                    for names in (exclude_documents or [()] * n)]
        if len(excluded) != n:
            raise ValueError(f"{n} queries but {len(excluded)} sets of excluded documents")
        # each query needs k candidates plus its excluded documents' chunks; queries are searched
        # together in groups of one power of two of candidates (a Flat search reads every key
        # once per call, so fewer calls matter more than a few more candidates)
        needed = np.array([k + int(self.document_chunks[e].sum()) for e in excluded])
        fetches = 2 ** np.ceil(np.log2(np.maximum(needed, 1))).astype(np.int64)
        for fetch in np.unique(fetches):
            rows = np.flatnonzero(fetches == fetch)
            found_d, found_i = search(self.index, self.manifest["index"], self.keys,
                                      vectors[rows], int(fetch), nprobe)
            for row, row_d, row_i in zip(rows, found_d, found_i, strict=True):
                keep = row_i >= 0
                keep[keep] &= ~np.isin(self.documents[row_i[keep]], excluded[row])
                kept_i, kept_d = row_i[keep][:k], row_d[keep][:k]
                ids[row, :len(kept_i)], distances[row, :len(kept_d)] = kept_i, kept_d
        return ids, distances


def open_database(path: Path | str) -> Database:
    """The complete database in path; a one-line UserError for anything else."""
    path = Path(path).expanduser()
    manifest = read_database_manifest(path)
    if manifest is None:
        what = "does not exist" if not path.exists() else f"holds no {MANIFEST}"
        raise UserError(f"no RETRO database at {path}: it {what}; {BUILD_HINT}")
    if manifest.get("complete") is not True:
        raise UserError(f"{path} is a half-built database ({embedded_count(path):,} of "
                        f"{manifest['num_chunks']:,} chunks embedded); finish it by running the "
                        "same `burrow retro build` command again")
    return Database(path, manifest)


def retrieved_tokens(db: Database, ids: np.ndarray) -> np.ndarray:
    """The values (chunk + continuation) of neighbour ids (..., K) as (..., K, r) token ids.

    An id of -1 (no neighbour) gives a row of the tokenizer's </s> id, the values' padding.
    """
    ids = np.asarray(ids)
    out = np.asarray(db.values[np.clip(ids, 0, None).reshape(-1)])
    out = out.reshape(*ids.shape, db.value_tokens)
    out[ids < 0] = db.manifest["pad_id"]
    return out
