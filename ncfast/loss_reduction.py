"""The divisor of ``reduction="mean"`` as torch defines it, shared by every backend of the
losses and by their autograd: Σ_i w_{y_i} over the rows that are not ignored."""

from __future__ import annotations

import torch
from torch import Tensor


def total_weight(target: Tensor, weight=None, ignore_index: int = -100, dtype=torch.float64) -> Tensor:
    """0-d Σ_i w_{y_i} over the rows of ``target`` (N,) whose class is not ``ignore_index``
    (w ≡ 1 without ``weight`` (K,)), or N for probability targets (N, K), as torch divides."""
    if target.is_floating_point():
        return torch.tensor(float(target.shape[0]), dtype=dtype, device=target.device)
    keep = target != ignore_index
    factor = keep.to(dtype)
    if weight is not None:
        factor = factor * weight.to(dtype)[torch.where(keep, target, 0)]
    return factor.sum()


def mean_scale(total: Tensor) -> Tensor:
    """1/Σw for reduction="mean", and 0 when no row counts: the loss is then 0/0 = NaN but the
    gradient 0, as torch gives."""
    return torch.where(total == 0, 0.0, 1.0 / torch.where(total == 0, 1.0, total))
