"""The training loop under pipeline parallelism: the same run as Trainer's, with a step, an
evaluation and a sample that go through the pipeline's stages (parallel/pipeline.py).

- A step draws the micro-batches accumulation would (the same data, in the same order) and
  hands them to the schedule, which runs forward and backward of each through the stages; the
  last stage's losses are summed over the world so that every rank logs the same numbers.
  Each stage may be split over tensor-parallel ranks (parallel/pipeline.py says how).
- The gradient norm spans every stage's parameters (each stage's squared norm, over its
  tensor-parallel and FSDP shards, summed over the pipeline) before clipping, as one process
  computes it.
- Evaluation runs the held-out windows forward only through the same schedule, in batches of
  one step's micro-batches; the last stage's token losses, summed, reach every rank.
- Checkpoints are DCP shards: each stage writes its parameters under the whole model's names,
  so a run resumes in one process, under FSDP or in another pipeline.
- The sample at the end comes from a whole copy of the model that rank 0 reads from the
  checkpoint just written (no rank holds every weight).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from burrow.eval.evaluate import eval_windows, summarise
from burrow.model import Transformer
from burrow.parallel.pipeline import build_pipeline
from burrow.train.batches import BatchSchedule
from burrow.train.checkpoint import latest_checkpoint, load_weights
from burrow.train.trainer import Trainer


class PipelineTrainer(Trainer):
    """A Trainer whose model is cut into train.pipeline_parallel stages, one per group of
    ranks: `self.model` is this rank's stage (parallel/pipeline.py's StageModule)."""

    def wrap_model(self) -> None:
        train, n_layers = self.cfg.train, self.cfg.model.n_layers
        layers = self.dims.layer_strategies(train, n_layers)
        self.pipeline = build_pipeline(self.model, self.dims, self.device,
                                       self.autocast is not None, train, layers=layers,
                                       compile=train.compile)
        self.model = self.pipeline.module  # the whole model's other parts are dropped
        self.micro_batch_size = self.pipeline.micro_batch_size
        # the schedule's micro-batches are fixed when it is built: no batch ramp (limits.py)
        self.batches = BatchSchedule.constant(
            self.micro_batch_size * train.seq_len * self.dims.dp_degree,
            self.pipeline.micro_batches)
        self.accumulation = self.pipeline.micro_batches

    def forward_backward(self) -> torch.Tensor:
        """The step's micro-batches through the pipeline's schedule: (loss, cross-entropy)."""
        batches = [self.loader.next_batch() for _ in range(self.accumulation)]
        inputs = torch.cat([inputs for inputs, _ in batches]).to(self.device)
        targets = torch.cat([targets for _, targets in batches]).to(self.device)
        with self.autocast or nullcontext():
            return self.pipeline.step(inputs, targets)

    def clip_gradients(self, clip: float) -> torch.Tensor:
        return self.pipeline.clip_grad_norm_(clip)

    def evaluation(self) -> dict[str, float]:
        train = self.cfg.train
        windows = eval_windows(self.val_data, seq_len=train.seq_len,
                               batch_size=self.accumulation * self.micro_batch_size,
                               device=self.device, max_tokens=train.eval_tokens or None,
                               inputs_more=None)
        self.model.eval()  # no dropout
        try:
            total_nats, predicted = self.pipeline.evaluate(windows, self.autocast)
        finally:
            self.model.train()
        return summarise(total_nats, predicted, self.val_data, self.eval_bytes)

    def sample_model(self) -> torch.nn.Module | None:
        if not self.runtime.is_main:
            return None
        model = Transformer(self.cfg.model).to(self.device)
        load_weights(latest_checkpoint(self.run_dir), model, alone=True)
        return model

    def release(self) -> None:
        self.__dict__.pop("pipeline", None)
        super().release()
