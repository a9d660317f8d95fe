"""ncfast: fused losses and streaming neural-collapse metrics for classification training."""

from ._backend import available_backends, use_backend
from .geometry import ETFClassifier, simplex_etf
from .losses import (
    CrossEntropyLoss,
    FocalLoss,
    RescaledMSELoss,
    cross_entropy,
    focal_loss,
    rescaled_mse,
)

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "ETFClassifier",
    "FocalLoss",
    "RescaledMSELoss",
    "available_backends",
    "cross_entropy",
    "focal_loss",
    "rescaled_mse",
    "simplex_etf",
    "use_backend",
]
