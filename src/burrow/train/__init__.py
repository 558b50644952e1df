"""The training loop and what it writes: checkpoints, metrics, plots."""

from burrow.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
