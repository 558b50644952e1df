"""Text sources -> tokenizer -> token shards -> batches. Imports nothing from burrow.model."""

from burrow.data.loader import IGNORE_INDEX, BatchLoader, eval_batches
from burrow.data.prepare import (
    cache_dir,
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
