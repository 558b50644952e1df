"""The nearest-neighbour index over a database's keys: exact for small databases, IVF-PQ beyond.

RETRO (Borgeaud et al. 2021, §2.3) retrieves by L2 distance between frozen-BERT embeddings with
SCaNN over 2 trillion tokens; burrow uses faiss (DESIGN.md §5):

- "flat": `IndexFlatL2`, exact brute force. Up to FLAT_MAX_CHUNKS keys (200,000 x 384 float32 =
  307 MB, a query costs ~77 MFLOP: a few ms on two cores) it is fast enough and needs no training.
- "ivfpq": an inverted file of `nlist` k-means cells, each key stored as a product-quantized code
  of `m` bytes (faiss `index_factory("IVF{nlist},PQ{m}")`, optionally with an OPQ rotation first).
  nlist is the power of two nearest 4 * sqrt(N) (faiss's guideline is 4-16 sqrt(N) cells);
  m = dim / 8 sub-quantizers of 8 bits, 8 dimensions each (48 bytes for MiniLM's 384: a 32x
  compression). It is trained on a seeded sample of max(50 * nlist, 16,384) keys, which covers
  faiss's 39 points per centroid for both the cells and the 256 PQ centroids.

Searches of an IVF-PQ index over-fetch `RERANK` times the candidates and re-rank them by their
exact distance to the keys kept on disk, so that the distances returned are exact and recall is
that of the cells probed, not of the 48-byte codes. `nprobe` (cells visited) is set per query.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from burrow.errors import UserError
from burrow.files import replacing

INDEX_FILE = "index.faiss"
INDEX_KINDS = ("auto", "flat", "ivfpq", "opq")
FLAT_MAX_CHUNKS = 200_000
DEFAULT_NPROBE = 32
RERANK = 4  # candidates fetched per neighbour wanted, re-ranked by exact distance
SAMPLE_SEED = 0


def import_faiss():
    """faiss, or a UserError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("the RETRO index needs faiss; `pip install faiss-cpu` "
                        "(or `pip install burrow-lm[retro]`)") from None
    return faiss


def index_params(kind: str, num_keys: int, dim: int) -> dict[str, Any]:
    """The index a database of num_keys keys of dim dimensions gets (see the module docstring)."""
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown index {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if kind == "flat" or (kind == "auto" and num_keys <= FLAT_MAX_CHUNKS):
        return {"kind": "flat", "factory": "Flat"}
    nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(num_keys))))
    m = dim // 8 if dim % 8 == 0 else dim // 4 if dim % 4 == 0 else 1
    prefix = f"OPQ{m}," if kind == "opq" else ""
    return {"kind": "ivfpq", "factory": f"{prefix}IVF{nlist},PQ{m}", "nlist": nlist, "m": m,
            "opq": kind == "opq", "train_size": min(num_keys, max(50 * nlist, 16_384)),
            "nprobe": DEFAULT_NPROBE}


def build_index(keys: np.ndarray, params: dict[str, Any], *, batch: int = 65_536):
    """A faiss index of params over keys (N, dim) float32, read from the memmap in batches."""
    faiss = import_faiss()
    index = faiss.index_factory(keys.shape[1], params["factory"], faiss.METRIC_L2)
    if not index.is_trained:
        rng = np.random.default_rng(SAMPLE_SEED)
        sample = np.sort(rng.choice(len(keys), size=params["train_size"], replace=False))
        index.train(np.ascontiguousarray(keys[sample]))
    for start in range(0, len(keys), batch):
        index.add(np.ascontiguousarray(keys[start:start + batch]))
    return index


def write_index(index, path: Path) -> None:
    """Write the index to path whole or not at all."""
    faiss = import_faiss()
    with replacing(path) as staging:
        faiss.write_index(index, str(staging))


def read_index(path: Path):
    """The index at path, memory-mapped where faiss can (IVF lists); read whole otherwise."""
    faiss = import_faiss()
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # a flat index cannot be mapped in some faiss versions
        return faiss.read_index(str(path))


def search(index, params: dict[str, Any], keys: np.ndarray, queries: np.ndarray, fetch: int,
           nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the `fetch` nearest keys to each query, squared L2, -1 past the end.

    For IVF-PQ, RERANK * fetch candidates are re-ranked by exact distance to `keys`.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = max(1, min(fetch, index.ntotal))
    if params["kind"] == "flat":
        return index.search(queries, fetch)
    faiss = import_faiss()
    faiss.extract_index_ivf(index).nprobe = nprobe or params["nprobe"]
    _, candidates = index.search(queries, min(index.ntotal, RERANK * fetch))
    distances = np.full(candidates.shape, np.inf, dtype=np.float32)
    for row, ids in enumerate(candidates):
        found = ids >= 0
        exact = keys[np.sort(ids[found])]  # sorted reads from the memmap
        order = np.searchsorted(np.sort(ids[found]), ids[found])
        distances[row, found] = ((exact[order] - queries[row]) ** 2).sum(axis=1)
    best = np.argsort(distances, axis=1, kind="stable")[:, :fetch]
    distances = np.take_along_axis(distances, best, axis=1)
    ids = np.take_along_axis(candidates, best, axis=1)
    ids[~np.isfinite(distances)] = -1
    return distances, ids
