"""The training loop: data, model, AdamW, schedule, accumulation, eval, checkpoints, signals.

`train(cfg, run_dir)` is the whole job. A run directory holds config.yaml, tokenizer.model,
data.json (where the prepared data lives), metrics.jsonl, loss.png, samples.txt and
checkpoints/step_N/. Stopping (Ctrl-C, SIGTERM, a crash) and resuming with `resume=True` gives
the same losses as not stopping: the loader position, optimiser and RNG states are saved.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from burrow.config import RunConfig
from burrow.data import BatchLoader, TokenDataset, Tokenizer, prepare
from burrow.errors import UserError
from burrow.eval.evaluate import evaluate
from burrow.model import Transformer
from burrow.model.flops import device_peak_flops, flops_per_token
from burrow.train.checkpoint import (
    latest_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from burrow.train.metrics import MetricsLog, format_duration, plot_losses, progress_line
from burrow.train.optim import build_optimizer, learning_rate

SAMPLE_PROMPT = "def "


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is available; use cpu")
    return device


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default (fp32 master weights); fp32 elsewhere."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return None
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def prepare_data(cfg: RunConfig, progress: bool = True) -> Path:
    """The prepared directory (tokenizer + shards) for the run's data, made on first use."""
    return prepare(cfg.data.source, vocab_size=cfg.model.vocab_size,
                   val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field,
                   model_type=cfg.data.tokenizer_type, progress=progress)


class Trainer:
    """One training run in one run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False,
                 allow_data_change: bool = False, verbose: bool = True):
        cfg.validate()
        self.cfg, self.run_dir, self.verbose = cfg, Path(run_dir), verbose
        self.resume, self.allow_data_change = resume, allow_data_change
        self.device = resolve_device(cfg.train.device)
        self.autocast = autocast_for(self.device, cfg.train.precision)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.stop_signal: int | None = None
        self.step = 0

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        checkpoint = latest_checkpoint(self.run_dir)
        if self.resume and checkpoint is None:
            raise UserError(f"--resume: no checkpoint in {self.run_dir}; start without --resume")
        if not self.resume and checkpoint is not None:
            raise UserError(f"{self.run_dir} already holds checkpoints; pass --resume to "
                            "continue that run, or choose another --out")
        prepared = prepare_data(cfg, progress=self.verbose)
        self.tokenizer = Tokenizer.load(prepared)
        if self.tokenizer.vocab_size != cfg.model.vocab_size:
            raise UserError(f"the data's tokenizer has {self.tokenizer.vocab_size} tokens but "
                            f"model.vocab_size is {cfg.model.vocab_size}; pass --set "
                            f"model.vocab_size={self.tokenizer.vocab_size}")
        self.train_data = TokenDataset(prepared, "train")
        self.val_data = TokenDataset(prepared, "val")
        if self.val_data.num_tokens < 2:
            self.log("note: no held-out documents, so no evaluation during training (a single "
                     "file is one document; raise --set data.val_fraction=... or add files)")
            self.val_data = None
        self._write_run_files(prepared)

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg.train)
        micro_tokens = cfg.train.micro_batch_size * cfg.train.seq_len
        self.accumulation = max(1, round(cfg.train.batch_tokens / micro_tokens))
        self.tokens_per_step = self.accumulation * micro_tokens
        self.loader = BatchLoader(self.train_data, cfg.train.micro_batch_size, cfg.train.seq_len,
                                  seed=cfg.train.seed)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        dtype = torch.bfloat16 if self.autocast is not None else torch.float32
        self.peak_flops = device_peak_flops(self.device, dtype)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self.metrics.path.unlink(missing_ok=True)
        self.log(f"model: {cfg.model.num_params():,} parameters "
                 f"({cfg.model.num_params(embeddings=False):,} without embeddings) on "
                 f"{self.device}; {self.tokens_per_step:,} tokens per step "
                 f"({cfg.train.micro_batch_size} x {cfg.train.seq_len} x {self.accumulation}); "
                 f"data: {self.train_data.num_tokens:,} train / "
                 f"{self.val_data.num_tokens if self.val_data else 0:,} val tokens")

    def _write_run_files(self, prepared: Path) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.run_dir / "config.yaml")
        shutil.copyfile(Path(prepared) / "tokenizer.model", self.run_dir / "tokenizer.model")
        (self.run_dir / "data.json").write_text(json.dumps(
            {"prepared": str(Path(prepared).resolve()),
             "fingerprint": self.train_data.fingerprint}, indent=1) + "\n")

    def _restore(self, checkpoint: Path) -> None:
        load_weights(checkpoint, self.model)
        state = load_training_state(checkpoint, self.optimizer)
        self.loader.load_state_dict(state["loader"], allow_data_change=self.allow_data_change)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.step = state["step"]
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {checkpoint} at step {self.step}")

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step over `accumulation` micro-batches: loss, cross-entropy, grad norm."""
        lr = learning_rate(self.step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        cross_entropy_sum = torch.zeros((), device=self.device)
        for _ in range(self.accumulation):
            inputs, targets = self.loader.next_batch()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.autocast or nullcontext():
                out = self.forward(inputs, targets)
            (out.loss / self.accumulation).backward()
            loss_sum += out.loss.detach()
            cross_entropy_sum += out.cross_entropy.detach()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return (float(loss_sum) / self.accumulation, float(cross_entropy_sum) / self.accumulation,
                float(grad_norm))

    def run(self) -> dict[str, Any]:
        """Train to max_steps (or until a signal), evaluating and checkpointing on the way."""
        self.setup()
        tcfg = self.cfg.train
        if self.step >= tcfg.max_steps:
            self.log(f"already at step {self.step} of {tcfg.max_steps}; raise --max-steps "
                     "to train further")
            return self.summary()
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
        self.plot()
        self.save()
        self.write_sample()
        return self.summary()

    def _loop(self) -> None:
        tcfg = self.cfg.train
        interval_losses: list[float] = []
        interval_start, step_seconds = time.perf_counter(), None
        while self.step < tcfg.max_steps and self.stop_signal is None:
            loss, cross_entropy, grad_norm = self.train_step()
            if not math.isfinite(loss):
                self.save()
                raise UserError(f"the loss became {loss} at step {self.step}; lower --lr or "
                                "raise --warmup-steps (the last checkpoint is kept)")
            interval_losses.append(loss)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                elapsed = time.perf_counter() - interval_start
                seconds = elapsed / len(interval_losses)
                step_seconds = seconds if step_seconds is None else (
                    0.7 * step_seconds + 0.3 * seconds)
                self._log_train(sum(interval_losses) / len(interval_losses), cross_entropy,
                                grad_norm, seconds, step_seconds)
                interval_losses = []
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.max_steps:
                self.evaluate()
            if tcfg.save_every and self.step % tcfg.save_every == 0 and self.step < tcfg.max_steps:
                self.save()
            if not interval_losses:
                interval_start = time.perf_counter()

    def _log_train(self, loss: float, cross_entropy: float, grad_norm: float,
                   seconds_per_step: float, smoothed_seconds: float) -> None:
        tokens_per_second = self.tokens_per_step / seconds_per_step
        mfu = (tokens_per_second * self.flops_per_token / self.peak_flops
               if self.peak_flops else None)
        lr = self.optimizer.param_groups[0]["lr"]
        eta = smoothed_seconds * (self.cfg.train.max_steps - self.step)
        self.log(progress_line(self.step, self.cfg.train.max_steps, loss, lr, grad_norm,
                               tokens_per_second, mfu, eta))
        self.metrics.write({"step": self.step, "split": "train", "loss": loss,
                            "cross_entropy": cross_entropy, "lr": lr, "grad_norm": grad_norm,
                            "tokens": self.step * self.tokens_per_step,
                            "tokens_per_second": tokens_per_second, "mfu": mfu,
                            "time": time.time()})

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving "
              "a checkpoint (press Ctrl-C again to quit without saving)", file=sys.stderr,
              flush=True)

    # -- evaluation, checkpoints, samples ----------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        if self.val_data is None:
            return None
        result = evaluate(self.forward, self.val_data, seq_len=self.cfg.train.seq_len,
                          batch_size=self.cfg.train.micro_batch_size, device=self.device,
                          max_tokens=self.cfg.train.eval_tokens or None, autocast=self.autocast)
        self.metrics.write({"step": self.step, "split": "val", "loss": result["loss"],
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "perplexity": result["perplexity"],
                            "bits_per_byte": result["bits_per_byte"], "tokens": result["tokens"],
                            "time": time.time()})
        self.log(f"eval step {self.step} | val loss {result['loss']:.4f} | "
                 f"ppl {result['perplexity']:.2f} | {result['bits_per_byte']:.3f} bits/byte")
        self.plot()
        return result

    def save(self) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}}
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                               keep=self.cfg.train.keep_checkpoints)

    def plot(self) -> None:
        title = f"{self.cfg.preset or 'model'}: {self.cfg.model.num_params():,} parameters"
        plot_losses(self.metrics.rows(), self.run_dir / "loss.png", title=title)

    def write_sample(self) -> str:
        ids = torch.tensor([self.tokenizer.encode(SAMPLE_PROMPT)], device=self.device)
        new_tokens = min(200, self.cfg.model.max_seq_len - ids.shape[1])
        out = self.model.generate(ids, new_tokens, temperature=0.8, top_k=50, seed=0)
        text = self.tokenizer.decode(out[0].tolist())
        with (self.run_dir / "samples.txt").open("a") as handle:
            handle.write(f"--- step {self.step}, temperature 0.8, top-k 50, seed 0 ---\n{text}\n")
        return text

    def summary(self) -> dict[str, Any]:
        rows = self.metrics.rows()
        val = [row for row in rows if row.get("split") == "val"]
        return {"run_dir": str(self.run_dir), "step": self.step,
                "train_losses": [row["loss"] for row in rows if row.get("split") == "train"],
                "val": val[-1] if val else None, "interrupted": self.stop_signal is not None}


def train(cfg: RunConfig, run_dir: Path, *, resume: bool = False,
          allow_data_change: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Train a model as `cfg` says into `run_dir`; return a summary (step, losses, last eval)."""
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume, allow_data_change=allow_data_change,
                      verbose=verbose)
    summary = trainer.run()
    trainer.log(f"done in {format_duration(time.perf_counter() - started)}: {run_dir}")
    return summary
