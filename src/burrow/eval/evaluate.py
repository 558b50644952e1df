"""Held-out loss, perplexity and bits per byte, beside what gzip and xz achieve on the same bytes.

A language model is a compressor: -log2 p(text) bits is what arithmetic coding with the model
would spend, so bits per byte compares directly with general-purpose compressors.
"""

from __future__ import annotations

import gzip
import lzma
import math
from collections.abc import Callable
from contextlib import nullcontext
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from burrow.data import TokenDataset, Tokenizer, eval_batches
from burrow.errors import UserError


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenDataset, *, seq_len: int, batch_size: int = 8,
             device: torch.device | str = "cpu", max_tokens: int | None = None,
             autocast: Any = None, num_bytes: int | None = None,
             inputs_more: Callable[[list[int]], dict[str, Any]] | None = None
             ) -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte over a split, every token once.

    Bits per byte = total nats / ln 2 / UTF-8 bytes of the text. Every token of the split but
    the first is predicted (document separators included). With max_tokens, only a prefix is
    read and, unless `num_bytes` gives the prefix's exact size, its byte count is estimated in
    proportion (`bytes_estimated` is then true). `inputs_more(starts)` gives the model's other
    inputs for the windows starting at `starts` (a RETRO model's neighbours).
    """
    was_training = model.training
    model.eval()
    total_nats, predicted, first = 0.0, 0, 0
    for inputs, targets in eval_batches(dataset, batch_size, seq_len, max_tokens=max_tokens):
        starts = list(range(first, first + len(inputs) * seq_len, seq_len))
        first += len(inputs) * seq_len
        more = inputs_more(starts) if inputs_more else {}
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast or nullcontext():
            out = model(inputs, targets, **more)
        count = int((targets != -100).sum())
        total_nats += float(out.cross_entropy) * count
        predicted += count
    model.train(was_training)
    if predicted == 0:
        raise UserError("the evaluation data has no tokens to predict: with a single file or "
                        "few documents the held-out split can be empty; raise "
                        "data.val_fraction or pass --data")
    complete = predicted >= dataset.num_tokens - 1
    exact = complete or num_bytes is not None
    if complete:
        num_bytes = dataset.num_bytes
    elif num_bytes is None:
        num_bytes = dataset.num_bytes * predicted / dataset.num_tokens
    loss = total_nats / predicted
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nats / math.log(2) / num_bytes,
        "tokens": predicted,
        "bytes": round(num_bytes),
        "bytes_estimated": not exact,
    }


def split_text(dataset: TokenDataset, tokenizer: Tokenizer, max_tokens: int | None = None) -> bytes:
    """The exact UTF-8 text of a split's first max_tokens tokens (all by default).

    The tokenizer is lossless, so decoding each document's tokens gives its text back.
    """
    limit = dataset.num_tokens if max_tokens is None else min(max_tokens, dataset.num_tokens)
    offsets = [int(start) for start in dataset.doc_offsets if start < limit] + [limit]
    pieces = []
    for start, end in pairwise(offsets):
        ids = dataset.window(start, end - start).tolist()
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        pieces.append(tokenizer.decode(ids).encode("utf-8"))
    return b"".join(pieces)


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of `gzip -9` and `xz -9e` on the same bytes: the yardstick."""
    if not data:
        raise ValueError("no bytes to compress")
    gzipped = gzip.compress(data, compresslevel=9, mtime=0)
    xzipped = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return {"gzip_bits_per_byte": 8 * len(gzipped) / len(data),
            "xz_bits_per_byte": 8 * len(xzipped) / len(data)}
