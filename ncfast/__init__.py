"""ncfast: fused losses and streaming neural-collapse metrics for classification training."""

from ._backend import available_backends, use_backend
from .linear import linear_cross_entropy, linear_focal_loss, linear_rescaled_mse
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
    "FocalLoss",
    "RescaledMSELoss",
    "available_backends",
    "cross_entropy",
    "focal_loss",
    "linear_cross_entropy",
    "linear_focal_loss",
    "linear_rescaled_mse",
    "rescaled_mse",
    "use_backend",
]
