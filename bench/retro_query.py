"""Query latency of a RETRO chunk database, exact Flat against IVF-PQ, and IVF-PQ's recall@10.

    .venv/bin/python bench/retro_query.py DB            # DB: a database `burrow retro build` made

The queries are held-out chunks of the database itself: a seeded sample of its keys, each
searched with its own document excluded (RETRO §2.4), as the neighbour precompute searches. The
rival is the exact IndexFlatL2 over the same keys, in the same process; the IVF-PQ index
(index.index_params("ivfpq") for this size, re-ranked by exact distance) is built here from the
keys on disk, so the database's own index is not changed. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import emit, log, run_main, warn_if_busy

from burrow.retrieval import open_database
from burrow.retrieval.index import build_index, index_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--index", default="ivfpq", choices=("ivfpq", "opq"))
    args = parser.parse_args()
    warn_if_busy()
    db = open_database(args.database)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(db.num_chunks, size=min(args.queries, db.num_chunks),
                              replace=False))
    queries = np.asarray(db.keys[rows])
    own = [[db.document_names[db.documents[r]]] for r in rows]
    flat = {"kind": "flat", "factory": "Flat"}
    db.manifest["index"], db.index = flat, build_index(db.keys, flat)

    def timed_query(nprobe=None):
        started = time.perf_counter()
        ids, _ = db.query(queries, args.k, nprobe=nprobe, exclude_documents=own)
        return ids, (time.perf_counter() - started) / len(rows) * 1e3

    exact, flat_ms = timed_query()
    log(f"flat: {flat_ms:.2f} ms per query")
    params = index_params(args.index, db.num_chunks, db.dim)
    started = time.perf_counter()
    db.manifest["index"], db.index = params, build_index(db.keys, params)
    build_s = time.perf_counter() - started
    results = {}
    for nprobe in args.nprobe:
        found, ms = timed_query(nprobe)
        recall = float(np.mean([len(set(a) & set(b)) / args.k
                                for a, b in zip(found, exact, strict=True)]))
        results[str(nprobe)] = {"ms_per_query": round(ms, 3), "recall_at_k": round(recall, 4)}
        log(f"{params['factory']} nprobe {nprobe}: {ms:.2f} ms per query, "
            f"recall@{args.k} {recall:.3f}")
    emit({"database": str(args.database), "chunks": db.num_chunks, "queries": len(rows),
          "k": args.k, "flat_ms_per_query": round(flat_ms, 3), "ivfpq": params,
          "ivfpq_build_s": round(build_s, 1), "ivfpq_by_nprobe": results,
          "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    run_main(main)
