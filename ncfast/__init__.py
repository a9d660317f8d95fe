"""ncfast: fused losses and streaming neural-collapse metrics for classification training."""

from ._backend import available_backends, use_backend
from .losses import (
    CrossEntropyLoss,
    FocalLoss,
    RescaledMSELoss,
    cross_entropy,
    focal_loss,
    rescaled_mse,
)
from .ncstats import NCMetrics, NCSecondPass, NCStats, nc_metrics

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "NCMetrics",
    "NCSecondPass",
    "NCStats",
    "RescaledMSELoss",
    "available_backends",
    "cross_entropy",
    "focal_loss",
    "nc_metrics",
    "rescaled_mse",
    "use_backend",
]
