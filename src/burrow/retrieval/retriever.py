"""Retrieval while a RETRO model samples (Borgeaud et al. 2021, §2.4): a database, the run's
tokenizer and k bound into the callable `burrow.generate(..., retrieve=...)` takes, and the
checks that a database fits a model.

Generated text belongs to no document of the database, so no neighbour is excluded (training
excludes the chunk's own documents, retrieval/neighbours.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from burrow.config import RetroConfig
from burrow.data.tokenizer import Tokenizer
from burrow.errors import UserError
from burrow.retrieval.database import Database, open_database, retrieved_tokens


def check_database_fits(db: Database, retro: RetroConfig, tokenizer: Tokenizer | None = None,
                        what: str = "the run") -> None:
    """One-line UserError when the database's chunks, neighbour length or tokenizer (when
    given) differ from the model's (`what` names where the tokenizer comes from)."""
    if db.chunk_tokens != retro.chunk_size:
        raise UserError(f"{db.path} holds chunks of {db.chunk_tokens} tokens but "
                        f"model.retro.chunk_size is {retro.chunk_size}; build a database "
                        f"with chunks of {retro.chunk_size} tokens or use another model")
    if db.value_tokens != retro.neighbour_length:
        raise UserError(f"{db.path} stores neighbours of {db.value_tokens} tokens "
                        f"(chunk and continuation) but the model reads "
                        f"{retro.neighbour_length} (model.retro.continuation="
                        f"{retro.continuation}); set model.retro.continuation="
                        f"{db.value_tokens - db.chunk_tokens}")
    if tokenizer is not None and tokenizer.fingerprint != db.manifest["tokenizer_fingerprint"]:
        raise UserError(f"{db.path} was built with another tokenizer than {what}; build one "
                        f"with {what}'s: `burrow retro build --tokenizer RUN ...`")


def run_retriever(db: Database | str | Path, retro: RetroConfig, tokenizer: Tokenizer,
                  k: int | None = None, what: str = "the run") -> ChunkRetriever:
    """The ChunkRetriever of a RETRO model over the database `db` (a path is opened), with k
    neighbours per chunk (default the model's model.retro.neighbours, the k it trained with);
    a one-line UserError for a database missing, half built or not fitting the model."""
    if not isinstance(db, Database):
        db = open_database(db)
    check_database_fits(db, retro, tokenizer, what=what)
    return ChunkRetriever(db, tokenizer, retro.neighbours if k is None else k)


class ChunkRetriever:
    """retrieve(chunks) for burrow.generate: each row's chunk of token ids decoded with the
    tokenizer, its k nearest database chunks found, and their values returned.

    Returns (neighbours, sources): neighbours (B, k, r) int64 token ids, each neighbour chunk
    and its continuation; sources[b] a list, nearest first, of {"chunk": database id,
    "source": the document's source name, "offset": the chunk's token offset in it,
    "distance": squared L2 between the keys}. A missing neighbour (a database of fewer than
    k chunks) is padding in neighbours and absent from sources.
    """

    def __init__(self, db: Database, tokenizer: Tokenizer, k: int):
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        self.db, self.tokenizer, self.k = db, tokenizer, k

    def __call__(self, chunks: list[list[int]]) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
        texts = [self.tokenizer.decode(chunk) for chunk in chunks]
        ids, distances = self.db.query(texts, self.k)
        sources = [[{"chunk": int(i), "source": self.db.document_names[self.db.documents[i]],
                     "offset": int(self.db.offsets[i]), "distance": float(d)}
                    for i, d in zip(row_ids, row_distances, strict=True) if i >= 0]
                   for row_ids, row_distances in zip(ids, distances, strict=True)]
        return retrieved_tokens(self.db, ids).astype(np.int64), sources
