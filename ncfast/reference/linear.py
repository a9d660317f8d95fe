"""Reference fused linear + loss, unfused: the full (N, K) logits H Wᵀ + b, then the
per-row loss of :mod:`ncfast.reference.losses`; autograd gives the gradients of H, W and b."""

from __future__ import annotations

import torch

from . import losses


def linear_loss(features, weight, bias, target, loss="cross_entropy", class_weight=None, alpha=None,
                ignore_index=-100, reduction="mean", label_smoothing=0.0, gamma=2.0, kappa=1.0, beta=1.0,
                lse_square_scale=0.0, softcap=None):
    """``<loss>(features @ weight.T + bias, target)`` with every logit materialised.

    features (N, d), weight (K, d), bias (K,) or None, target (N,) class indices or (N, K)
    probabilities (cross-entropy); ``loss`` is one of
    "cross_entropy", "focal", "rescaled_mse". Returns the reduced loss (a (N,) tensor for
    reduction="none")."""
    logits = torch.nn.functional.linear(features, weight, bias)
    if loss == "cross_entropy" and target.is_floating_point():
        rows = losses.soft_cross_entropy_rows(logits, target, class_weight, label_smoothing, softcap or 0.0)
    elif loss == "cross_entropy":
        rows = losses.cross_entropy_rows(logits, target, class_weight, ignore_index, label_smoothing, lse_square_scale,
                                         softcap or 0.0)
    elif loss == "focal":
        rows = losses.focal_rows(logits, target, gamma, alpha, class_weight, ignore_index)
    else:
        rows = losses.rescaled_mse_rows(logits, target, kappa, beta, class_weight, ignore_index)
    return losses.reduce(rows, target, class_weight, ignore_index, reduction)
