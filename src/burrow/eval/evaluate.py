"""Held-out loss, perplexity and bits per byte, beside what gzip and xz achieve on the same bytes.

A language model is a compressor: -log2 p(text) bits is what arithmetic coding with the model
would spend, so bits per byte compares directly with general-purpose compressors.
"""

from __future__ import annotations

import gzip
import lzma
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from burrow.data import TokenDataset, Tokenizer, eval_batches
from burrow.errors import UserError

Inputs = Callable[[list[int]], dict[str, Any]]


def eval_windows(dataset: TokenDataset, *, seq_len: int, batch_size: int,
                 device: torch.device | str, max_tokens: int | None, inputs_more: Inputs | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """(inputs, targets, more) for each batch of evaluation windows, in order: the
    windows start at 0, seq_len, 2 seq_len ... of the split, and a window starting at s
    predicts the tokens at positions s + 1 ... s + seq_len. `more` is inputs_more(starts)."""
    first = 0
    for inputs, targets in eval_batches(dataset, batch_size, seq_len, max_tokens=max_tokens):
        starts = list(range(first, first + len(inputs) * seq_len, seq_len))
        first += len(inputs) * seq_len
        more = inputs_more(starts) if inputs_more else {}
        yield inputs.to(device), targets.to(device), more


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenDataset, *, seq_len: int, batch_size: int = 8,
             device: torch.device | str = "cpu", max_tokens: int | None = None,
             autocast: Any = None, num_bytes: int | None = None,
             inputs_more: Inputs | None = None) -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte over a split, every token once.

    Bits per byte = total nats / ln 2 / UTF-8 bytes of the text. Every token of the split but
    the first is predicted (document separators included). With max_tokens, only a prefix is
    read and, unless `num_bytes` gives the prefix's exact size, its byte count is estimated in
    proportion (`bytes_estimated` is then true). `inputs_more(starts)` gives the model's other
    inputs for the windows starting at `starts` (a RETRO model's neighbours).
    """
    was_training = model.training
    model.eval()
    total_nats, predicted = 0.0, 0
    for inputs, targets, more in eval_windows(dataset, seq_len=seq_len, batch_size=batch_size,
                                              device=device, max_tokens=max_tokens,
                                              inputs_more=inputs_more):
        with autocast or nullcontext():
            out = model(inputs, targets, **more)
        count = int((targets != -100).sum())
        total_nats += float(out.cross_entropy) * count
        predicted += count
    model.train(was_training)
    return summarise(total_nats, predicted, dataset, num_bytes)


@torch.no_grad()
def token_nats(model: nn.Module, dataset: TokenDataset, *, seq_len: int, batch_size: int = 8,
               device: torch.device | str = "cpu", max_tokens: int | None = None,
               autocast: Any = None, inputs_more: Inputs | None = None) -> np.ndarray:
    """(P + 1,) float64 nats[p] = -ln p(token p | the tokens before it in its window), for the
    split's positions 0 ... P, in `evaluate`'s windows (P = the tokens it predicts); nats[0] = 0,
    the first token being never predicted. Their sum is evaluate()'s total, computed from the
    logits one token at a time instead of by the model's loss."""
    was_training = model.training
    model.eval()
    pieces = [np.zeros(1)]
    for inputs, targets, more in eval_windows(dataset, seq_len=seq_len, batch_size=batch_size,
                                              device=device, max_tokens=max_tokens,
                                              inputs_more=inputs_more):
        with autocast or nullcontext():
            logits = model(inputs, **more).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               reduction="none")  # 0 where the target is -100 (padding)
        # windows are contiguous, so their targets in row order are positions 1, 2, ...
        pieces.append(nats[targets.flatten() != -100].double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(pieces)


def summarise(total_nats: float, predicted: int, dataset: TokenDataset,
              num_bytes: int | None = None) -> dict[str, Any]:
    """loss, perplexity, bits per byte, tokens, bytes and bytes_estimated from a split's total
    nats over `predicted` tokens (see `evaluate` for num_bytes)."""
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
