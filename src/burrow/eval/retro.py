"""A RETRO model evaluated with retrieval and without, and its filtered bits per byte.

RETRO (Borgeaud et al. 2021) reports a retrieval model's bits per byte with its neighbours and
the same model's without (§4.1), and, to tell a gain from copying, bpb(alpha) over the chunks
whose overlap ratio with their neighbours is at most alpha (§2.6, "Quantifying dataset leakage
exploitation"; Figure 6, beside a baseline without retrieval). Here, on the evaluated split:

- The per-token nats come from `token_nats`, in the windows `evaluate` reads (they start at
  0, seq_len, ..., whole chunks, so each window's chunks are chunks of the split's stream and
  their stored neighbours are the ones the model gets). With retrieval each window's C chunks
  get their first k stored neighbours; without, the model runs with neighbours=None (its decoder).
- Chunk c is the stream's tokens at positions [c m, c m + m), m = the model's chunk size (the
  cut the neighbour table uses, retrieval/neighbours.py). Its nats are those of predicting
  these tokens as targets, each from the tokens before it in its window; its bytes are the
  tokens' UTF-8 bytes (`Tokenizer.byte_lengths`). The split's first token is never predicted
  (0 nats) but its bytes count, as in `evaluate`'s denominator, so the chunks' nats and bytes
  add up to evaluate's, and bpb(1) is the plain bits per byte.
- The control (`*_random_neighbours`): each chunk reads the stored neighbours of another chunk
  of the split, chosen by a seeded permutation with no fixed point. The model gets real
  database text of the same kind, just not the text retrieved for this chunk, so the gap
  between it and retrieval on is what reading the retrieved text is worth; the gap between it
  and retrieval off is what any neighbours give (a bias the cross-attention learned, say).
- r(C) = the longest token run the chunk shares with any of its stored neighbours (all of
  them, chunk and continuation: 4 by default, more than the k the model reads) / the chunk's
  length. The paper takes the chunk's nearest neighbours in the training data; ours are the
  database's, with the chunk's own documents excluded (§2.4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from burrow.data import TokenDataset, Tokenizer
from burrow.eval.evaluate import summarise, token_nats
from burrow.eval.leakage import filtered_bits_per_byte, longest_common_substring

if TYPE_CHECKING:
    from burrow.train.retrieval import Retrieval


def chunk_totals(nats: np.ndarray, tokens: np.ndarray, byte_lengths: np.ndarray, m: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(C,) nats and (C,) bytes of the chunks [c m, c m + m) of positions 0 ... P, from the
    per-position nats (P + 1,) and token ids (P + 1,); the last chunk may be partial."""
    if len(nats) != len(tokens):
        raise ValueError(f"{len(nats)} nats for {len(tokens)} tokens")
    edges = np.arange(0, len(nats), m)
    return (np.add.reduceat(nats, edges),
            np.add.reduceat(byte_lengths[np.asarray(tokens, dtype=np.int64)], edges))


def chunk_overlaps(retrieval: Retrieval, split: str, dataset: TokenDataset, num_chunks: int
                   ) -> np.ndarray:
    """(C,) r(C) of the split's first num_chunks chunks against all their stored neighbours."""
    from burrow.retrieval import retrieved_tokens

    m, table = retrieval.chunk_size, retrieval.ids[split]
    ratios = np.zeros(num_chunks)
    for c in range(num_chunks):
        chunk = dataset.window(c * m, m)
        ids = np.asarray(table[c])
        ids = ids[ids >= 0]  # a missing neighbour (-1) is padding, not text
        if len(chunk) and len(ids):
            ratios[c] = longest_common_substring(
                chunk, retrieved_tokens(retrieval.db, ids)) / len(chunk)
    return ratios


def control_rows(num_chunks: int, seed: int = 0) -> np.ndarray:
    """(C,) a seeded permutation of the chunks that maps no chunk to itself: chunk c reads the
    neighbours stored for chunk rows[c] in the control evaluation."""
    rows = np.random.default_rng(seed).permutation(num_chunks)
    if num_chunks > 1:
        for c in np.flatnonzero(rows == np.arange(num_chunks)):
            if rows[c] == c:  # (an earlier swap may have moved it) swap with the next chunk's
                after = (c + 1) % num_chunks
                rows[c], rows[after] = rows[after], rows[c]
    return rows


def evaluate_retro(model: nn.Module, dataset: TokenDataset, tokenizer: Tokenizer,
                   retrieval: Retrieval, split: str, *, seq_len: int, k: int,
                   batch_size: int = 8, device: torch.device | str = "cpu",
                   max_tokens: int | None = None, num_bytes: int | None = None,
                   baseline: tuple[nn.Module, int] | None = None) -> dict[str, Any]:
    """The RETRO run's loss, perplexity and bits per byte with its k neighbours, the same
    without retrieval (`*_no_retrieval`) and with other chunks' neighbours
    (`*_random_neighbours`), bpb(alpha) of the three (`filtered`, `filtered_no_retrieval`,
    `filtered_random_neighbours`) and, with baseline = (dense model, its seq_len), the baseline's on
    the same chunks with the same filter (`baseline`)."""
    settings = {"batch_size": batch_size, "device": device, "max_tokens": max_tokens}

    def nats_of(net: nn.Module, length: int, inputs_more: Any = None) -> np.ndarray:
        return token_nats(net, dataset, seq_len=length, inputs_more=inputs_more, **settings)

    with_retrieval = nats_of(model, seq_len, lambda starts: retrieval.batch(
        split, starts, seq_len, k=k, device=device))
    without = nats_of(model, seq_len)
    rows = control_rows(len(retrieval.ids[split]))
    control = nats_of(model, seq_len, lambda starts: retrieval.batch(
        split, starts, seq_len, k=k, device=device, rows=rows))
    tokens = dataset.window(0, len(with_retrieval))
    byte_lengths = np.asarray(tokenizer.byte_lengths(), dtype=np.int64)
    m = retrieval.chunk_size
    ratios = chunk_overlaps(retrieval, split, dataset, -(-len(tokens) // m))

    def measured(nats: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
        chunk_nats, chunk_bytes = chunk_totals(nats, tokens, byte_lengths, m)
        plain = summarise(float(chunk_nats.sum()), len(nats) - 1, dataset, num_bytes)
        return plain, filtered_bits_per_byte(chunk_nats, chunk_bytes, ratios)

    on, filtered = measured(with_retrieval)
    off, filtered_off = measured(without)
    shuffled, filtered_shuffled = measured(control)
    result = {**on, "loss_no_retrieval": off["loss"],
              "perplexity_no_retrieval": off["perplexity"],
              "bits_per_byte_no_retrieval": off["bits_per_byte"],
              "loss_random_neighbours": shuffled["loss"],
              "bits_per_byte_random_neighbours": shuffled["bits_per_byte"],
              "filtered": filtered, "filtered_no_retrieval": filtered_off,
              "filtered_random_neighbours": filtered_shuffled,
              "retrieval": {"database": str(retrieval.db.path), "k": k,
                            "stored_neighbours": int(retrieval.ids[split].shape[1]),
                            "chunk_size": m, "chunks": len(ratios)}}
    if baseline is not None:
        dense, dense_seq_len = baseline
        plain, dense_filtered = measured(nats_of(dense, dense_seq_len))
        result["baseline"] = {key: plain[key] for key in ("loss", "perplexity", "bits_per_byte")}
        result["baseline"]["filtered"] = dense_filtered
    return result


def format_retro(result: dict[str, Any]) -> str:
    """The lines `burrow eval` prints after the plain report: retrieval off, the control, the
    bpb(alpha) table of retrieval on, off, the control and the baseline, the plot."""
    retrieval, baseline = result["retrieval"], result.get("baseline")
    lines = [f"            with k={retrieval['k']} neighbours per {retrieval['chunk_size']}"
             f"-token chunk; without retrieval {result['bits_per_byte_no_retrieval']:.3f}",
             f"            with other chunks' neighbours (control) "
             f"{result['bits_per_byte_random_neighbours']:.3f}: reading the retrieved text is "
             f"worth {result['bits_per_byte_random_neighbours'] - result['bits_per_byte']:+.4f} "
             "bits/byte",
             "bits/byte of the chunks whose overlap with their neighbours is <= alpha:",
             f"{'alpha':>7} {'chunks':>7} {'retrieval':>10} {'off':>7} {'control':>8}"
             + (f" {'baseline':>9}" if baseline else "")]
    for alpha, entry in result["filtered"].items():
        values = [entry["bits_per_byte"], result["filtered_no_retrieval"][alpha]["bits_per_byte"],
                  result["filtered_random_neighbours"][alpha]["bits_per_byte"]]
        if baseline:
            values.append(baseline["filtered"][alpha]["bits_per_byte"])
        shown = ["-" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"{100 * float(alpha):>6g}% {entry['chunks']:>7,} {shown[0]:>10} "
                     f"{shown[1]:>7} {shown[2]:>8}" + (f" {shown[3]:>9}" if baseline else ""))
    if baseline:
        lines.append(f"baseline {baseline['run']}: {baseline['bits_per_byte']:.3f} bits/byte")
    if result["plot"]:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
