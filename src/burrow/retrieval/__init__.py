"""RETRO's retrieval side (Borgeaud et al. 2021, §2.3-2.4): a frozen encoder, the chunk
database with its faiss index, and neighbours precomputed for a prepared dataset.

Imports data/ (tokenizer, sources, shards), never model/ or train/. The heavy parts (torch,
transformers, faiss) are imported when a function that needs them runs.
"""

from burrow.retrieval.build import build_database
from burrow.retrieval.chunks import CHUNK_TOKENS, VALUE_TOKENS, document_chunks
from burrow.retrieval.database import Database, open_database, retrieved_tokens
from burrow.retrieval.encoder import Encoder, MiniLMEncoder, get_encoder
from burrow.retrieval.retriever import ChunkRetriever, check_database_fits, run_retriever

__all__ = [
    "CHUNK_TOKENS",
    "VALUE_TOKENS",
    "ChunkRetriever",
    "Database",
    "Encoder",
    "MiniLMEncoder",
    "build_database",
    "check_database_fits",
    "document_chunks",
    "get_encoder",
    "open_database",
    "retrieved_tokens",
    "run_retriever",
]
