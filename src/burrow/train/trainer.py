"""The training loop: data, model, AdamW, schedule, accumulation, eval, checkpoints, signals.

`train(cfg, run_dir)` is the whole job. A run directory holds config.yaml, tokenizer.model,
data.json (where the prepared data lives), metrics.jsonl, loss.png, samples.txt and
checkpoints/step_N/. Stopping (Ctrl-C, SIGTERM, a crash) and resuming with `resume=True` gives
the same losses as not stopping: the loader position, optimiser and RNG states are saved.
One run writes a run directory at a time (train/lock.py), and a resume writes nothing until it
has checked that it can go on (train/rundir.py).
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from burrow.config import RunConfig
from burrow.data import BatchLoader
from burrow.errors import UserError
from burrow.eval.evaluate import evaluate
from burrow.flops import flops_per_token
from burrow.infer import generate
from burrow.model import ModelOutput, Transformer
from burrow.parallel import (
    ParallelDims,
    clip_grad_norm_,
    gradient_sync,
    init_runtime,
    launched_world_size,
    loss_parallel_context,
    parallelize,
)
from burrow.parallel.layouts import clip_sharded_grad_norm_
from burrow.train.batches import BatchSchedule
from burrow.train.checkpoint import (
    list_checkpoints,
    load_training_state,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    whole_copy,
)
from burrow.train.hardware import autocast_for, device_peak_flops
from burrow.train.lock import job_lock, on_rank_zero
from burrow.train.metrics import (
    AuxMeter,
    MetricsLog,
    append_sample,
    eval_report,
    plot_expert_load,
    plot_losses,
    plot_task_scores,
    setup_line,
    train_report,
)
from burrow.train.optim import apply_schedule, build_optimizer
from burrow.train.rundata import load_run_data
from burrow.train.rundir import (
    check_resume,
    checkpoint_to_continue,
    write_run_files,
)
from burrow.train.spikes import SpikeDetector, rollback_target
from burrow.train.stochastic_rounding import store_in_bf16
from burrow.train.tasks import TaskEvaluation, tasks_line

SAMPLE_PROMPT = "def "


class Trainer:
    """One training run in one run directory, in this process and (under torchrun) its peers.

    Every rank runs the same loop on different data; rank 0 alone prints and writes files,
    except for sharded checkpoints, which every rank writes its part of.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False,
                 allow_data_change: bool = False, verbose: bool = True):
        cfg.validate()
        self.cfg, self.run_dir, self.verbose = cfg, Path(run_dir), verbose
        self.resume, self.allow_data_change = resume, allow_data_change
        # checked before joining a process group, which an error here would leave behind
        self.dims = ParallelDims.for_train(cfg.train, launched_world_size())
        self.dims.check_model(cfg)
        self.batches = BatchSchedule.for_train(cfg.train, self.dims.dp_degree)
        self.runtime = init_runtime(cfg.train.device, cfg.train.parallel)
        self.device = self.runtime.device
        self.autocast = autocast_for(self.device, cfg.train.precision, cfg.train.param_dtype)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.stop_signal: int | None = None
        self.step = 0
        self.tokens = 0  # tokens trained on, all ranks: the sum of the steps' batches
        self.aux = AuxMeter()  # what the model's parts report, between two progress lines
        self.eval_bytes: int | None = None  # exact size of the periodic evaluations' text
        self.yardstick: dict[str, float] = {}  # gzip and xz bits per byte on that text

    def log(self, message: str) -> None:
        if self.verbose and self.runtime.is_main:
            print(message, flush=True)

    def record(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl (rank 0)."""
        if self.runtime.is_main:
            self.metrics.write(row)

    # -- setup: checks and loads; writes nothing in the run directory ---------------------------

    def setup(self) -> None:
        cfg = self.cfg
        checkpoint = checkpoint_to_continue(self.run_dir, self.resume)
        if cfg.model.retro is not None and cfg.data.retro_db is None:
            raise UserError("a RETRO model (model.retro) trains with a chunk database: pass "
                            "--retro-db DB (made by `burrow retro build`)")
        self.notes: list[str] = []
        if checkpoint is not None:
            self.notes = on_rank_zero(self.runtime, lambda: check_resume(
                checkpoint, self.run_dir, cfg, self.dims)) or []
        data = load_run_data(cfg, self.run_dir, self.runtime, log=self.log,
                             same_data=self.resume and not self.allow_data_change,
                             progress=self.verbose)
        self.prepared, self.tokenizer = data.prepared, data.tokenizer
        self.retrieval = data.retrieval
        self.train_data, self.val_data = data.train, data.val
        self.task_evaluation = None
        if cfg.train.eval_tasks:  # a RETRO run's tasks retrieve from the database it trains with
            self.task_evaluation = TaskEvaluation(
                cfg.train, retro_db=None if self.retrieval is None else self.retrieval.db)
        if self.task_evaluation is None and (cfg.train.eval_tasks_every
                                             or cfg.train.eval_tasks_limit):
            raise UserError("--eval-tasks-every and --eval-tasks-limit need --eval-tasks TASKS")
        if data.eval_bytes is not None:
            self.eval_bytes, self.yardstick = data.eval_bytes, data.yardstick

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.prepare_model()
        if cfg.train.param_dtype == "bf16":  # Gopher 7.1B and 280B: no float32 master weights
            store_in_bf16(self.model)
        self.wrap_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loader = BatchLoader(self.train_data, self.micro_batch_size, cfg.train.seq_len,
                                  seed=cfg.train.seed, rank=self.dims.dp_rank(self.runtime.rank),
                                  world_size=self.dims.dp_degree,
                                  align=cfg.model.retro.chunk_size if cfg.model.retro else 1)
        self.spikes = SpikeDetector(cfg.train.spike_factor, cfg.train.spike_window)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        dtype = torch.bfloat16 if self.autocast is not None else torch.float32
        # Tokens/s counts all ranks, so the peak is one device's times the number of devices.
        self.peak_flops = device_peak_flops(self.device, dtype) * self.runtime.world_size
        if checkpoint is not None:  # checked by rank 0 above
            self._restore(checkpoint, verify=False)
        self.accumulation = self.batches.accumulation(self.step)
        self.log(setup_line(cfg, self.dims, self.device, self.batches.accumulation(0),
                            self.train_data.num_tokens,
                            self.val_data.num_tokens if self.val_data else 0,
                            self.micro_batch_size, self.batches.describe()))
        if cfg.train.layouts(None):
            self.log("each layer's data-parallel layout (replicas x shards; the embedding, "
                     f"the blocks, the head): {cfg.train.layer_layouts}")

    def wrap_model(self) -> None:
        """Spread the model (parallel/); set micro_batch_size (the batch schedule, self.batches,
        counts micro-batches of it)."""
        train = self.cfg.train
        layers = self.dims.layer_strategies(train, self.cfg.model.n_layers)
        self.forward = self.wrapped = parallelize(self.model, self.dims, self.device,
                                                  bf16=self.autocast is not None, layers=layers,
                                                  compile=train.compile)
        self.micro_batch_size = train.micro_batch_size

    def prepare_model(self) -> None:
        """Change the fresh model before it is wrapped and its optimiser built: subclasses load
        weights or freeze parameters here (train/retrofit.py)."""

    def commit(self) -> None:
        """The run goes on: write its files (rank 0) and say what the resume changed."""
        if self.runtime.is_main:
            write_run_files(self.run_dir, self.cfg, self.dims, self.prepared,
                            self.train_data.fingerprint)
            if self.resume:  # rows logged after the checkpoint: work that is done again
                self.metrics.truncate_after(self.step)
            else:
                self.metrics.path.unlink(missing_ok=True)
        for note in self.notes:
            self.log(note)

    def _restore(self, checkpoint: Path, verify: bool = True) -> None:
        load_weights(checkpoint, self.model, verify=verify)
        state = load_training_state(checkpoint, self.model, self.optimizer, verify=verify)
        if "loader" in state:  # an imported model's checkpoint starts the loader and RNG fresh
            self.loader.load_state_dict(state["loader"], allow_data_change=self.allow_data_change)
            restore_rng_state(state["rng"], self.device)
        self.step = state["step"]
        # checkpoints older than the count: the sum of this run's batches up to the step
        self.tokens = state.get("tokens", self.batches.tokens_between(0, self.step))
        self.spikes = SpikeDetector(self.cfg.train.spike_factor, self.cfg.train.spike_window,
                                    state.get("spike_history"))
        self.log(f"resumed from {checkpoint} at step {self.step}")

    # -- the loop ----------------------------------------------------------------------------

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, **inputs_more: Any
                     ) -> ModelOutput:
        """One micro-batch's forward pass: `.loss` is what is optimised. Subclasses change the
        objective here (train/distill.py); the step around it stays the same. `inputs_more`
        are the model's other inputs for the batch (a RETRO model's neighbours)."""
        return self.forward(inputs, targets, **inputs_more)

    def batch_inputs(self, split: str, starts: list[int]) -> dict[str, Any]:
        """The model's inputs besides the tokens for windows starting at `starts`."""
        if self.retrieval is None:
            return {}
        return self.retrieval.batch(split, starts, self.cfg.train.seq_len, device=self.device)

    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step: loss, cross-entropy, grad norm. The learning rate and the batch
        are functions of the step."""
        apply_schedule(self.optimizer, self.step, self.cfg.train)
        self.accumulation = self.batches.accumulation(self.step)
        losses = self.forward_backward()
        grad_norm = self.clip_gradients(
            self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += self.batches.tokens(self.step)
        self.step += 1
        return float(losses[0]), float(losses[1]), float(grad_norm)

    def forward_backward(self) -> torch.Tensor:
        """The step's `accumulation` micro-batches forward and backward: (loss, cross-entropy),
        each the mean over the step's micro-batches and the ranks.

        Every micro-batch holds micro_batch_size x seq_len targets (training windows have no
        padding) and every rank the same number of micro-batches, so dividing each one's mean
        loss by this step's accumulation makes the gradient that of the mean over all the
        step's tokens, however many micro-batches the step has."""
        loss_sum = torch.zeros((), device=self.device)
        cross_entropy_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.accumulation):
            inputs, targets = self.loader.next_batch()
            more = self.batch_inputs("train", self.loader.last_starts)
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            # Gradients are reduced across ranks once, in the last micro-batch's backward.
            with (gradient_sync(self.wrapped, micro_step == self.accumulation - 1),
                  loss_parallel_context(self.dims.tp)):
                with self.autocast or nullcontext():
                    out = self.forward_loss(inputs, targets, **more)
                # taken before the backward, which recomputing blocks would report to again
                self.aux.add(out.aux)
                (out.loss / self.accumulation).backward()
            loss_sum += out.loss.detach()
            cross_entropy_sum += out.cross_entropy.detach()
        self.aux.end_step(self.runtime.mean, self.accumulation)
        return self.runtime.mean(torch.stack([loss_sum, cross_entropy_sum])) / self.accumulation

    def clip_gradients(self, clip: float) -> torch.Tensor:
        """Scale the gradients to a global norm of at most `clip`; the norm before."""
        if self.dims.ep > 1:  # expert gradients live on different ranks: the global norm
            return clip_grad_norm_(self.model, clip)
        # under FSDP2, each layer's shards on its layout's mesh (parallel/layouts.py)
        return clip_sharded_grad_norm_(self.model.parameters(), clip)

    def run(self) -> dict[str, Any]:
        """Train to max_steps (or until a signal), evaluating and checkpointing on the way."""
        if not self.run_dir.is_dir():  # a resume stops here, before making the directory
            checkpoint_to_continue(self.run_dir, self.resume)
        with job_lock(self.run_dir, self.runtime, self.log):
            self.setup()
            if self.step >= self.cfg.train.max_steps:
                self.log(f"already at step {self.step} of {self.cfg.train.max_steps}; raise "
                         "--max-steps to train further")
                return self.summary()
            self.commit()
            previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if self.stop_signal is not None:
                self.save()
                name = signal.Signals(self.stop_signal).name
                self.log(f"stopped by {name} at step {self.step}: checkpoint saved in "
                         f"{self.run_dir}; continue with --resume")
                return self.summary()
            self.evaluate()
            self.evaluate_tasks()
            self.plot()
            self.save()
            self.write_sample()
            return self.summary()

    def _loop(self) -> None:
        tcfg = self.cfg.train
        interval_losses: list[float] = []
        interval_start, token_seconds = (time.perf_counter(), self.tokens), None
        while self.step < tcfg.max_steps and not self._should_stop():
            loss, cross_entropy, grad_norm = self.train_step()
            if not math.isfinite(loss):
                self.save()
                raise UserError(f"the loss became {loss} at step {self.step}; lower --lr or "
                                "raise --warmup-steps (the last checkpoint is kept)")
            crossed = self.spikes.observe(loss)
            if crossed is not None:
                self._recover_from_spike(loss, crossed)
                interval_losses, interval_start = [], (time.perf_counter(), self.tokens)
                self.aux.reset()
                continue
            interval_losses.append(loss)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                # Time per token, not per step: under a batch ramp the steps grow.
                seconds = (time.perf_counter() - interval_start[0]) / (
                    self.tokens - interval_start[1])
                token_seconds = seconds if token_seconds is None else (
                    0.7 * token_seconds + 0.3 * seconds)
                self._log_train(sum(interval_losses) / len(interval_losses), cross_entropy,
                                grad_norm, seconds, token_seconds)
                interval_losses = []
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.max_steps:
                self.evaluate()
            if self.task_evaluation and self.task_evaluation.due(self.step, tcfg.max_steps):
                self.evaluate_tasks()
            if tcfg.save_every and self.step % tcfg.save_every == 0 and self.step < tcfg.max_steps:
                self.save()
            if not interval_losses:
                interval_start = (time.perf_counter(), self.tokens)

    def _log_train(self, loss: float, cross_entropy: float, grad_norm: float,
                   seconds_per_token: float, smoothed_seconds: float) -> None:
        tokens_per_second = 1.0 / seconds_per_token
        mfu = (tokens_per_second * self.flops_per_token / self.peak_flops
               if self.peak_flops else None)
        lr = self.optimizer.param_groups[0]["lr"]
        eta = smoothed_seconds * self.batches.tokens_between(self.step, self.cfg.train.max_steps)
        row, line = train_report(self.step, self.cfg.train.max_steps, loss, cross_entropy, lr,
                                 grad_norm, self.tokens, tokens_per_second, mfu, eta,
                                 self.aux.take(), frozenset(self.aux.losses),
                                 self.batches.tokens(self.step - 1), self.batches.ramped)
        self.log(line)
        self.record(row)

    def _recover_from_spike(self, loss: float, threshold: float) -> None:
        """PaLM §5.1: back to a checkpoint ~spike_rollback steps earlier, then skip data."""
        tcfg, spike_step = self.cfg.train, self.step
        target = rollback_target(list_checkpoints(self.run_dir), spike_step, tcfg.spike_rollback)
        event = {"step": spike_step, "split": "event", "event": "loss_spike", "loss": loss,
                 "threshold": threshold, "rolled_back_to": None, "skipped_batches": 0,
                 "time": time.time()}
        if target is None:
            self.log(f"loss spike at step {spike_step}: {loss:.4f} > {threshold:.4f}, but there "
                     "is no checkpoint to roll back to; going on")
            self.record(event)
            return
        self._restore(target)
        # the data of the spike_skip steps after the checkpoint, as large as their batches are
        self.loader.skip_batches(self.batches.micro_batches(self.step,
                                                            self.step + tcfg.spike_skip))
        event.update(rolled_back_to=self.step, skipped_batches=tcfg.spike_skip)
        self.record(event)
        self.log(f"loss spike at step {spike_step}: {loss:.4f} > {threshold:.4f}; rolled back to "
                 f"step {self.step} and skipped {tcfg.spike_skip} batches")

    def _should_stop(self) -> bool:
        """Whether a signal arrived, on this rank or any other (so all ranks stop together)."""
        stop = self.runtime.any(self.stop_signal is not None)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return stop

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self.stop_signal = signum
        if not self.runtime.is_main:
            return
        print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving "
              "a checkpoint (press Ctrl-C again to quit without saving)", file=sys.stderr,
              flush=True)

    # -- evaluation, checkpoints, samples ----------------------------------------------------

    def evaluation(self) -> dict[str, float]:
        """Loss, perplexity and bits per byte on the held-out tokens (eval/evaluate.py)."""
        with loss_parallel_context(self.dims.tp):
            return evaluate(self.model, self.val_data, seq_len=self.cfg.train.seq_len,
                            batch_size=self.cfg.train.micro_batch_size, device=self.device,
                            max_tokens=self.cfg.train.eval_tokens or None,
                            autocast=self.autocast, num_bytes=self.eval_bytes,
                            inputs_more=lambda starts: self.batch_inputs("val", starts))

    def evaluate(self) -> dict[str, float] | None:
        if self.val_data is None:
            return None
        result = self.evaluation()
        if not self.runtime.is_main:  # every rank evaluates (FSDP needs them all); one reports
            return result
        row, line = eval_report(self.step, self.optimizer.param_groups[0]["lr"], result,
                                self.yardstick)
        self.record(row)
        self.log(line)
        self.plot()
        return result

    def evaluate_tasks(self) -> None:
        """The harness's tasks (train.eval_tasks) on the model now: a row of metrics.jsonl
        ({"split": "tasks", "tasks": {task: {metric: value}}}), a line, tasks.png."""
        if self.task_evaluation is None:
            return
        model = self.sample_model()  # collective, like sampling: every rank evaluates
        if model is None:
            return
        scores = self.task_evaluation.scores(model, self.tokenizer, self.device)
        if self.runtime.is_main:
            self.record({"step": self.step, "split": "tasks", "tasks": scores,
                         "time": time.time()})
            self.log(tasks_line(self.step, scores))
            self.plot()

    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                 "rng": rng_state(self.device), "spike_history": list(self.spikes.losses)}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                               keep=self.cfg.train.keep_checkpoints,
                               sharded=self.dims.sharded, runtime=self.runtime,
                               record={"config": self.cfg.to_dict(),
                                       "parallel": asdict(self.dims)})

    def plot(self) -> None:
        if not self.runtime.is_main:
            return
        title = f"{self.cfg.preset or 'model'}: {self.cfg.model.num_params():,} parameters"
        rows = self.metrics.rows()
        plot_losses(rows, self.run_dir / "loss.png", title=title)
        plot_expert_load(rows, self.run_dir / "experts.png", title=title)
        plot_task_scores(rows, self.run_dir / "tasks.png", title=title)

    def sample_model(self) -> torch.nn.Module | None:
        """The model to sample from on rank 0 (None elsewhere): heads split over ranks fit no
        KV cache, so a tensor-parallel one is gathered into a whole copy. Collective."""
        if self.dims.tp > 1:
            return whole_copy(self.model, self.device, self.runtime)
        return self.model

    def write_sample(self) -> str:
        model = self.sample_model()
        if model is None:
            return ""
        ids = torch.tensor([self.tokenizer.encode(SAMPLE_PROMPT)], device=self.device)
        new_tokens = min(200, self.cfg.model.max_seq_len - ids.shape[1])
        out = generate(model, ids, new_tokens, temperature=0.8, top_k=50, seed=0)
        text = self.tokenizer.decode(out[0].tolist())
        if not self.runtime.is_main:
            return text
        append_sample(self.run_dir / "samples.txt", self.step, text)
        return text

    def release(self) -> None:
        """Drop the model, optimiser and the communication handles FSDP keeps in them, before the
        process group goes: freed later, at interpreter exit, gloo's work objects abort it."""
        for name in ("forward", "wrapped", "model", "optimizer"):
            self.__dict__.pop(name, None)
        gc.collect()

    def summary(self) -> dict[str, Any]:
        rows = self.metrics.rows()
        val = [row for row in rows if row.get("split") == "val"]
        return {"run_dir": str(self.run_dir), "step": self.step,
                "train_losses": [row["loss"] for row in rows if row.get("split") == "train"],
                "val": val[-1] if val else None, "interrupted": self.stop_signal is not None}

