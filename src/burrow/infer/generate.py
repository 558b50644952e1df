"""Generation: prefill a KV cache with the prompt, then sample one token per step.

`generate(model, input_ids, ...)` reads a model and never changes it: on a CPU it decodes
with a copy of the model's modules that shares its weights and reads them block by block
(infer/matvec.py).

A RETRO model retrieves while it samples (Borgeaud et al. 2021, §2.4) through a `retrieve`
callable: each time the sequence completes a chunk of m tokens, that chunk's neighbours are
looked up, and every later pass gives the model the neighbours of all complete chunks
(model/retro.py: the KV cache's RetroCache keeps what chunked cross-attention needs).
burrow.retrieval.ChunkRetriever binds a database into such a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from burrow.errors import UserError
from burrow.infer.cache import KVCache
from burrow.infer.matvec import decoding_copy, sharded

# A compiled decode step is specialised on the cache's length, so `generate(compile=True)`
# rounds it up to a multiple of this (within the context): every prompt and generation length
# in a bucket reuses one graph, in the process and from torch's on-disk compile cache.
COMPILED_CACHE_BUCKET = 256

# retrieve(chunks) -> (neighbours, sources): chunks holds one chunk of m token ids per row of
# the batch; neighbours (B, k, r) the token ids of each chunk's k neighbours, each the retrieved
# chunk and its continuation (a tensor or anything torch.as_tensor reads); sources whatever
# the callable says about them, handed back by generate(return_sources=True).
Retrieve = Callable[[list[list[int]]], tuple[Any, Any]]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             compile: bool = False, retrieve: Retrieve | None = None,
             return_sources: bool = False,
             stop: Callable[[torch.Tensor], bool] | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
    """Continue each row of input_ids (B, T) by max_new_tokens tokens, with a KV cache.

    temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set
    whose probability reaches p. A row that emits eos_id is padded with eos_id after it.
    `compile` runs each one-token step through torch.compile: every step has the same
    shapes (the cache is preallocated and the position is a tensor), so it compiles once
    per batch size and bucket of lengths (COMPILED_CACHE_BUCKET), then spends far less
    time per token outside the matmuls.
    On a CPU, compiled or not, each weight is read as blocks of rows spread over the cores,
    and in small models q, k, v and gate, up run as one product each (infer/matvec.py).
    Runs in inference mode, but for FSDP-sharded models (then without gradients).

    `retrieve`, for a RETRO model (model.retro): called once for each chunk u of m tokens the
    sequence (prompt and generated tokens) completes, with that chunk's tokens, when a later
    pass needs its neighbours: the prompt's complete chunks before the prompt's pass, in order,
    and a chunk completed by a generated token before the pass that reads that token (not for
    a chunk the last token completes: no pass reads it). Its neighbours condition positions
    (u + 1)m - 1 onward through chunked cross-attention, so the tokens of chunk u + 1 are
    sampled attending to the neighbours of chunk u. Without `retrieve` a RETRO model generates
    with its decoder alone. The compiled decode step does not retrieve.

    `stop`, if given, is called after each new token with the tokens generated so far
    (B, n); when it returns True generation ends there, before max_new_tokens (a caller's
    stop strings, say). The tokens it saw are those a longer run begins with.

    Returns (B, T + new) with the prompt included, an ordinary tensor; with `return_sources`,
    also a list whose item u is what `retrieve` said of chunk u's neighbours (its second value).
    """
    T = input_ids.shape[1]
    context = model.cfg.max_seq_len
    if T == 0:
        raise UserError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if T + max_new_tokens > context:
        raise UserError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the "
                        f"context of {context}; shorten the prompt or ask for fewer tokens")
    check_sampling(temperature, top_k, top_p)
    if retrieve is not None:
        if model.cfg.retro is None:
            raise UserError("retrieve was given for a model without retrieval (model.retro is "
                            "unset); generate without it")
        if compile:
            raise UserError("the compiled decode step does not retrieve; generate with "
                            "retrieval without compile")
    elif return_sources:
        raise UserError("return_sources needs a retrieve callable")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    # Inference mode spares every operator autograd's bookkeeping: ~10% of a small model's
    # decode step on a CPU. Not for FSDP's shards (DTensors), whose hooks would make the
    # buffers of the gathered weights inference tensors, unusable when training resumes.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if sharded(model) else torch.inference_mode():
            decoder, _ = decoding_copy(model, steps=max_new_tokens)
            retrieval = None if retrieve is None else ChunkNeighbours(
                retrieve, model.cfg.retro.chunk_size, input_ids)
            tokens = _decode(decoder, input_ids, max_new_tokens, temperature, top_k, top_p,
                             generator, eos_id, compile, retrieval, stop)
    finally:
        model.train(was_training)
    tokens = tokens.clone()  # an ordinary tensor, which autograd accepts (inference ones not)
    return (tokens, retrieval.sources) if return_sources else tokens


class ChunkNeighbours:
    """The neighbours of a generation so far: those of every complete chunk, (B, C, k, r) as the
    model takes them, and what `retrieve` said of each chunk's."""

    def __init__(self, retrieve: Retrieve, chunk_size: int, input_ids: torch.Tensor):
        self.retrieve, self.chunk_size = retrieve, chunk_size
        self.neighbours = input_ids.new_zeros((input_ids.shape[0], 0, 0, 0))  # none yet
        self.sources: list[Any] = []

    def add(self, tokens: Sequence[torch.Tensor]) -> None:
        """Retrieve for the next chunk, whose m tokens the sequence `tokens` (pieces, (B, .)
        each) now holds."""
        m, u = self.chunk_size, self.neighbours.shape[1]
        chunk = torch.cat(list(tokens), dim=1)[:, u * m:(u + 1) * m]
        found, sources = self.retrieve(chunk.tolist())
        found = torch.as_tensor(found, dtype=torch.long, device=self.neighbours.device)
        if found.dim() != 3 or found.shape[0] != chunk.shape[0]:
            raise UserError(f"retrieve must return neighbours (batch, k, r) = "
                            f"({chunk.shape[0]}, k, r), got {tuple(found.shape)}")
        found = found[:, None]
        self.neighbours = found if u == 0 else torch.cat([self.neighbours, found], dim=1)
        self.sources.append(sources)


def _decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
            temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None, eos_id: int | None,
            compile: bool, retrieval: ChunkNeighbours | None = None,
            stop: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """generate's loop: prefill the cache with the prompt, then one token per step; with
    `retrieval`, a chunk's neighbours are fetched when its last token is known; `stop` ends
    the loop early when it says so of the new tokens."""
    B, T = input_ids.shape
    length = T + max_new_tokens
    if compile:  # the mask hides the positions past the end
        length = min(model.cfg.max_seq_len, -(-length // COMPILED_CACHE_BUCKET)
                     * COMPILED_CACHE_BUCKET)
    cache = KVCache(model.cfg, B, length)
    step_logits = compiled_step(model) if compile else _step_logits
    tokens = [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    neighbours = None
    if retrieval is not None:
        for _ in range(T // retrieval.chunk_size):  # the prompt's complete chunks
            retrieval.add(tokens)
        neighbours = retrieval.neighbours
    logits = model(input_ids, cache=cache, last_only=True, neighbours=neighbours).logits[:, -1]
    for step in range(max_new_tokens):  # none: the prompt alone
        next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished[:, None], eos_id)
            finished |= next_token[:, 0] == eos_id
        tokens.append(next_token)
        if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        if stop is not None and stop(torch.cat(tokens[1:], dim=1)):
            break
        # Compiled, the position is a tensor, so that one graph serves them all; eager,
        # an int, so that attention reads only the cache's written positions.
        position = torch.tensor(T + step, device=input_ids.device) if compile else T + step
        if retrieval is None:
            logits = step_logits(model, next_token, cache, position)
            continue
        if (T + step + 1) % retrieval.chunk_size == 0:  # next_token completes a chunk
            retrieval.add(tokens)
        logits = step_logits(model, next_token, cache, position, retrieval.neighbours)
    return torch.cat(tokens, dim=1)


def _step_logits(model: nn.Module, token: torch.Tensor, cache: KVCache,
                 position: int | torch.Tensor, neighbours: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Logits (B, V) of the token after `token` (B, 1), which sits at `position`; a RETRO
    model's `neighbours` are those of every complete chunk of the sequence."""
    return model(token, cache=cache, start=position, neighbours=neighbours).logits[:, -1]


_COMPILED_STEP: Callable | None = None


def compiled_step(model: nn.Module) -> Callable:
    """The decode step through torch.compile (fullgraph, static shapes), made once per process:
    the model is an argument, so every model and decoding copy of one structure shares it."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_step_logits, fullgraph=True, dynamic=False)
    return _COMPILED_STEP


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """UserError for a temperature, top-k or top-p out of range."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token (B, 1) from logits (B, V): greedy, temperature, top-k, nucleus."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
