"""The parity comparison's two pictures: held-out accuracy against training steps for each model,
and AdaTape's tape length against the difficulty of each held-out input."""

from __future__ import annotations

from pathlib import Path

import torch

LABELS = {"adatape": "AdaTape", "transformer": "Transformer",
          "universal_transformer": "Universal Transformer"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    """Held-out accuracy against step, one line per model, chance marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, history in histories.items():
        ax.plot([entry["step"] for entry in history],
                [100 * entry["accuracy"] for entry in history], marker=".",
                label=LABELS.get(name, name))
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--", label="chance")
    # the whole range from below chance to 100%, so that noise around chance looks like it
    lowest = min((100 * entry["accuracy"] for history in histories.values()
                  for entry in history), default=50)
    ax.set_ylim(min(40, lowest - 5), 100)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tape_lengths(tape_lengths: torch.Tensor, difficulties: dict[str, torch.Tensor],
                      path: Path) -> None:
    """One panel per difficulty measure (e.g. the number of +1s, of non-zeros): how many
    held-out inputs had each (difficulty, tape length), as a 2-D histogram, with the mean
    tape length at each difficulty drawn over it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(difficulties), figsize=(4.6 * len(difficulties), 3.6),
                             squeeze=False)
    lengths = tape_lengths.long()
    for ax, (measure, values) in zip(axes[0], difficulties.items()):
        values = values.long()
        x_edges = torch.arange(int(values.min()), int(values.max()) + 2) - 0.5
        y_edges = torch.arange(int(lengths.min()), int(lengths.max()) + 2) - 0.5
        *_, image = ax.hist2d(values.numpy(), lengths.numpy(),
                                        bins=[x_edges.numpy(), y_edges.numpy()], cmin=1,
                                        cmap="viridis")
        levels = values.unique()
        means = [float(lengths[values == level].float().mean()) for level in levels]
        ax.plot(levels.numpy(), means, color="red", linewidth=1.2, label="mean")
        ax.set_xlabel(measure)
        ax.set_ylabel("tape length")
        ax.legend(fontsize=8)
        fig.colorbar(image, ax=ax, label="inputs")
    fig.suptitle("AdaTape's tape length on held-out parity inputs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
