"""The Forward-Forward network (Hinton 2022): layers that each learn alone, from a goodness of their
own activities, with nothing propagated backwards between them.

Section numbers are the paper's ("The Forward-Forward Algorithm: Some Preliminary
Investigations", arXiv:2212.13345).
"""

from __future__ import annotations

import torch
from torch import nn

from burrow.ff.data import CLASSES, with_label, with_neutral_label


def goodness(h: torch.Tensor) -> torch.Tensor:
    """G = sum of the squared activities of a layer, one value per example (§2). (B, H) -> (B,)"""
    return h.pow(2).sum(dim=-1)


def ff_loss(g: torch.Tensor, positive: torch.Tensor, threshold: float) -> torch.Tensor:
    """The layer's local loss: the logistic loss of p(positive) = sigmoid(G - theta) (§2), the mean
    over the batch of -log p for positive and -log(1 - p) for negative examples. softplus keeps it
    exact where G - theta is far from 0, which it is for wide layers."""
    logits = g - threshold
    return torch.where(positive, nn.functional.softplus(-logits),
                       nn.functional.softplus(logits)).mean()


def normalise(h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The activity vector scaled to a fixed length, sqrt(H) (unit root mean square), so that only
    its orientation reaches the next layer (§2.1): the goodness of one layer cannot be read off
    by the next from the length alone. The length sqrt(H) rather than 1 keeps each input of the
    next layer near 1 whatever the width."""
    return h / (h.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)


class FFLayer(nn.Module):
    """One fully connected layer of ReLUs trained by its own loss. Its input is detached, so no
    gradient of this layer's loss reaches an earlier layer: learning is local (§2)."""

    def __init__(self, in_features: int, out_features: int, normalise_input: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.normalise_input = normalise_input  # every layer but the first sees a normalised vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.normalise_input:
            x = normalise(x)
        return torch.relu(self.linear(x))


class FFNet(nn.Module):
    """A stack of FF layers and a linear softmax read-out of normalised activities (§3.2, §3.3).

    `readout_from` is the first hidden layer the read-out sees: 1 in the supervised setting (all
    hidden layers but the first, §3.3), the last three in the unsupervised one (§3.2).
    """

    def __init__(self, in_features: int, widths: list[int], readout_from: int):
        super().__init__()
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(FFLayer(sizes[i], sizes[i + 1], normalise_input=i > 0)
                                    for i in range(len(widths)))
        self.readout_from = readout_from
        self.readout = nn.Linear(sum(widths[readout_from:]), CLASSES)

    def activities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activities of every hidden layer (before normalisation), one pass up."""
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the read-out sees: the normalised activities of the layers from `readout_from`,
        detached so that training the read-out changes no hidden layer."""
        acts = self.activities(x)[self.readout_from:]
        return torch.cat([normalise(h) for h in acts], dim=-1).detach()

    def layer_losses(self, x: torch.Tensor, positive: torch.Tensor,
                     thresholds: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's FF loss and goodness on a batch of positive and negative examples."""
        losses, goods = [], []
        for h, theta in zip(self.activities(x), thresholds):
            g = goodness(h)
            losses.append(ff_loss(g, positive, theta))
            goods.append(g.detach())
        return losses, goods

    @torch.no_grad()
    def label_goodness(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10): for each label, the goodness summed over the hidden layers but the first when
        the image carries that label (§3.3: the first layer's goodness is left out)."""
        scores = []
        for label in range(CLASSES):
            labels = torch.full((images.shape[0],), label, dtype=torch.long,
                                device=images.device)
            acts = self.activities(with_label(images, labels))
            skip = 1 if len(acts) > 1 else 0
            scores.append(sum(goodness(h) for h in acts[skip:]))
        return torch.stack(scores, dim=-1)

    @torch.no_grad()
    def predict_by_goodness(self, images: torch.Tensor) -> torch.Tensor:
        """The label whose goodness is largest: 10 passes per image (§3.3)."""
        return self.label_goodness(images).argmax(dim=-1)

    @torch.no_grad()
    def predict_by_readout(self, images: torch.Tensor, neutral: bool = True) -> torch.Tensor:
        """One pass, with the neutral label when `neutral` (supervised nets), then the linear
        softmax read-out of normalised activities (§3.3; §3.2 for unsupervised nets)."""
        x = with_neutral_label(images) if neutral else images
        return self.readout(self.features(x)).argmax(dim=-1)


class BackpropNet(nn.Module):
    """The baseline (§3.1): the same hidden layers of ReLUs and a softmax head, trained end to end
    with backpropagation of the cross-entropy."""

    def __init__(self, in_features: int, widths: list[int]):
        super().__init__()
        sizes = [in_features, *widths]
        hidden: list[nn.Module] = []
        for i in range(len(widths)):
            hidden += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        self.hidden = nn.Sequential(*hidden)
        self.head = nn.Linear(widths[-1], CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10)."""
        return self.head(self.hidden(images))
