"""Tokenizing documents in worker processes and streaming the tokens into shards.

The workers ignore Ctrl-C (SIGINT reaches every process of the terminal's group): the parent
alone stops, closes the pool and says so in one line, instead of one traceback per worker.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from burrow.data.shards import ShardWriter, token_dtype
from burrow.data.sources import SourceStats, iter_documents
from burrow.data.tokenizer import MODEL_FILE, Tokenizer

BATCH_CHARS = 2**20  # text sent to a worker at a time


def tokenize_into_shards(
    source: str,
    directory: Path,
    tokenizer: Tokenizer,
    *,
    text_field: str,
    split: Callable[[str], str],
    splits: tuple[str, ...],
    workers: int,
    shard_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    """Tokenize every document in worker processes and stream the tokens into shards.

    split(name) says which of splits a document goes to. The workers load the tokenizer from
    directory/tokenizer.model. Returns the manifest's entries about the tokens.
    """
    stats = SourceStats()
    documents = iter_documents(source, text_field=text_field, stats=stats)
    labelled = ((split(document.name), document.text) for document in documents)
    writers = {
        name: ShardWriter(
            directory,
            name,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            shard_tokens=shard_tokens,
        )
        for name in splits
    }
    done = 0
    with (
        tqdm(desc="tokenizing", unit="B", unit_scale=True, file=sys.stderr,
             disable=not progress) as bar,
        worker_pool(workers, directory / MODEL_FILE) as pool,
    ):
        for results in _ordered_map(pool, _encode_batch, _batches(labelled), 2 * workers):
            for name, ids, num_bytes in results:
                writers[name].add_document(ids, num_bytes)
                bar.update(num_bytes)
            done += len(results)
            bar.set_postfix_str(f"{done} documents", refresh=False)
    if stats.warning():
        print(stats.warning(), file=sys.stderr)
    return {
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "skipped_non_utf8": stats.skipped_non_utf8,
        "splits": {name: writer.close() for name, writer in writers.items()},
    }


def worker_pool(workers: int, model_file: Path) -> Pool:
    """A pool of `workers` processes that hold the tokenizer and ignore Ctrl-C.

    SIGINT is ignored in this process while the workers start, so that they inherit that
    (a worker started by fork or by spawn keeps an ignored signal ignored), and each worker
    ignores it again as it starts.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        return Pool(workers, initializer=_start_worker, initargs=(model_file,))
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _batches(labelled: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """Group (split, text) pairs into batches of about BATCH_CHARS characters."""
    batch: list[tuple[str, str]] = []
    size = 0
    for item in labelled:
        batch.append(item)
        size += len(item[1])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(
    pool: Pool, function: Callable, items: Iterable, max_pending: int
) -> Iterator[Any]:
    """pool.imap with at most max_pending items in flight, so that memory stays flat.

    (Pool.imap reads its whole input ahead, which would hold the whole corpus in memory.)
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


_worker_tokenizer: Tokenizer | None = None


def _start_worker(model_file: Path) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = Tokenizer.load(model_file)


def _encode_batch(batch: list[tuple[str, str]]) -> list[tuple[str, np.ndarray, int]]:
    """(split, token ids, UTF-8 bytes) of each (split, text) pair, in a worker process."""
    dtype = token_dtype(_worker_tokenizer.vocab_size)
    return [
        (split, np.array(_worker_tokenizer.encode(text), dtype=dtype), len(text.encode("utf-8")))
        for split, text in batch
    ]
