"""A network trainer that tracks neural collapse: the papers' experiments as a tool.

Models (an MLP and the CIFAR variant of ResNet18, with a width multiplier and a feature
dimension d), any ncfast loss, an optional fixed simplex-ETF classifier, SGD / Adam / L-BFGS
with the papers' schedules and gradient-norm clipping; after every epoch NC1–NC4 of the training
set, train and test accuracy, logged to CSV + JSON with figures.

One module per job: :mod:`.data` (readers), :mod:`.models` (networks), :mod:`.config` (the run's
record and its checks), :mod:`.loop` (losses, schedules, optimisers, train, evaluate) and
:mod:`.logs` (CSV/JSON/figure writing).
"""

from .config import LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig
from .data import DATASETS, Dataset, load_dataset
from .logs import write_logs
from .loop import TrainResult, evaluate, lr_factor, make_loss, train
from .models import MLP, MODELS, ResNet18, build_model, trainable_parameters

__all__ = [
    "DATASETS",
    "Dataset",
    "LOSSES",
    "MLP",
    "MODELS",
    "OPTIMIZERS",
    "ResNet18",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_dataset",
    "lr_factor",
    "make_loss",
    "train",
    "trainable_parameters",
    "write_logs",
]
