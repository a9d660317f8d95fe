"""The trainer's configuration: one record holding everything a run needs, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .data import DATASETS
from .models import MODELS

LOSSES = ("ce", "focal", "ls", "mse")
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
    stop_at: Optional[float] = None  # stop once NC1 ≤ this and train accuracy is 100%


def check_config(config: TrainConfig) -> None:
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
