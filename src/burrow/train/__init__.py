"""The training loop and what it writes: checkpoints, metrics, plots."""

from burrow.train.launch import train
from burrow.train.trainer import Trainer

__all__ = ["Trainer", "train"]
