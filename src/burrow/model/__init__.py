"""Pure nn.Modules: the transformer and its parts. Imports nothing from data/, train/,
parallel/, infer/ or eval/, and nothing of torch.distributed."""

from burrow.model.context import AuxTerm, ForwardContext
from burrow.model.transformer import ModelOutput, Transformer

__all__ = ["AuxTerm", "ForwardContext", "ModelOutput", "Transformer"]
