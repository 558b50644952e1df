"""How much of a retrieval model's gain is copying: RETRO's filtered bits per byte, bpb(alpha).

Retrieval from a database that holds text close to the evaluation text can lower the loss by
copying. RETRO (Borgeaud et al. 2021, §2.6, "Quantifying dataset leakage exploitation") measures
the gain as a function of that closeness: each evaluation chunk C of m tokens gets the length s
of the longest token substring it shares with any of its own nearest neighbours in the database,
and its overlap ratio r(C) = s / m. bpb(alpha) is the bits per byte over the chunks with
r(C) <= alpha only: alpha = 1 keeps every chunk (the plain bits per byte), alpha = 0 keeps the
chunks that share no token with their neighbours, and a gain that survives small alphas is not
copying (Figure 6 plots bpb against alpha for RETRO and its baseline).

The bytes of a chunk are the UTF-8 bytes of its tokens: the tokenizer is lossless and adds no
dummy prefix (data/tokenizer.py), so each token's bytes are those of its piece, a byte-fallback
token is one byte and a control token (</s>) none, and a split's token bytes add up to its text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from burrow.data import Tokenizer

# Figure 6's thresholds, as fractions of the chunk length.
ALPHAS = (0.0, 0.125, 0.25, 0.5, 1.0)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """(vocab_size,) the UTF-8 bytes each token stands for in decoded text."""
    return np.asarray(tokenizer.byte_lengths(), dtype=np.int64)


def longest_common_substring(chunk: np.ndarray, neighbours: np.ndarray) -> int:
    """The longest run of consecutive tokens that `chunk` (m,) shares with any row of
    `neighbours` (k, r): dynamic programming over the chunk's tokens, all neighbours at once."""
    neighbours = np.atleast_2d(np.asarray(neighbours))
    chunk = np.asarray(chunk)
    if chunk.size == 0 or neighbours.size == 0:
        return 0
    # run[j, p]: length of the common run ending at chunk[i] and neighbours[j, p]
    run = np.zeros(neighbours.shape, dtype=np.int32)
    best = 0
    for token in chunk:
        previous = np.zeros_like(run)
        previous[:, 1:] = run[:, :-1]
        run = np.where(neighbours == token, previous + 1, 0)
        best = max(best, int(run.max()))
    return best


def overlap_ratios(chunks: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(C,) r(C) = longest common token substring with the chunk's neighbours / its length, for
    chunks (C, m) and their neighbours (C, k, r)."""
    chunks = np.asarray(chunks)
    return np.array([longest_common_substring(chunk, near) / len(chunk)
                     for chunk, near in zip(chunks, neighbours, strict=True)], dtype=np.float64)


def filtered_bits_per_byte(nats: np.ndarray, num_bytes: np.ndarray, ratios: np.ndarray,
                           alphas: Sequence[float] = ALPHAS) -> dict[str, dict[str, Any]]:
    """bpb(alpha) for each alpha: the chunks' summed nats / ln 2 / their summed bytes, over the
    chunks with overlap ratio <= alpha; with how many chunks that kept. None where none is kept
    (or the kept chunks have no bytes)."""
    nats, num_bytes, ratios = (np.asarray(a, dtype=np.float64) for a in (nats, num_bytes, ratios))
    if not (nats.shape == num_bytes.shape == ratios.shape):
        raise ValueError(f"nats {nats.shape}, bytes {num_bytes.shape} and ratios "
                         f"{ratios.shape} must have one entry per chunk")
    result: dict[str, dict[str, Any]] = {}
    for alpha in alphas:
        kept = ratios <= alpha + 1e-12
        size = float(num_bytes[kept].sum())
        result[f"{alpha:g}"] = {
            "bits_per_byte": float(nats[kept].sum()) / math.log(2) / size if size else None,
            "chunks": int(kept.sum())}
    return result


def plot_filtered(curves: dict[str, dict[str, dict[str, Any]]], path: Path | str,
                  title: str = "bits per byte of chunks with overlap ratio <= alpha") -> Path:
    """A PNG of bpb against alpha, one line per run (RETRO §2.6, Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from burrow.files import replacing

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, filtered in curves.items():
        points = [(float(alpha), entry["bits_per_byte"]) for alpha, entry in filtered.items()
                  if entry["bits_per_byte"] is not None]
        axes.plot([100 * a for a, _ in points], [b for _, b in points], marker="o", label=name)
    axes.set_xlabel("alpha: max. overlap with the neighbours (% of the chunk)")
    axes.set_ylabel("bits per byte")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with replacing(path) as staging:
        figure.savefig(staging, format="png", dpi=120)
    plt.close(figure)
    return path
