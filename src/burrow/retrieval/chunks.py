"""Cutting documents into RETRO's database entries: a chunk and its continuation.

RETRO (Borgeaud et al. 2021, §2.3) stores the retrieval database as key-value pairs: the value is
[N, F], a chunk N of m = 64 tokens and its continuation F, the next 64 tokens of the same
document (r = 128 tokens in all); the key is the frozen encoder's embedding of N.

Chunks are cut within documents, at token offsets 0, 64, 128, ... of each document, so that a
chunk never spans two documents. A document's last chunk is kept however short (one token or
more): every token of the corpus can then be retrieved, and a short file is not lost. Where a
document ends before a value's 128 tokens, the value is padded with the tokenizer's </s> id,
which is what ends every document in burrow's token shards; a chunk's own length is
min(m, document length - offset), so the padding is never mistaken for text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 64  # m, RETRO §2.3
VALUE_TOKENS = 2 * CHUNK_TOKENS  # r: the chunk and its continuation


@dataclass(frozen=True)
class DocumentChunks:
    """The database entries of one document: `values` (n, r), `offsets` (n,) token offsets."""

    values: np.ndarray
    offsets: np.ndarray


def chunk_offsets(num_tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """Token offsets at which a document of num_tokens tokens has chunks: 0, m, 2m, ... (int64)."""
    return np.arange(0, num_tokens, chunk_tokens, dtype=np.int64)


def document_chunks(ids: np.ndarray, pad_id: int, *, chunk_tokens: int = CHUNK_TOKENS,
                    value_tokens: int = VALUE_TOKENS, dtype: np.dtype = np.uint16
                    ) -> DocumentChunks:
    """The entries of one document's token ids: each chunk followed by its continuation.

    values[i] = ids[offsets[i] : offsets[i] + value_tokens], padded with pad_id past the end.
    """
    ids = np.asarray(ids)
    offsets = chunk_offsets(len(ids), chunk_tokens)
    padded = np.full(len(offsets) * chunk_tokens + value_tokens, pad_id, dtype=dtype)
    padded[:len(ids)] = ids
    # every row is a window of padded starting at its chunk's offset (a strided view, copied)
    windows = np.lib.stride_tricks.sliding_window_view(padded, value_tokens)
    return DocumentChunks(values=np.ascontiguousarray(windows[offsets]), offsets=offsets)


def chunk_lengths(offsets: np.ndarray, document_tokens: np.ndarray,
                  chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """Tokens of text in each chunk: m, or fewer for a document's last chunk."""
    return np.minimum(chunk_tokens, document_tokens - offsets)

