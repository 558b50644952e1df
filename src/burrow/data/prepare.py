"""Prepare a source for training: train the tokenizer, tokenize every document, write shards.

The result is a directory in the cache (``$BURROW_CACHE``, default ``~/.cache/burrow``) named by a
key that hashes the source's content and every setting that changes the tokens, so preparing the
same data twice is a no-op and changed data gets a new directory. The work happens in a temporary
directory that is renamed at the end, with the manifest written last: an interrupted prepare
never leaves anything that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow.data.cache import CACHE, CACHE_FIX, cache_dir
from burrow.data.shards import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    SPLITS,
    TokenDataset,
    read_manifest,
    write_manifest,
)
from burrow.data.sources import STDLIB, iter_documents, source_fingerprint, split_of
from burrow.data.tokenizer import DEFAULT_SAMPLE_BYTES, MODEL_FILE, TRAINER_OPTIONS, Tokenizer
from burrow.data.workers import tokenize_into_shards
from burrow.errors import UserError
from burrow.paths import check_writable_dir

if TYPE_CHECKING:
    from burrow.config import RunConfig

TOKENIZER_SEED = 0


def prepare(
    source: str,
    *,
    vocab_size: int,
    val_fraction: float = 0.02,
    text_field: str = "text",
    model_type: str = "bpe",
    tokenizer_sample_bytes: int | None = None,
    num_workers: int | None = None,
    out_dir: Path | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Prepare source (see `iter_documents`) and return the prepared directory.

    The directory holds tokenizer.model, the train and val shards and manifest.json. The
    tokenizer is trained on the train split only, unless a fixed `tokenizer` is given (then
    vocab_size, model_type and the sample size are unused); documents are tokenized by
    num_workers processes (default: one per CPU). A source that is already a prepared directory
    is returned as it is, and so is an existing complete preparation of the same data and
    settings. Progress goes to stderr when progress is true; warnings (skipped non-UTF-8
    documents, an empty validation split) always do, one line each.
    """
    if source != STDLIB and read_manifest(Path(source).expanduser()) is not None:
        return Path(source).expanduser()
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sample_bytes = tokenizer_sample_bytes or DEFAULT_SAMPLE_BYTES
    if tokenizer is not None:  # a fixed vocabulary: the tokens depend on it alone
        tokenizer_settings = {"file": MODEL_FILE, "fingerprint": tokenizer.fingerprint}
    else:
        tokenizer_settings = {
            "file": MODEL_FILE,
            "model_type": model_type,
            "vocab_size": vocab_size,
            "sample_bytes": sample_bytes,
            "seed": TOKENIZER_SEED,
            **TRAINER_OPTIONS,
        }
    settings = {
        "tokenizer": tokenizer_settings,
        "val_fraction": val_fraction,
        "text_field": text_field,
    }
    fingerprint = source_fingerprint(source)
    key = _key({"source_fingerprint": fingerprint, **settings})
    out = Path(out_dir) if out_dir is not None else cache_dir() / f"prepared-{key}"
    workers = max(1, num_workers or os.cpu_count() or 1)

    def build(directory: Path) -> dict[str, Any]:
        if tokenizer is not None:
            tokenizer.save(directory)
            used = tokenizer
        else:
            used = _train_tokenizer(
                source,
                directory,
                vocab_size=vocab_size,
                val_fraction=val_fraction,
                text_field=text_field,
                model_type=model_type,
                sample_bytes=sample_bytes,
                workers=workers,
                progress=progress,
            )
        manifest = {"fingerprint": key, "source": source, "source_fingerprint": fingerprint}
        manifest.update(settings)
        manifest.update(
            tokenize_into_shards(
                source,
                directory,
                used,
                text_field=text_field,
                split=lambda name: split_of(name, val_fraction),
                splits=SPLITS,
                workers=workers,
                shard_tokens=shard_tokens,
                progress=progress,
            )
        )
        if manifest["splits"]["val"]["num_documents"] == 0:
            print(
                f"warning: no document of {source} fell into the validation split, so there is "
                "nothing to evaluate on; use a source with more documents",
                file=sys.stderr,
            )
        return manifest

    place = ("prepared directory", "choose another output directory") if out_dir else (
        CACHE, CACHE_FIX)
    _create(out, key, build, place)
    return out


def prepare_data(cfg: RunConfig, progress: bool = True, run_dir: Path | None = None) -> Path:
    """The prepared directory (tokenizer + shards) for a run's data, made on first use.

    With data.keep_tokenizer the data is tokenized with run_dir/tokenizer.model instead of a
    tokenizer trained on it.
    """
    tokenizer = None
    if cfg.data.keep_tokenizer:
        saved = Path(run_dir or ".") / MODEL_FILE
        if not saved.is_file():
            raise UserError(f"data.keep_tokenizer is set but there is no {saved}; put the "
                            "tokenizer there or drop data.keep_tokenizer")
        tokenizer = Tokenizer.load(saved)
    return prepare(cfg.data.source, vocab_size=cfg.model.vocab_size,
                   val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field,
                   model_type=cfg.data.tokenizer_type, progress=progress, tokenizer=tokenizer)


def train_tokenizer(
    source: str,
    *,
    vocab_size: int,
    out_dir: Path,
    val_fraction: float = 0.02,
    text_field: str = "text",
    model_type: str = "bpe",
    sample_bytes: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a tokenizer on the train split of source alone; returns out_dir/tokenizer.model."""
    _train_tokenizer(
        source,
        Path(out_dir),
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        text_field=text_field,
        model_type=model_type,
        sample_bytes=sample_bytes or DEFAULT_SAMPLE_BYTES,
        workers=max(1, num_workers or os.cpu_count() or 1),
        progress=progress,
    )
    return Path(out_dir) / MODEL_FILE


def tokenize_source(
    source: str,
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    num_workers: int | None = None,
    progress: bool = True,
) -> TokenDataset:
    """Every document of source, tokenized with a given tokenizer, as one split named "all".

    For evaluating a trained model on other text. The tokens are cached like `prepare`'s, keyed
    by the source's content and the tokenizer. A prepared directory made with the same tokenizer
    gives its validation split.
    """
    if source != STDLIB and read_manifest(Path(source).expanduser()) is not None:
        if Tokenizer.load(Path(source).expanduser()).fingerprint != tokenizer.fingerprint:
            raise UserError(
                f"{source} was prepared with another tokenizer; "
                "point --data at the text itself to tokenize it with this model's tokenizer"
            )
        return TokenDataset(Path(source).expanduser(), "val")
    fingerprint = source_fingerprint(source)
    settings = {"tokenizer_fingerprint": tokenizer.fingerprint, "text_field": text_field}
    key = _key({"source_fingerprint": fingerprint, **settings})
    out = cache_dir() / f"tokenized-{key}"
    workers = max(1, num_workers or os.cpu_count() or 1)

    def build(directory: Path) -> dict[str, Any]:
        tokenizer.save(directory)
        manifest = {"fingerprint": key, "source": source, "source_fingerprint": fingerprint}
        manifest.update(settings)
        manifest.update(
            tokenize_into_shards(
                source,
                directory,
                tokenizer,
                text_field=text_field,
                split=lambda name: "all",
                splits=("all",),
                workers=workers,
                shard_tokens=DEFAULT_SHARD_TOKENS,
                progress=progress,
            )
        )
        return manifest

    _create(out, key, build, (CACHE, CACHE_FIX))
    return TokenDataset(out, "all")


def _key(identity: dict[str, Any]) -> str:
    """16 hex digits naming a prepared directory: equal exactly when the tokens are equal."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_prepared(directory: Path, key: str) -> bool:
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("fingerprint") == key


def _create(out: Path, key: str, build: Callable[[Path], dict[str, Any]],
            place: tuple[str, str]) -> None:
    """Make out with build(directory) -> manifest, unless a complete one with this key exists.

    build works in out.tmp-<pid>; the manifest is written last and the directory renamed to
    out at the end, and removed if anything fails, so that out is either complete or absent.
    When another process finishes the same work first, its result is kept and ours dropped.
    `place` (what out's folder is, and the fix) names the folder if it cannot be written,
    which is checked before any work.
    """
    if _is_prepared(out, key):
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} already holds other data; remove it or choose another output directory"
        )
    check_writable_dir(out.parent, *place)
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        manifest = build(temporary)
        write_manifest(temporary, {"format": FORMAT_VERSION, **manifest})
        if out.is_dir():
            out.rmdir()  # empty, checked above
        try:
            temporary.rename(out)
        except OSError:
            if not _is_prepared(out, key):
                raise
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _train_tokenizer(
    source: str,
    directory: Path,
    *,
    vocab_size: int,
    val_fraction: float,
    text_field: str,
    model_type: str,
    sample_bytes: int,
    workers: int,
    progress: bool,
) -> Tokenizer:
    """Train the tokenizer on the train split's documents; writes directory/tokenizer.model."""
    started = time.perf_counter()

    def train_texts() -> Iterator[str]:
        count = 0
        for document in iter_documents(source, text_field=text_field):
            if split_of(document.name, val_fraction) == "train":
                count += 1
                yield document.text
        if not count:
            raise UserError(
                f"every document of {source} fell into the validation split; "
                "add documents or lower the validation fraction"
            )

    tokenizer = Tokenizer.train(
        train_texts(),
        vocab_size,
        directory,
        model_type=model_type,
        sample_bytes=sample_bytes,
        seed=TOKENIZER_SEED,
        num_threads=workers,
    )
    if progress:
        print(
            f"trained a {vocab_size}-token {model_type} tokenizer on the train split of {source} "
            f"in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    return tokenizer
