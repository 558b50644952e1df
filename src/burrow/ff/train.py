"""Training Forward-Forward nets and their backprop baseline on MNIST, and measuring them.

All layers learn together on each batch (simultaneously, not greedily one layer after another):
one forward pass through the stack with positive and negative data side by side, each layer's
loss on its own detached input, one optimiser per layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from burrow.errors import UserError
from burrow.ff.data import (
    Mnist,
    hybrid_images,
    with_label,
    with_neutral_label,
    wrong_labels,
)
from burrow.ff.net import BackpropNet, FFNet, goodness

MODES = ("supervised", "unsupervised", "backprop")


@dataclass
class FFConfig:
    """A Forward-Forward (or baseline) run on MNIST."""

    mode: str = "supervised"  # supervised (§3.3), unsupervised (§3.2) or backprop (§3.1)
    layers: list[int] = field(default_factory=lambda: [2000] * 4)  # §3.2, §3.3: 4 x 2,000 ReLUs
    epochs: int = 60  # §3.3: 60 epochs for the supervised net's 1.36% test error
    batch_size: int = 100  # positive examples per batch (as many negatives beside them)
    lr: float = 1e-3  # Adam, each hidden layer (and the baseline)
    readout_lr: float = 1e-3  # Adam, the linear read-out
    threshold: float | None = None  # theta of sigmoid(G - theta); None: each layer's width
    seed: int = 0
    device: str = "cpu"
    train_limit: int | None = None  # train on the first N training images only

    def validate(self) -> FFConfig:
        """self, or UserError naming the fix."""
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.layers:
            raise UserError("the layer list is empty; give widths like --layers 2000,2000")
        if any(width < 1 for width in self.layers):
            raise UserError(f"layer widths must be positive, not {self.layers}; give widths "
                            "like --layers 2000,2000")
        for name in ("lr", "readout_lr", "threshold"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name} must be > 0, not {value}; give a positive value")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch size must be at least 1")
        return self

    def thresholds(self) -> list[float]:
        """theta for each layer: the one given, else the layer's width, so that a layer calls an
        example positive when its mean squared activity passes 1 (as in the reproduction of
        loeweX/Forward-Forward; the paper leaves theta open)."""
        return [float(self.threshold or width) for width in self.layers]


@dataclass
class EpochLog:
    """What one epoch measured: per layer the mean loss and mean goodness of positive and
    negative training data (for the baseline: the one cross-entropy)."""

    epoch: int
    losses: list[float]
    good_pos: list[float]
    good_neg: list[float]
    seconds: float


def _batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(size))


def negatives(cfg: FFConfig, images: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) inputs for a batch: real images with their true label and with a wrong
    one (§3.3), or real images and hybrids of two digits (§3.2)."""
    if cfg.mode == "supervised":
        return (with_label(images, labels),
                with_label(images, wrong_labels(labels, generator).to(labels.device)))
    return images, hybrid_images(images, generator)


def build(cfg: FFConfig, in_features: int) -> nn.Module:
    """The network a config describes (FFNet, or BackpropNet for the baseline)."""
    if cfg.mode == "backprop":
        return BackpropNet(in_features, cfg.layers)
    # §3.3: all hidden layers but the first; §3.2: the last three
    start = (1 if len(cfg.layers) > 1 else 0) if cfg.mode == "supervised" \
        else max(0, len(cfg.layers) - 3)
    return FFNet(in_features, cfg.layers, readout_from=start)


def train(cfg: FFConfig, data: Mnist, log: Callable[[EpochLog], None] | None = None
          ) -> tuple[nn.Module, list[EpochLog]]:
    """Train the network of `cfg` on data.train; `log` is called after each epoch."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    split = data.train.head(cfg.train_limit)
    images, labels = split.images.to(cfg.device), split.labels.to(cfg.device)
    net = build(cfg, images.shape[1]).to(cfg.device)
    step = _backprop_step(cfg, net) if cfg.mode == "backprop" else _ff_step(cfg, net, generator)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        sums: list[list[float]] | None = None
        batches = _batches(len(images), cfg.batch_size, generator)
        for index in batches:
            index = index.to(cfg.device)
            values = step(images[index], labels[index])
            sums = values if sums is None else [[a + b for a, b in zip(s, v)]
                                                for s, v in zip(sums, values)]
        assert sums is not None
        means = [[value / len(batches) for value in column] for column in sums]
        entry = EpochLog(epoch, *means, seconds=time.perf_counter() - start)
        history.append(entry)
        if log:
            log(entry)
    return net, history


def _ff_step(cfg: FFConfig, net: FFNet, generator: torch.Generator):
    """One batch of FF learning: every layer's loss on the same positive and negative data, each
    minimised by its own optimiser; the read-out learns beside them from neutral-label (or
    plain) images (§3.3, §3.2)."""
    optimisers = [torch.optim.Adam(layer.parameters(), lr=cfg.lr) for layer in net.layers]
    readout_opt = torch.optim.Adam(net.readout.parameters(), lr=cfg.readout_lr)
    thresholds = cfg.thresholds()

    def step(images: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
        pos, neg = negatives(cfg, images, labels, generator)
        x = torch.cat([pos, neg])
        positive = torch.arange(len(x), device=x.device) < len(pos)
        losses, goods = net.layer_losses(x, positive, thresholds)
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        # the sum's gradient is each loss's own: the inputs are detached, no term reaches
        # another layer's weights, so one backward serves all layers
        torch.stack(losses).sum().backward()
        for optimiser in optimisers:
            optimiser.step()
        readout_in = with_neutral_label(images) if cfg.mode == "supervised" else images
        readout_loss = nn.functional.cross_entropy(net.readout(net.features(readout_in)), labels)
        readout_opt.zero_grad(set_to_none=True)
        readout_loss.backward()
        readout_opt.step()
        return [[loss.item() for loss in losses],
                [g[positive].mean().item() for g in goods],
                [g[~positive].mean().item() for g in goods]]

    return step


def _backprop_step(cfg: FFConfig, net: BackpropNet):
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(images: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
        loss = nn.functional.cross_entropy(net(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return [[loss.item()], [], []]

    return step


@torch.no_grad()
def evaluate(cfg: FFConfig, net: nn.Module, data: Mnist, batch: int = 1000
                ) -> dict[str, float]:
    """Error rates on data.test: `test_error` is the paper's measure for the mode (the largest
    goodness over the 10 labels for supervised FF, §3.3; the linear read-out for unsupervised FF,
    §3.2; the softmax head for the baseline), with the read-out's beside it for supervised FF."""
    net.eval()
    images, labels = data.test.images.to(cfg.device), data.test.labels.to(cfg.device)
    wrong = {"goodness": 0, "readout": 0}
    for start in range(0, len(images), batch):
        x, y = images[start:start + batch], labels[start:start + batch]
        if cfg.mode == "backprop":
            wrong["readout"] += int((net(x).argmax(-1) != y).sum())
            continue
        if cfg.mode == "supervised":
            wrong["goodness"] += int((net.predict_by_goodness(x) != y).sum())
        neutral = cfg.mode == "supervised"
        wrong["readout"] += int((net.predict_by_readout(x, neutral=neutral) != y).sum())
    n = len(images)
    if cfg.mode == "supervised":
        return {"test_error": wrong["goodness"] / n, "test_error_readout": wrong["readout"] / n}
    return {"test_error": wrong["readout"] / n}


@torch.no_grad()
def goodness_samples(cfg: FFConfig, net: FFNet, data: Mnist, n: int = 2000
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the goodness of n positive and n negative test examples (for the plot)."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    split = data.test.head(n)
    pos, neg = negatives(cfg, split.images.to(cfg.device), split.labels.to(cfg.device),
                         generator)
    return ([goodness(h).cpu() for h in net.activities(pos)],
            [goodness(h).cpu() for h in net.activities(neg)])


def describe(cfg: FFConfig) -> dict:
    """The config as plain JSON values."""
    return dataclasses.asdict(cfg)

