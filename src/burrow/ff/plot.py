"""The goodness of positive and negative data, one panel per layer: how far apart each layer
pushes them, and where the threshold lies."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_goodness(positive: list[torch.Tensor], negative: list[torch.Tensor],
                  thresholds: list[float], path: Path) -> None:
    """Histograms of goodness per layer (positive and negative data overlaid) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(positive), figsize=(3.2 * len(positive), 2.8), squeeze=False)
    for index, (ax, pos, neg, theta) in enumerate(zip(axes[0], positive, negative, thresholds)):
        high = float(torch.quantile(torch.cat([pos, neg]), 0.99)) or 1.0
        bins = torch.linspace(0, high, 50).tolist()
        ax.hist(pos.clamp(max=high).numpy(), bins=bins, alpha=0.6, label="positive")
        ax.hist(neg.clamp(max=high).numpy(), bins=bins, alpha=0.6, label="negative")
        ax.axvline(theta, color="black", linewidth=0.8, linestyle="--", label="threshold")
        ax.set_title(f"layer {index + 1}")
        ax.set_xlabel("goodness (sum of squares)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
