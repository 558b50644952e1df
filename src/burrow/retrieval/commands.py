"""The `burrow retro` verbs: build a chunk database, query it. Plain functions of parsed arguments.

The CLI imports this module only when a retro verb runs; torch, transformers and faiss are
imported further down, when the encoder or the index is first used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from burrow.errors import UserError


def build_command(args: argparse.Namespace) -> str:
    """`burrow retro build`: build (or finish building) a database; returns the summary line."""
    from burrow.data import Tokenizer, resolve_source
    from burrow.data.tokenizer import MODEL_FILE
    from burrow.retrieval.build import build_database
    from burrow.retrieval.database import open_database

    tokenizer_path = Path(args.tokenizer).expanduser()
    if tokenizer_path.is_dir() and not (tokenizer_path / MODEL_FILE).is_file():
        raise UserError(f"{tokenizer_path} holds no {MODEL_FILE}; pass a tokenizer.model file "
                        "or a run or prepared directory that holds one")
    tokenizer = Tokenizer.load(tokenizer_path)
    out = build_database(resolve_source(args.data), tokenizer, Path(args.out),
                         max_chunks=args.max_chunks, index=args.index, batch=args.batch_size,
                         text_field=args.text_field)
    db = open_database(out)
    return (f"database: {out} ({db.num_chunks:,} chunks of {len(db.document_names):,} "
            f"documents, {db.manifest['index']['factory']} index, "
            f"{db.manifest['encoder']['name']} keys of {db.dim} dimensions)")


def query_command(args: argparse.Namespace) -> dict[str, Any]:
    """`burrow retro query`: the k nearest chunks to a text, with where they come from."""
    from burrow.retrieval.database import open_database

    db = open_database(args.database)
    ids, distances = db.query([args.text], k=args.k, nprobe=args.nprobe)
    neighbours = [{"chunk": int(i), "source": db.document_names[db.documents[i]],
                   "offset": int(db.offsets[i]), "distance": float(d), "text": db.text(int(i))}
                  for i, d in zip(ids[0], distances[0], strict=True) if i >= 0]
    return {"database": str(args.database), "query": args.text, "neighbours": neighbours}


def format_query(result: dict[str, Any]) -> str:
    lines = []
    for rank, found in enumerate(result["neighbours"], start=1):
        lines.append(f"#{rank} {found['source']} at token {found['offset']:,}  "
                     f"distance {found['distance']:.3f}")
        lines += [f"    {line}" for line in found["text"].splitlines()]
    return "\n".join(lines) if lines else "no neighbours: the database is empty"
