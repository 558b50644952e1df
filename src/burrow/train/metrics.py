"""What a run tells its user: the progress line, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import math
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


def router_row(table: Any, layers: list[int]) -> dict[str, Any]:
    """The sparse layers' stats (a (layers, 3 + N) table, model/moe.py) as metrics.jsonl keeps
    them: per layer the balance loss, z-loss, fraction dropped and each expert's share."""
    rows = table.tolist()
    return {"layers": layers,
            "balance_loss": [row[0] for row in rows],
            "z_loss": [row[1] for row in rows],
            "dropped": [row[2] for row in rows],
            "load": [row[3:] for row in rows]}


def progress_line(step: int, max_steps: int, loss: float, lr: float, grad_norm: float,
                  tokens_per_second: float, mfu: float | None, eta_seconds: float,
                  router: dict[str, Any] | None = None) -> str:
    """One greppable line: step/total, loss, lr, grad norm, tokens/s, MFU, ETA; for a sparse
    model also the routers' losses (summed over layers) and the fraction of tokens dropped."""
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    width = len(str(max_steps))
    moe = ""
    if router is not None:
        dropped = sum(router["dropped"]) / len(router["dropped"])
        moe = (f"aux {sum(router['balance_loss']):.4f} | z {sum(router['z_loss']):.4f} | "
               f"drop {100 * dropped:.1f}% | ")
    return (f"step {step:>{width}}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {moe}{tokens_per_second:,.0f} tok/s | MFU {mfu_text} | "
            f"ETA {format_duration(eta_seconds)}")


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


def plot_router(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """How the experts were used over training: per sparse layer, each expert's share of the
    tokens against step (a heat map, 1/N is perfect balance), and the fraction dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [r for r in rows if r.get("split") == "train" and "moe" in r]
    if not logged:
        return
    layers = logged[-1]["moe"]["layers"]
    steps = [r["step"] for r in logged]
    experts = len(logged[-1]["moe"]["load"][0])
    figure, axes = plt.subplots(1, len(layers) + 1, figsize=(3.6 * (len(layers) + 1), 3.8),
                                dpi=110, squeeze=False)
    for column, layer in enumerate(layers):
        axis = axes[0][column]
        # share x N: 1 is an expert with exactly its fair share
        share = [[experts * r["moe"]["load"][column][e] for r in logged] for e in range(experts)]
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
    for column, layer in enumerate(layers):
        axis.plot(steps, [100 * r["moe"]["dropped"][column] for r in logged],
                  label=f"block {layer}", linewidth=1.2)
    axis.set_xlabel("step")
    axis.set_ylabel("tokens over capacity (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
