"""The data a run reads: prepared shards, their tokenizer, the held-out split's yardstick, and a
RETRO model's stored neighbours. Loaded by `Trainer.setup`; nothing here writes the run
directory (a resume that cannot go on must leave it as it was)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow.config import RunConfig
from burrow.data import TokenDataset, Tokenizer, prepare_data
from burrow.eval.evaluate import compressor_bits_per_byte, split_text
from burrow.parallel.runtime import Runtime
from burrow.train.rundir import check_tokenizer


@dataclass
class RunData:
    prepared: Path
    tokenizer: Tokenizer
    train: TokenDataset
    val: TokenDataset | None  # None when the data has no held-out documents
    # the exact size of the text the periodic evaluations read, and gzip's and xz's bits per
    # byte on it (rank 0 only: the others leave them unset)
    eval_bytes: int | None = None
    yardstick: dict[str, float] = field(default_factory=dict)
    retrieval: Any = None  # train/retrieval.py's Retrieval for a RETRO model


def load_run_data(cfg: RunConfig, run_dir: Path, runtime: Runtime, *,
                  log: Callable[[str], None], same_data: bool, progress: bool) -> RunData:
    """Prepare (rank 0) and open the run's data; `same_data`: a resume, whose tokenizer must be
    the run's own."""
    if runtime.is_main:  # one process tokenizes; the others then find it prepared
        prepare_data(cfg, progress=progress, run_dir=run_dir)
    runtime.barrier()
    prepared = prepare_data(cfg, progress=False, run_dir=run_dir)
    tokenizer = Tokenizer.load(prepared)
    check_tokenizer(run_dir, tokenizer, cfg, same_data=same_data)
    data = RunData(prepared, tokenizer, TokenDataset(prepared, "train"),
                   TokenDataset(prepared, "val"))
    if data.val.num_tokens < 2:
        log("note: no held-out documents, so no evaluation during training (a single file is "
            "one document; raise --set data.val_fraction=... or add files)")
        data.val = None
    elif runtime.is_main:  # gzip and xz on the bytes the periodic evaluations read
        limit = (cfg.train.eval_tokens + 1) if cfg.train.eval_tokens else None
        text = split_text(data.val, tokenizer, max_tokens=limit)
        data.eval_bytes, data.yardstick = len(text), compressor_bits_per_byte(text)
    if cfg.model.retro is not None:  # neighbours looked up once (rank 0), then read
        from burrow.train.retrieval import Retrieval

        splits = ("train", "val") if data.val is not None else ("train",)
        data.retrieval = Retrieval(cfg, prepared, splits=splits, is_main=runtime.is_main,
                                   barrier=runtime.barrier, progress=progress)
    return data
