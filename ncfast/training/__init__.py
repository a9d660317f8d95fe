"""A network trainer that tracks neural collapse: the papers' experiments as a tool.

Models (an MLP and the CIFAR variant of ResNet18, with a width multiplier and a feature
dimension d), any ncfast loss, an optional fixed simplex-ETF classifier, SGD / Adam / L-BFGS
with the papers' schedules and gradient-norm clipping; after every epoch NC1–NC4 of the training
set, train and test accuracy, logged to CSV + JSON with figures (matplotlib, optional).

One module per job: :mod:`.data` (datasets), :mod:`.models` (networks), :mod:`.config` (the run's
record and its checks), :mod:`.loop` (schedules, optimisers, train, evaluate) and
:mod:`.logs` (CSV/JSON/figure writing); :mod:`.readers` reads the standard dataset files
without trusting them. The loss names are :mod:`ncfast.loss_choices`'.
"""

from .config import OPTIMIZERS, SCHEDULES, TrainConfig, check_config
from .data import DATASETS, Dataset, load_dataset
from .logs import PAPER_PANELS, history_panels, write_logs
from .loop import TrainResult, evaluate, lr_factor, train
from .models import MLP, MODELS, ResNet18, build_model, trainable_parameters

__all__ = [
    "DATASETS",
    "Dataset",
    "MLP",
    "MODELS",
    "PAPER_PANELS",
    "OPTIMIZERS",
    "ResNet18",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "check_config",
    "evaluate",
    "history_panels",
    "load_dataset",
    "lr_factor",
    "train",
    "trainable_parameters",
    "write_logs",
]
