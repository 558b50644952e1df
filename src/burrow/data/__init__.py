"""Text sources -> tokenizer -> token shards -> batches. Imports nothing from burrow.model.

The batches (which need torch) are imported on first use, so that preparing data does not
load torch.
"""

from typing import TYPE_CHECKING, Any

from burrow.data.cache import cache_dir
from burrow.data.prepare import (
    prepare,
    prepare_data,
    tokenize_source,
    train_tokenizer,
)
from burrow.data.shards import ShardWriter, TokenDataset, read_manifest, token_dtype
from burrow.data.sources import (
    Document,
    SourceStats,
    iter_documents,
    resolve_source,
    source_fingerprint,
    split_of,
    stdlib_root,
)
from burrow.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from burrow.data.loader import IGNORE_INDEX, BatchLoader, eval_batches

_LAZY = ("IGNORE_INDEX", "BatchLoader", "eval_batches")  # from burrow.data.loader (PEP 562)

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "Document",
    "ShardWriter",
    "SourceStats",
    "TokenDataset",
    "Tokenizer",
    "cache_dir",
    "eval_batches",
    "iter_documents",
    "prepare",
    "prepare_data",
    "read_manifest",
    "resolve_source",
    "source_fingerprint",
    "split_of",
    "stdlib_root",
    "token_dtype",
    "tokenize_source",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from burrow.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'burrow.data' has no attribute {name!r}")
