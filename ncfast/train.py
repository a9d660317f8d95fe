"""A network trainer that tracks neural collapse (SPEC §6): the seeds' experiments as a tool.

Models (an MLP and the CIFAR variant of ResNet18, with a width multiplier and a feature
dimension d), any ncfast loss, an optional fixed simplex-ETF classifier, SGD / Adam / L-BFGS
with the seeds' schedules and gradient-norm clipping; after every epoch NC1–NC4 of the training
set from :class:`ncfast.NCStats` on the penultimate features, train and test accuracy, logged
to CSV + JSON with PNG curves. Under ``torchrun`` it trains data-parallel (DDP; gloo on CPU,
NCCL on CUDA) and all-reduces the NC statistics, so the metrics are those of the whole set.

Data (:func:`load_dataset`): the embedded scikit-learn "digits" (default, no download),
Gaussian inputs with random or true labels (seed 004 §3, seed 003 Fig. 5), and MNIST /
CIFAR-10 / CIFAR-100 read from their standard files in a user-given folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .geometry import ETFClassifier
from .losses import cross_entropy, focal_loss, rescaled_mse
from .ncstats import NCStats
from .progress import Progress

DATASETS = ("digits", "gaussian", "mnist", "cifar10", "cifar100")
MODELS = ("mlp", "resnet18")
LOSSES = ("ce", "focal", "ls", "mse")
OPTIMIZERS = ("sgd", "adam", "lbfgs")
SCHEDULES = ("constant", "step", "multistep", "cosine")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
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
    with np.load(os.path.join(os.path.dirname(__file__), "data", "digits.npz")) as data:
        x = torch.from_numpy(data["images"].astype(np.float32) / 16.0).reshape(-1, 64)
        y = torch.from_numpy(data["labels"].astype(np.int64))
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # features of constant pixels stay 0
    return _split(x, y, 0.2, seed) + (10,)


def _gaussian(num_classes: int, per_class: int, dim: int, labels: str, seed: int):
    """Seed 004 §3: x ~ N(0, I/4) in R^D, balanced labels. ``labels="random"`` draws them
    independently of x (memorisation, seed 003 Fig. 5); ``"true"`` shifts each class by its own
    mean ~ N(0, I/D) so the labels are learnable. The test set is drawn the same way."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim) * 4.0

    def draw(count):
        y = torch.arange(num_classes).repeat(count)[torch.randperm(num_classes * count, generator=gen)]
        x = 0.5 * torch.randn(len(y), dim, generator=gen)
        return (x + means[y], y) if labels == "true" else (x, y)

    return draw(per_class) + draw(max(per_class // 4, 1)) + (num_classes,)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(data_dir: str, names) -> str:
    for name in names:
        for candidate in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
            if os.path.exists(candidate):
                return candidate
    raise ValueError(f"data_dir: none of {list(names)} (or .gz) found in {data_dir!r}")


def _load_mnist(data_dir: str):
    """MNIST from its IDX files (train-images-idx3-ubyte, … as distributed, .gz or not),
    searched in ``data_dir`` and ``data_dir/MNIST/raw`` (torchvision's layout)."""
    roots = [data_dir, os.path.join(data_dir, "MNIST", "raw")]
    root = next((r for r in roots if os.path.isdir(r) and any(f.startswith("train-images") for f in os.listdir(r))),
                data_dir)
    parts = [_read_idx(_find(root, [name])) for name in
             ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    x_train, x_test = (torch.from_numpy(p.astype(np.float32) / 255.0)[:, None] for p in (parts[0], parts[2]))
    mean, std = 0.1307, 0.3081
    return ((x_train - mean) / std, torch.from_numpy(parts[1].astype(np.int64)),
            (x_test - mean) / std, torch.from_numpy(parts[3].astype(np.int64)), 10)


def _load_cifar(data_dir: str, classes: int):
    """CIFAR-10/100 from the python pickles (cifar-10-batches-py/, cifar-100-python/)."""
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    root = os.path.join(data_dir, folder) if os.path.isdir(os.path.join(data_dir, folder)) else data_dir
    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if classes == 10 else (["train"], ["test"])
    key = b"labels" if classes == 10 else b"fine_labels"

    def read(files):
        xs, ys = [], []
        for name in files:
            with open(_find(root, [name]), "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], np.int64))
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return x, torch.from_numpy(np.concatenate(ys))

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
        random_labels: replace the training labels by uniformly random ones (seed 003 Fig. 5).
        train_size: keep only the first ``train_size`` training samples (a subset for quick runs).
        gaussian_*: D, K, n and "random" | "true" labels for ``name="gaussian"`` (seed 004 §3).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name in ("mnist", "cifar10", "cifar100"):
        if not data_dir or not os.path.isdir(data_dir):
            raise ValueError(f"data_dir: {name} is read from its standard files; give an existing folder "
                             f"(got {data_dir!r}); nothing is downloaded")
    if name == "digits":
        parts = _load_digits(seed)
    elif name == "gaussian":
        if gaussian_labels not in ("random", "true"):
            raise ValueError(f"gaussian_labels must be 'random' or 'true', got {gaussian_labels!r}")
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


# --------------------------------------------------------------------------------------------
# models: features(x) -> (N, d) penultimate features; classifier: Linear or ETFClassifier
# --------------------------------------------------------------------------------------------
def _classifier(dim: int, num_classes: int, fixed_etf: bool, bias: bool) -> nn.Module:
    return ETFClassifier(dim, num_classes, bias=bias) if fixed_etf else nn.Linear(dim, num_classes, bias=bias)


class MLP(nn.Module):
    """Flatten -> [Linear(width) -> BatchNorm -> ReLU] × depth -> Linear(d) -> ReLU -> classifier.

    ``features`` are the d-dimensional post-ReLU activations (seed 003's penultimate layer)."""

    def __init__(self, in_features: int, num_classes: int, feature_dim: int = 64, width: int = 256,
                 depth: int = 2, fixed_etf: bool = False, bias: bool = True, batch_norm: bool = True):
        super().__init__()
        layers, size = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width)] + ([nn.BatchNorm1d(width)] if batch_norm else []) + [nn.ReLU()]
            size = width
        layers += [nn.Linear(size, feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.classifier = _classifier(feature_dim, num_classes, fixed_etf, bias)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18, CIFAR variant (3×3 stem, no max-pool; He et al. 2016 §4.2 layout with
    [2, 2, 2, 2] basic blocks), channels 64·w, 128·w, 256·w, 512·w for width multiplier w.
    Global average pooling gives 512·w features; with ``feature_dim`` set, a Linear + ReLU
    maps them to d (seed 003 uses d = K)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 feature_dim: Optional[int] = None, fixed_etf: bool = False, bias: bool = True):
        super().__init__()
        channels = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, size = [], channels[0]
        for index, c in enumerate(channels):
            for block in range(2):
                blocks.append(_BasicBlock(size, c, 2 if (block == 0 and index > 0) else 1))
                size = c
        self.blocks = nn.Sequential(*blocks)
        self.head = (nn.Sequential(nn.Linear(size, feature_dim), nn.ReLU())
                     if feature_dim else nn.Identity())
        self.classifier = _classifier(feature_dim or size, num_classes, fixed_etf, bias)

    def features(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_model(name: str, input_shape: tuple, num_classes: int, feature_dim: Optional[int] = None,
                width: float = 1.0, depth: int = 2, fixed_etf: bool = False, bias: bool = True,
                batch_norm: bool = True) -> nn.Module:
    """"mlp" (hidden width 256·w, ``depth`` hidden layers, d default 64) or "resnet18" (inputs
    (C, H, W); MLP-shaped inputs are rejected)."""
    if name == "mlp":
        return MLP(int(np.prod(input_shape)), num_classes, feature_dim or 64, max(1, int(round(256 * width))),
                   depth, fixed_etf, bias, batch_norm)
    if name == "resnet18":
        if len(input_shape) != 3:
            raise ValueError(f"model: resnet18 needs image inputs (C, H, W), the data has shape {input_shape}")
        return ResNet18(num_classes, input_shape[0], width, feature_dim, fixed_etf, bias)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# losses, optimisers, schedules
# --------------------------------------------------------------------------------------------
def make_loss(name: str, label_smoothing: Optional[float] = None, gamma: Optional[float] = None,
              kappa: Optional[float] = None, beta: Optional[float] = None):
    """(logits, target) -> mean loss. Defaults are seed 002 §4's: ls α = 0.1, focal γ = 3,
    mse κ = 1, β = 15 (pass κ = β = 1 for vanilla MSE)."""
    if name == "ce":
        return lambda z, y: cross_entropy(z, y, label_smoothing=label_smoothing or 0.0)
    if name == "ls":
        alpha = 0.1 if label_smoothing is None else label_smoothing
        return lambda z, y: cross_entropy(z, y, label_smoothing=alpha)
    if name == "focal":
        g = 3.0 if gamma is None else gamma
        return lambda z, y: focal_loss(z, y, gamma=g)
    if name == "mse":
        k, b = (1.0 if kappa is None else kappa), (15.0 if beta is None else beta)
        return lambda z, y: rescaled_mse(z, y, kappa=k, beta=b)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def lr_factor(schedule: str, epoch: int, epochs: int, step_size: int = 40) -> float:
    """Learning-rate multiplier at ``epoch`` (0-based): "step" ÷10 every ``step_size`` epochs
    (seed 003 §4), "multistep" ×0.1 at 3/7 and 5/7 of training (seed 002 §4), "cosine", "constant"."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** (epoch // step_size)
    if schedule == "multistep":
        return 0.1 ** sum(epoch >= m for m in (int(epochs * 3 / 7), int(epochs * 5 / 7)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run needs; the defaults train the demo's MLP on digits."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    random_labels: bool = False
    train_size: Optional[int] = None
    gaussian_dim: int = 1000
    gaussian_classes: int = 10
    gaussian_per_class: int = 100
    gaussian_labels: str = "random"
    model: str = "mlp"
    width: float = 1.0
    depth: int = 2
    batch_norm: bool = True
    feature_dim: Optional[int] = None
    fixed_etf: bool = False
    bias: bool = True
    loss: str = "ce"
    label_smoothing: Optional[float] = None
    gamma: Optional[float] = None
    kappa: Optional[float] = None
    beta: Optional[float] = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    step_size: int = 40
    epochs: int = 200
    batch_size: int = 128
    clip_grad_norm: Optional[float] = None
    seed: int = 0
    second_pass: bool = False
    threads: Optional[int] = None
    device: Optional[str] = None  # "cpu", "cuda", "cuda:1"; default: cuda:LOCAL_RANK when available, else cpu
    out: Optional[str] = None
    quiet: bool = False
    stop_at: Optional[float] = None  # stop once NC1 ≤ this and train accuracy is 100%


@dataclass
class TrainResult:
    config: TrainConfig
    history: list = field(default_factory=list)  # one dict per epoch
    model: Optional[nn.Module] = None
    trainable_parameters: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 512,
             nc: bool = True, second_pass: bool = False) -> dict:
    """Accuracy and (``nc=True``) NC metrics of ``model`` on (x, y), in eval mode.

    Under torch.distributed each rank takes the samples ``rank::world`` and the NC statistics
    and counts are all-reduced, so every rank gets the metrics of the whole set."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    rank, world = _world()
    device = net.classifier.weight.device
    x, y = x[rank::world], y[rank::world]
    classifier = net.classifier

    def batches():  # (features, target) per batch, on the model's device
        for start in range(0, len(y), batch_size):
            xb = x[start: start + batch_size].to(device, non_blocking=True)
            yield net.features(xb), y[start: start + batch_size].to(device, non_blocking=True)

    stats = NCStats(num_classes, classifier.weight.shape[1], device=device) if nc else None
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for features, target in batches():
        correct[0] += (classifier(features).argmax(1) == target).sum()
        correct[1] += len(target)
        if nc:
            stats.update(features, target)
    if world > 1:
        dist.all_reduce(correct)
        if nc:
            stats.all_reduce()
    result = {"accuracy": float(correct[0] / correct[1])}
    if nc:
        weight = classifier.weight.detach()
        bias = None if classifier.bias is None else classifier.bias.detach()
        extra = None
        if second_pass:  # the metrics that need the finished class means: the data again
            extra = stats.second_pass(weight, bias)
            for features, target in batches():
                extra.update(features, target)
            if world > 1:
                extra.all_reduce()
        metrics = stats.compute(weight, bias, second_pass=extra)
        result.update({key: value for key, value in metrics.as_dict().items()
                       if isinstance(value, float) and key not in ("num_samples",)})
    net.train(was_training)
    return result


def _optimizer(config: TrainConfig, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "lbfgs":  # weight decay goes into the closure's loss (LBFGS has none)
        return torch.optim.LBFGS(params, lr=config.lr, history_size=20, max_iter=5, line_search_fn="strong_wolfe")
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def _check_config(config: TrainConfig) -> None:
    for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("loss", LOSSES), ("optimizer", OPTIMIZERS),
                          ("schedule", SCHEDULES)):
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for torch's default), got {config.threads}")


def train(config: TrainConfig, dataset: Optional[Dataset] = None, model: Optional[nn.Module] = None) -> TrainResult:
    """Train per ``config``; returns the per-epoch history (epoch, lr, loss, train/test accuracy,
    NC1–NC4 and the other :class:`ncfast.NCMetrics` values, seconds) and the model.

    Under torch.distributed (e.g. ``torchrun``) the model is wrapped in DDP and every global
    batch (same seeded order on every rank) is split ``rank::world``: with a batch size divisible
    by the world size the averaged gradient is the one-process gradient. Rank 0 alone writes
    ``out`` and prints."""
    _check_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rank, world = _world()
    torch.manual_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, config.seed, config.random_labels, config.train_size,
                               config.gaussian_dim, config.gaussian_classes, config.gaussian_per_class,
                               config.gaussian_labels)
    if model is None:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.feature_dim, config.width,
                            config.depth, config.fixed_etf, config.bias, config.batch_norm)
    device = torch.device(config.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                            if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = make_loss(config.loss, config.label_smoothing, config.gamma, config.kappa, config.beta)
    optimizer = _optimizer(config, net)
    params = [p for p in net.parameters() if p.requires_grad]
    result = TrainResult(config, model=model, trainable_parameters=trainable_parameters(model))
    x, y = dataset.x_train, dataset.y_train
    order_gen = torch.Generator().manual_seed(config.seed)
    batches_per_epoch = math.ceil(len(y) / config.batch_size)
    bar = Progress(config.epochs * batches_per_epoch, f"{config.loss}", enabled=not config.quiet and rank == 0)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        lr = config.lr * lr_factor(config.schedule, epoch, config.epochs, config.step_size)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        order = torch.randperm(len(y), generator=order_gen)
        total, count = 0.0, 0
        for index in range(batches_per_epoch):
            batch = order[index * config.batch_size: (index + 1) * config.batch_size][rank::world]
            xb, yb = x[batch].to(device, non_blocking=True), y[batch].to(device, non_blocking=True)

            def closure():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb), yb)
                objective = loss
                if config.optimizer == "lbfgs" and config.weight_decay:
                    objective = loss + 0.5 * config.weight_decay * sum(p.square().sum() for p in params)
                objective.backward()
                if config.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                closure.loss = float(loss.detach())
                return objective

            if config.optimizer == "lbfgs":
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            if not math.isfinite(closure.loss):
                raise FloatingPointError(f"loss is {closure.loss} at epoch {epoch}: lower the learning rate")
            total += closure.loss * len(yb)
            count += len(yb)
            bar.update(epoch * batches_per_epoch + index + 1, f"epoch {epoch + 1} loss {closure.loss:.4g}")
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "lr": lr, "loss": float(sums[0] / sums[1])}
        train_metrics = evaluate(net, x, y, dataset.num_classes, second_pass=config.second_pass)
        row["train_accuracy"] = train_metrics.pop("accuracy")
        row["test_accuracy"] = evaluate(net, dataset.x_test, dataset.y_test, dataset.num_classes, nc=False)["accuracy"]
        row.update(train_metrics)
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
        if config.stop_at is not None and row["train_accuracy"] == 1.0 and row["nc1"] <= config.stop_at:
            break
    bar.close()
    result.seconds = time.perf_counter() - start
    if config.out and rank == 0:
        write_logs(result, config.out, f"train_{config.loss}")
    return result


def write_logs(result: TrainResult, out: str, stem: str) -> list:
    """``stem``.csv (one row per epoch), ``stem``.json (config, parameter count, history) and
    ``stem``.png (NC1–NC4 and train/test error against epoch, log scale) under ``out``."""
    from .plot import write_line_plot

    os.makedirs(out, exist_ok=True)
    history = result.history
    keys = list(history[0]) if history else []
    paths = [os.path.join(out, f"{stem}.{ext}") for ext in ("csv", "json", "png")]
    with open(paths[0], "w") as handle:
        handle.write(",".join(keys) + "\n")
        for row in history:
            handle.write(",".join(f"{row.get(k, float('nan')):.10g}" for k in keys) + "\n")
    with open(paths[1], "w") as handle:
        json.dump({"config": dataclasses.asdict(result.config), "trainable_parameters": result.trainable_parameters,
                   "seconds": result.seconds, "history": history}, handle, indent=1)
    epochs = [row["epoch"] for row in history]
    series = {key: (epochs, [row.get(key) for row in history]) for key in ("nc1", "nc2", "nc3", "nc4")}
    series["train error"] = (epochs, [1 - row["train_accuracy"] for row in history])
    series["test error"] = (epochs, [1 - row["test_accuracy"] for row in history])
    write_line_plot(paths[2], series, title=f"{stem}: nc metrics and error vs epoch", xlabel="epoch")
    return paths


# --------------------------------------------------------------------------------------------
# command line: ncfast train (torchrun --nproc_per_node P -m ncfast train ... for DDP)
# --------------------------------------------------------------------------------------------
CLI_HELP = "train a network while tracking neural collapse (NC1-NC4 per epoch); DDP under torchrun"


def add_arguments(parser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default=defaults.dataset)
    add("--data-dir", help="folder with the MNIST/CIFAR standard files (nothing is downloaded)")
    add("--random-labels", action="store_true", help="train on uniformly random labels (seed 003 Fig. 5)")
    add("--train-size", type=int, help="use only the first N training samples")
    add("--gaussian-dim", type=int, default=defaults.gaussian_dim)
    add("--gaussian-classes", type=int, default=defaults.gaussian_classes)
    add("--gaussian-per-class", type=int, default=defaults.gaussian_per_class)
    add("--gaussian-labels", choices=("random", "true"), default=defaults.gaussian_labels)
    add("--model", choices=MODELS, default=defaults.model)
    add("--width", type=float, default=defaults.width, help="width multiplier")
    add("--depth", type=int, default=defaults.depth, help="MLP hidden layers")
    add("--no-batch-norm", action="store_true", help="MLP without BatchNorm")
    add("--feature-dim", type=int, help="penultimate feature dimension d")
    add("--fixed-etf", action="store_true", help="fix the classifier to a simplex ETF (SPEC §4)")
    add("--no-bias", action="store_true", help="classifier without bias")
    add("--loss", choices=LOSSES, default=defaults.loss)
    add("--label-smoothing", type=float, help="ce/ls α (ls default 0.1)")
    add("--gamma", type=float, help="focal γ (default 3)")
    add("--kappa", type=float, help="mse κ (default 1)")
    add("--beta", type=float, help="mse β (default 15; 1 = vanilla MSE)")
    add("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    add("--lr", type=float, default=defaults.lr)
    add("--momentum", type=float, default=defaults.momentum)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--schedule", choices=SCHEDULES, default=defaults.schedule)
    add("--step-size", type=int, default=defaults.step_size, help="epochs between ÷10 for --schedule step")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    add("--clip-grad-norm", type=float, help="clip the gradient norm (seed 002: 2)")
    add("--seed", type=int, default=defaults.seed)
    add("--second-pass", action="store_true", help="also NCC mismatch, cosine margins (a second pass)")
    add("--threads", type=int, help="torch threads per process")
    add("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    add("--out", default="ncfast_out", help="folder for train_<loss>.csv/.json/.png")
    add("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .cli import CLIError

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in vars(args).items() if key in names}
    values.update(batch_norm=not args.no_batch_norm, bias=not args.no_bias)
    config = TrainConfig(**values)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = _world()
    if config.batch_size % world:
        raise CLIError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    try:
        result = train(config)
    except ValueError as error:
        raise CLIError(str(error)) from None
    if rank == 0:
        final = result.final
        print(f"{config.loss} on {config.dataset} ({config.model}, {world} process{'es' if world > 1 else ''}, "
              f"{result.trainable_parameters} trainable parameters): epochs {final['epoch']}, "
              f"train acc {100 * final['train_accuracy']:.2f}%, test acc {100 * final['test_accuracy']:.2f}%, "
              f"NC1 {final['nc1']:.3e} NC2 {final['nc2']:.3e} NC3 {final['nc3']:.3e} NC4 {final['nc4']:.3e}, "
              f"{result.seconds:.1f}s")
        print(f"wrote {os.path.join(config.out, 'train_' + config.loss)}.csv/.json/.png")
    if distributed:
        dist.destroy_process_group()
    return 0
