"""`train`: one run from its config to its summary, with the trainer the config calls for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from burrow.config import RunConfig
from burrow.parallel import shutdown
from burrow.train.metrics import format_duration
from burrow.train.trainer import Trainer


def train(cfg: RunConfig, run_dir: Path, *, resume: bool = False,
          allow_data_change: bool = False, verbose: bool = True,
          trainer_class: type[Trainer] | None = None) -> dict[str, Any]:
    """Train a model as `cfg` says into `run_dir`; return a summary (step, losses, last eval).

    The trainer is the one the config calls for (a distillation's, a retro-fitting's, a
    pipeline's) unless `trainer_class` names another."""
    if trainer_class is None:
        from burrow.train.distill import Distiller
        from burrow.train.pipeline import PipelineTrainer
        from burrow.train.retrofit import RetroFitter

        trainer_class = (RetroFitter if cfg.retro_fit is not None else
                         Distiller if cfg.distill is not None else
                         PipelineTrainer if cfg.train.pipeline_parallel > 1 else Trainer)
    started = time.perf_counter()
    trainer = trainer_class(cfg, run_dir, resume=resume, allow_data_change=allow_data_change,
                            verbose=verbose)
    try:
        summary = trainer.run()
    except BaseException:
        trainer.release()
        shutdown(clean=False)
        raise
    trainer.release()
    shutdown()
    trainer.log(f"done in {format_duration(time.perf_counter() - started)}: {run_dir}")
    return summary
