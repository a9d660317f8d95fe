"""The trainer's configuration: one record holding everything a run needs, and its checks — run
before any data is read or any epoch starts, each naming the field it refuses."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _checks
from ..loss_choices import loss_parameters
from .data import DATASETS, FLAT_DATASETS, GAUSSIAN_LABELS
from .models import MODELS

OPTIMIZERS = ("sgd", "adam", "lbfgs")
SCHEDULES = ("constant", "step", "multistep", "cosine")


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


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _at_least(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if _checks.integer(name, value) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{' or None' if optional else ''}, got {value}")


def _number(name: str, value, ok, expected: str, optional: bool = False) -> None:
    if not (optional and value is None):
        _checks.finite_float(name, value, ok, expected + (" or None" if optional else ""))


def check_device(name: str, device) -> None:
    """``device`` is None (the default device), "cpu", or a CUDA device this machine has."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}: {device!r} is not a device ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} asked for, but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {device!r}")


def check_output_folder(name: str, path) -> None:
    """``path`` is a writable folder, or a folder that can be created (nothing is created here)."""
    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"cannot be created: {existing!r} is a file"
        raise ValueError(f"{name}: {path!r} {what}; expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: {existing!r} is not writable")


def check_config(config: TrainConfig) -> None:
    """Check every field of ``config``: ValueError (TypeError for a wrong type) naming the first
    field out of range. Files are checked when read (:func:`ncfast.training.load_dataset`)."""
    for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("optimizer", OPTIMIZERS),
                          ("schedule", SCHEDULES), ("gaussian_labels", GAUSSIAN_LABELS)):
        _choice(name, getattr(config, name), allowed)
    if config.model == "resnet18" and config.dataset in FLAT_DATASETS:
        raise ValueError(f"model: resnet18 needs image inputs (C, H, W); dataset {config.dataset!r} gives vectors")
    loss_parameters(config.loss, label_smoothing=config.label_smoothing, gamma=config.gamma, kappa=config.kappa,
                    beta=config.beta)
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("step_size", 1), ("depth", 1), ("gaussian_dim", 1),
                          ("gaussian_classes", 2), ("gaussian_per_class", 1), ("seed", 0)):
        _at_least(name, getattr(config, name), minimum)
    for name in ("train_size", "feature_dim", "threads"):
        _at_least(name, getattr(config, name), 1, optional=True)
    _number("lr", config.lr, lambda v: v > 0, "a finite value > 0")
    _number("momentum", config.momentum, lambda v: 0 <= v < 1, "a value in [0, 1)")
    _number("weight_decay", config.weight_decay, lambda v: v >= 0, "a finite value >= 0")
    _number("width", config.width, lambda v: v > 0, "a finite width multiplier > 0")
    _number("clip_grad_norm", config.clip_grad_norm, lambda v: v > 0, "a finite value > 0", optional=True)
    check_device("device", config.device)
    if config.out is not None:
        check_output_folder("out", config.out)


def check_training_set(config: TrainConfig, target: torch.Tensor, num_classes: int, world: int = 1) -> None:
    """The training set ``target`` (N,) can be trained on as ``config`` asks: every class has a
    sample (the NC metrics need every class mean), and every process's share of every batch can
    train — BatchNorm (the MLP's unless ``batch_norm=False``, always ResNet18's) needs two samples."""
    num_samples = len(target)
    present = int((torch.bincount(target, minlength=num_classes) > 0).sum()) if num_samples else 0
    if present < num_classes:
        raise ValueError(f"train_size: the {num_samples} training samples hold {present} of the {num_classes} "
                         f"classes; the NC metrics need every class")
    last = num_samples - (math.ceil(num_samples / config.batch_size) - 1) * config.batch_size
    smallest = min(config.batch_size, last) // world
    needed = 2 if (config.batch_norm or config.model == "resnet18") else 1
    if smallest < needed:
        raise ValueError(f"batch_size: with {num_samples} training samples in batches of {config.batch_size} over "
                         f"{world} process(es), a process gets a batch of {smallest} sample(s), BatchNorm needs "
                         f"{needed}: change batch_size or train_size")
