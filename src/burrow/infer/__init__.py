"""Inference apart from the model: generation, sampling, the KV cache, CPU decoding kernels.

Reads a model (burrow.model.Transformer) and never changes it.
"""

from burrow.infer.cache import KVCache
from burrow.infer.generate import generate, sample_next

__all__ = ["KVCache", "generate", "sample_next"]
