"""Pure nn.Modules: the transformer and its parts. Imports nothing from data/, train/, parallel/."""

from burrow.model.layers import KVCache
from burrow.model.transformer import ModelOutput, Transformer, sample_next

__all__ = ["KVCache", "ModelOutput", "Transformer", "sample_next"]
