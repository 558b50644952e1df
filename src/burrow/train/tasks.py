"""Task suites evaluated while a run trains (train.eval_tasks, every train.eval_tasks_every
steps): the harness's scores of the model as it is, into metrics.jsonl and tasks.png.

The tasks are checked when the run starts, so that a wrong name or a missing harness stops it
before the first step rather than at the first evaluation. A RETRO run's tasks are scored with
retrieval from the database it trains with (data.retro_db), k = model.retro.neighbours.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from burrow.config import TrainConfig
from burrow.train.checkpoint import restore_rng_state, rng_state


class TaskEvaluation:
    """The tasks of train.eval_tasks, found once; `scores(model, ...)` evaluates them, a RETRO
    model retrieving from `retro_db` (the run's open Database) when given."""

    def __init__(self, train: TrainConfig, retro_db: Any = None):
        from burrow.eval.tasks import parse_tasks, require_harness, task_manager

        require_harness()
        self.tasks = parse_tasks(train.eval_tasks)
        self.limit = train.eval_tasks_limit or None
        self.every = train.eval_tasks_every
        self.batch_size = train.micro_batch_size
        self.manager = task_manager(self.tasks)
        self.retro_db = retro_db

    def due(self, step: int, max_steps: int) -> bool:
        """Whether a periodic evaluation falls at `step` (the last step's is the final one)."""
        return bool(self.every) and step % self.every == 0 and step < max_steps

    def scores(self, model: torch.nn.Module, tokenizer: Any, device: torch.device
               ) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} of the model now, in eval mode. The harness seeds the global
        generators as it starts; they are put back after, so that evaluating changes nothing
        in the training that follows (dropout, sampling)."""
        from burrow.eval.harness import BurrowLM
        from burrow.eval.tasks import evaluate_tasks, task_scores

        saved = rng_state(device), random.getstate(), np.random.get_state()
        was_training = model.training
        model.eval()
        try:
            lm = BurrowLM(model=model, tokenizer=tokenizer, batch_size=self.batch_size,
                          retro_db=self.retro_db)
            results = evaluate_tasks(lm, self.tasks, limit=self.limit, manager=self.manager)
        finally:
            model.train(was_training)
            restore_rng_state(saved[0], device)
            random.setstate(saved[1])
            np.random.set_state(saved[2])
        return task_scores(results)


def tasks_line(step: int, scores: dict[str, dict[str, float]]) -> str:
    """The progress line of a task evaluation: `tasks step 400 | stdlib_docstrings acc
    0.3032 acc_norm 0.3457`."""
    parts = [" ".join([task, *(f"{metric} {value:.4f}" for metric, value in metrics.items())])
             for task, metrics in scores.items()]
    return f"tasks step {step} | " + " | ".join(parts)
