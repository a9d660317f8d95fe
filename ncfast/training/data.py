"""Training data in memory: the embedded digits, Gaussian inputs, MNIST and CIFAR from their
standard files (:func:`load_dataset`).

The embedded scikit-learn "digits" (default, no download), Gaussian inputs with random or true
labels (Wang, Liu, Yaras, Balzano, Qu 2022, "Linear Convergence Analysis of Neural Collapse with
Unconstrained Features", §3; Zhu et al., NeurIPS 2021, "A Geometric Analysis of Neural Collapse
with Unconstrained Features", Fig. 5), and MNIST / CIFAR-10 / CIFAR-100 read from their standard
files in a user-given folder; nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .readers import read_cifar_batch, read_idx

DATASETS = ("digits", "gaussian", "mnist", "cifar10", "cifar100")
GAUSSIAN_LABELS = ("random", "true")
FLAT_DATASETS = ("digits", "gaussian")  # vectors; the others are images (C, H, W)
_DATA_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@dataclass
class Dataset:
    """Tensors in memory: x (N, ...) float32, y (N,) int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) - int(round(test_fraction * len(y)))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _load_digits(seed: int):
    """The embedded UCI digits (ncfast/data/README): 1797 8×8 images, pixel values 0..16."""
    with np.load(os.path.join(_DATA_FOLDER, "digits.npz")) as data:
        x = torch.from_numpy(data["images"].astype(np.float32) / 16.0).reshape(-1, 64)
        y = torch.from_numpy(data["labels"].astype(np.int64))
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # features of constant pixels stay 0
    return _split(x, y, 0.2, seed) + (10,)


def _gaussian(num_classes: int, per_class: int, dim: int, labels: str, seed: int):
    """Wang et al. (2022) §3: x ~ N(0, I/4) in R^D, balanced labels. ``labels="random"`` draws
    them independently of x (memorisation, Zhu et al. 2021, Fig. 5); ``"true"`` shifts each class by its own
    mean ~ N(0, I/D) so the labels are learnable. The test set is drawn the same way."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim) * 4.0

    def draw(count):
        y = torch.arange(num_classes).repeat(count)[torch.randperm(num_classes * count, generator=gen)]
        x = 0.5 * torch.randn(len(y), dim, generator=gen)
        return (x + means[y], y) if labels == "true" else (x, y)

    return draw(per_class) + draw(max(per_class // 4, 1)) + (num_classes,)


def _find(data_dir: str, names, compressed: bool = True) -> str:
    for name in names:
        suffixes = ("", ".gz") if compressed else ("",)
        for candidate in (os.path.join(data_dir, name + suffix) for suffix in suffixes):
            if os.path.exists(candidate):
                return candidate
    raise ValueError(f"data_dir: none of {list(names)}{' (or .gz)' if compressed else ''} found in {data_dir!r}")


def _load_mnist(data_dir: str):
    """MNIST from its IDX files (train-images-idx3-ubyte, … as distributed, .gz or not),
    searched in ``data_dir`` and ``data_dir/MNIST/raw`` (torchvision's layout)."""
    roots = [data_dir, os.path.join(data_dir, "MNIST", "raw")]
    root = next((r for r in roots if os.path.isdir(r) and any(f.startswith("train-images") for f in os.listdir(r))),
                data_dir)
    splits = []
    for prefix in ("train", "t10k"):
        images_path, labels_path = (_find(root, [f"{prefix}-{kind}"]) for kind in ("images-idx3-ubyte",
                                                                                    "labels-idx1-ubyte"))
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise ValueError(f"data_dir: {images_path} holds {len(images)} images but {labels_path} "
                             f"{len(labels)} labels")
        if labels.max() >= 10:
            raise ValueError(f"{labels_path}: label {labels.max()} outside the 10 MNIST classes")
        splits.append((torch.from_numpy(images.astype(np.float32) / 255.0)[:, None],
                       torch.from_numpy(labels.astype(np.int64))))
    (x_train, y_train), (x_test, y_test) = splits
    mean, std = 0.1307, 0.3081
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, 10


def _load_cifar(data_dir: str, classes: int):
    """CIFAR-10/100 from the python pickles (cifar-10-batches-py/, cifar-100-python/), read
    without executing code (:func:`ncfast.training.readers.read_cifar_batch`)."""
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    root = os.path.join(data_dir, folder) if os.path.isdir(os.path.join(data_dir, folder)) else data_dir
    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if classes == 10 else (["train"], ["test"])
    key = b"labels" if classes == 10 else b"fine_labels"

    def read(files):
        batches = [read_cifar_batch(_find(root, [name], compressed=False), key, classes) for name in files]
        x = torch.from_numpy(np.concatenate([images for images, _ in batches]).astype(np.float32) / 255.0)
        return x, torch.from_numpy(np.concatenate([labels for _, labels in batches]))

    x_train, y_train = read(names[0])
    x_test, y_test = read(names[1])
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, classes


def load_dataset(name: str = "digits", data_dir: Optional[str] = None, seed: int = 0, random_labels: bool = False,
                 train_size: Optional[int] = None, gaussian_dim: int = 1000, gaussian_classes: int = 10,
                 gaussian_per_class: int = 100, gaussian_labels: str = "random") -> Dataset:
    """Load a dataset into memory.

    Args:
        name: "digits" (embedded), "gaussian", "mnist", "cifar10" or "cifar100".
        data_dir: folder with the standard files (MNIST, CIFAR); nothing is downloaded.
        seed: seeds the digits train/test split, Gaussian draws and random labels.
        random_labels: replace the training labels by uniformly random ones (Zhu et al.
            2021, Fig. 5).
        train_size: keep only the first ``train_size`` training samples (a subset for quick runs).
        gaussian_*: D, K, n and "random" | "true" labels for ``name="gaussian"`` (Wang et al.
            2022, §3).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
    if name in ("mnist", "cifar10", "cifar100"):
        if not data_dir or not os.path.isdir(data_dir):
            raise ValueError(f"data_dir: {name} is read from its standard files; give an existing folder "
                             f"(got {data_dir!r}); nothing is downloaded")
    if name == "digits":
        parts = _load_digits(seed)
    elif name == "gaussian":
        if gaussian_labels not in GAUSSIAN_LABELS:
            raise ValueError(f"gaussian_labels: expected one of {GAUSSIAN_LABELS}, got {gaussian_labels!r}")
        parts = _gaussian(gaussian_classes, gaussian_per_class, gaussian_dim, gaussian_labels, seed)
    elif name == "mnist":
        parts = _load_mnist(data_dir)
    else:
        parts = _load_cifar(data_dir, 10 if name == "cifar10" else 100)
    x_train, y_train, x_test, y_test, classes = parts
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    if random_labels:
        y_train = torch.randint(classes, y_train.shape, generator=torch.Generator().manual_seed(seed + 1))
    return Dataset(name, x_train.contiguous(), y_train, x_test.contiguous(), y_test, classes)
