"""ncfast: fused losses and streaming neural-collapse metrics for classification training."""

from ._backend import available_backends, use_backend
from .geometry import ETFClassifier, simplex_etf
from .linear import linear_cross_entropy, linear_focal_loss, linear_rescaled_mse
from .losses import (
    CrossEntropyLoss,
    FocalLoss,
    RescaledMSELoss,
    cross_entropy,
    focal_loss,
    rescaled_mse,
)
from .ncstats import NCMetrics, NCSecondPass, NCStats, nc_metrics
from .tracker import NCTracker
from . import training, ufm  # noqa: E402  (modules: ncfast.training.train(...), ncfast.ufm.solve(...))
from .training import TrainConfig
from .ufm import UFMResult, optimal_objective

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "ETFClassifier",
    "FocalLoss",
    "NCMetrics",
    "NCSecondPass",
    "NCStats",
    "NCTracker",
    "RescaledMSELoss",
    "TrainConfig",
    "UFMResult",
    "available_backends",
    "cross_entropy",
    "focal_loss",
    "linear_cross_entropy",
    "linear_focal_loss",
    "linear_rescaled_mse",
    "nc_metrics",
    "optimal_objective",
    "rescaled_mse",
    "simplex_etf",
    "training",
    "ufm",
    "use_backend",
]
