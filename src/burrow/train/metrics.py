"""What a run tells its user: the progress line, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from burrow.files import save_figure, write_text


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, flushed as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (work lost when resuming from that checkpoint)."""
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_count(value: float | None) -> str:
    """70e9 -> '70B', 1.4e12 -> '1.4T', 4230000 -> '4.23M'; None -> '-'."""
    if value is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


class AuxMeter:
    """The named terms the model's parts report (model/context.py's AuxTerm), averaged over a
    step's micro-batches, the ranks and the steps between two progress lines, per layer.

    `add` each micro-batch's terms, `end_step` after the step (one reduction over the ranks
    for all of them), `take` the interval's means as metrics.jsonl keeps them:
    {name: {"layers": [...], "values": [...]}}, None when nothing was reported.
    """

    def __init__(self) -> None:
        self.losses: set[str] = set()  # the names that are loss terms
        self.step: dict[str, tuple[list[int], Any]] = {}
        self.interval: dict[str, tuple[list[int], Any]] = {}
        self.steps = 0

    def add(self, terms: list[Any]) -> None:
        import torch

        grouped: dict[str, list[Any]] = {}
        for term in terms:
            grouped.setdefault(term.name, []).append(term)
            if term.is_loss:
                self.losses.add(term.name)
        for name, group in grouped.items():
            values = torch.stack([t.value.detach().float() for t in group])
            previous = self.step.get(name)
            self.step[name] = ([t.layer for t in group],
                               values if previous is None else previous[1] + values)

    def end_step(self, mean_over_ranks: Callable[[Any], Any], micro_batches: int) -> None:
        if not self.step:
            return
        import torch

        names = list(self.step)
        flat = torch.cat([self.step[name][1].reshape(-1) for name in names])
        flat = mean_over_ranks(flat) / micro_batches
        sizes = [self.step[name][1].numel() for name in names]
        for name, values in zip(names, flat.split(sizes)):
            layers, shaped = self.step[name][0], values.view_as(self.step[name][1])
            previous = self.interval.get(name)
            self.interval[name] = (layers, shaped if previous is None else previous[1] + shaped)
        self.step = {}
        self.steps += 1

    def take(self) -> dict[str, Any] | None:
        row = ({name: {"layers": layers, "values": (values / self.steps).tolist()}
                for name, (layers, values) in self.interval.items()} if self.interval else None)
        self.reset()
        return row

    def reset(self) -> None:
        self.step, self.interval, self.steps = {}, {}, 0


def setup_line(cfg: Any, dims: Any, device: Any, accumulation: int, train_tokens: int,
               val_tokens: int, micro_batch_size: int | None = None, ramp: str = "") -> str:
    """The line a run starts with: the model's size, where it runs (on how many processes,
    spread as ParallelDims `dims` says), the batch (`accumulation` micro-batches of
    `micro_batch_size` sequences, default train.micro_batch_size; `ramp` the batches that
    follow, as BatchSchedule.describe says them) and the data."""
    model, train, data_parallel = cfg.model, cfg.train, dims.dp_degree
    where = (f"{dims.world_size} x {device.type} ({dims.describe()})" if dims.world_size > 1
             else str(device))
    active_params = model.num_params(active=True)
    active = (f", {active_params:,} active per token"
              if active_params != model.num_params() else "")
    micro_batch_size = micro_batch_size or train.micro_batch_size
    tokens_per_step = micro_batch_size * train.seq_len * accumulation * data_parallel
    return (f"model: {model.num_params():,} parameters{active} "
            f"({model.num_params(embeddings=False):,} without embeddings) on {where}; "
            f"{tokens_per_step:,} tokens per step ({micro_batch_size} x {train.seq_len} x "
            f"{accumulation} x {data_parallel} ranks){f', then {ramp}' if ramp else ''}; "
            f"data: {train_tokens:,} train / "
            f"{val_tokens:,} val tokens")


def progress_line(step: int, max_steps: int, loss: float, lr: float, grad_norm: float,
                  tokens_per_second: float, mfu: float | None, eta_seconds: float,
                  aux: dict[str, Any] | None = None, aux_losses: frozenset[str] = frozenset(),
                  batch_tokens: int | None = None) -> str:
    """One greppable line: step/total, loss, lr, grad norm, the step's batch in tokens (given
    under a batch ramp), tokens/s, MFU, ETA; then each scalar term the model's parts reported
    (an aux_row): a loss term summed over its layers, a statistic averaged over them."""
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    width = len(str(max_steps))
    terms = ""
    for name, logged in (aux or {}).items():
        values = logged["values"]
        if values and not isinstance(values[0], list):  # one number per layer
            total = sum(values) if name in aux_losses else sum(values) / len(values)
            terms += f"{name} {total:.4f} | "
    batch = f"batch {batch_tokens:,} tok | " if batch_tokens is not None else ""
    return (f"step {step:>{width}}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {terms}{batch}{tokens_per_second:,.0f} tok/s | "
            f"MFU {mfu_text} | ETA {format_duration(eta_seconds)}")


def train_report(step: int, max_steps: int, loss: float, cross_entropy: float, lr: float,
                 grad_norm: float, tokens: int, tokens_per_second: float, mfu: float | None,
                 eta_seconds: float, aux: dict[str, Any] | None, aux_losses: frozenset[str],
                 batch_tokens: int, ramped: bool = False) -> tuple[dict[str, Any], str]:
    """The metrics.jsonl row and the progress line of an interval of training steps: `tokens`
    trained on so far, `batch_tokens` in the interval's last step (said in the line when the
    batch is `ramped`)."""
    row = {"step": step, "split": "train", "loss": loss, "cross_entropy": cross_entropy,
           "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "batch_tokens": batch_tokens,
           "tokens_per_second": tokens_per_second, "mfu": mfu, "time": time.time()}
    if aux is not None:
        row["aux"] = aux
    return row, progress_line(step, max_steps, loss, lr, grad_norm, tokens_per_second, mfu,
                              eta_seconds, aux, aux_losses, batch_tokens if ramped else None)


def append_sample(path: Path, step: int, text: str) -> None:
    """Add a sample generated at `step` to samples.txt (temperature 0.8, top-k 50, seed 0)."""
    earlier = path.read_text() if path.is_file() else ""
    write_text(path, f"{earlier}--- step {step}, temperature 0.8, top-k 50, seed 0 ---\n"
                     f"{text}\n")


def eval_report(step: int, lr: float, result: dict[str, Any],
                yardstick: dict[str, float]) -> tuple[dict[str, Any], str]:
    """The metrics.jsonl row and the log line of a periodic evaluation."""
    row = {"step": step, "split": "val", "loss": result["loss"], "lr": lr,
           "perplexity": result["perplexity"], "bits_per_byte": result["bits_per_byte"],
           "tokens": result["tokens"], **yardstick, "time": time.time()}
    line = (f"eval step {step} | val loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} "
            f"| {result['bits_per_byte']:.3f} bits/byte (gzip "
            f"{yardstick['gzip_bits_per_byte']:.3f}, xz {yardstick['xz_bits_per_byte']:.3f})")
    return row, line


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train and validation loss against step and, when evaluated, validation bits per byte
    beside gzip's and xz's on the same bytes; a PNG drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    panels = 2 if val else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), dpi=110, squeeze=False)
    _plot_loss(axes[0][0], train, [(r["step"], r["loss"]) for r in val])
    if val:
        _plot_bits_per_byte(axes[0][1], val)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def _plot_loss(axis, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> None:
    if train:
        axis.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        axis.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    finite = [loss for _, loss in train + val if math.isfinite(loss)]
    if finite:  # leave out the first steps' near-uniform losses that would flatten the curve
        low, high = min(finite), sorted(finite)[int(0.98 * (len(finite) - 1))]
        axis.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    axis.grid(alpha=0.3)
    axis.legend()


def _plot_bits_per_byte(axis, val: list[dict[str, Any]]) -> None:
    axis.plot([r["step"] for r in val], [r["bits_per_byte"] for r in val], "o-",
              color="tab:orange", label="model (validation)", linewidth=1.5, markersize=4)
    for key, name, style in (("gzip_bits_per_byte", "gzip -9", "--"),
                             ("xz_bits_per_byte", "xz -9e", ":")):
        if val[-1].get(key):
            axis.axhline(val[-1][key], color="gray", linestyle=style, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("bits per byte (held-out)")
    axis.grid(alpha=0.3)
    axis.legend()


def plot_expert_load(rows: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """How the experts were used over training, from the statistics Switch layers report
    (expert_load, dropped): per sparse layer, each expert's share of the tokens against step
    (a heat map, 1/N is perfect balance), and the fraction dropped. False (nothing drawn)
    where no row has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [r for r in rows if r.get("split") == "train" and "expert_load" in r.get("aux", {})]
    if not logged:
        return False
    layers = logged[-1]["aux"]["expert_load"]["layers"]
    logged = [r for r in logged if r["aux"]["expert_load"]["layers"] == layers]
    steps = [r["step"] for r in logged]
    load = [r["aux"]["expert_load"]["values"] for r in logged]  # (steps, layers, N)
    experts = len(load[-1][0])
    figure, axes = plt.subplots(1, len(layers) + 1, figsize=(3.6 * (len(layers) + 1), 3.8),
                                dpi=110, squeeze=False)
    for column, layer in enumerate(layers):
        axis = axes[0][column]
        # share x N: 1 is an expert with exactly its fair share
        share = [[experts * step_load[column][e] for step_load in load] for e in range(experts)]
        image = axis.imshow(share, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                            vmax=max(2.0, max(max(row) for row in share)),
                            extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5,
                                    experts - 0.5),
                            interpolation="nearest")
        axis.set_title(f"block {layer}: load x N")
        axis.set_xlabel("step")
        axis.set_ylabel("expert")
        figure.colorbar(image, ax=axis)
    axis = axes[0][-1]
    dropped = [r["aux"].get("dropped", {}).get("values") for r in logged]
    if all(values is not None for values in dropped):
        for column, layer in enumerate(layers):
            axis.plot(steps, [100 * values[column] for values in dropped],
                      label=f"block {layer}", linewidth=1.2)
        axis.legend(fontsize=7)
    axis.set_xlabel("step")
    axis.set_ylabel("tokens over capacity (%)")
    axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
    return True


def plot_task_scores(rows: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """loss.png's companion: each task's metrics against step, from the rows of the task
    evaluations (train.eval_tasks). False (nothing drawn) where no row has them."""
    logged = [r for r in rows if r.get("split") == "tasks" and r.get("tasks")]
    if not logged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    curves = sorted({(task, metric) for r in logged for task, metrics in r["tasks"].items()
                     for metric in metrics})
    for task, metric in curves:
        points = [(r["step"], r["tasks"][task][metric]) for r in logged
                  if metric in r["tasks"].get(task, {})]
        axis.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2,
                  label=f"{task} {metric}")
    axis.set_xlabel("step")
    axis.set_ylabel("score")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)
    return True
