"""Simplex equiangular tight frames and the fixed-ETF classifier.

A simplex ETF of K classes in R^d is K unit vectors with pairwise cosine −1/(K−1): the
geometry neural collapse converges to (Zhu et al., NeurIPS 2021, §4.3, footnote 14). Fixing the last layer to
it removes K·d trainable parameters without losing accuracy (Zhu et al., NeurIPS 2021, Fig. 7)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _centred_basis(num_classes: int) -> Tensor:
    """(K, K−1) float64 orthonormal basis of 1^⊥ (the centring projector's range).

    Deterministic: Householder QR of the first K−1 columns of I_K − 11ᵀ/K."""
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centring[:, : num_classes - 1])
    return basis


def _random_orthonormal(rows: int, cols: int, generator: Optional[torch.Generator]) -> Tensor:
    """(rows, cols) float64 with orthonormal columns, Haar-distributed (QR with sign fix)."""
    gaussian = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    # QR's sign convention is not Haar: flip columns so that diag(R) > 0
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def simplex_etf(
    num_classes: int,
    dim: int,
    random_basis: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The simplex ETF classifier W ∈ R^{K×d}, rows of unit norm, W Wᵀ = K/(K−1)·(I_K − 11ᵀ/K).

    Zhu et al. (NeurIPS 2021) §4.3, footnote 14: Wᵀ = √(K/(K−1)) · P (I_K − 11ᵀ/K) with
    P ∈ R^{d×K} orthonormal columns; P = first K columns of I_d (``random_basis=False``) or Haar-random
    (``random_basis=True``, drawn from ``generator``). d = K−1 is allowed: the K centred
    vectors span only K−1 dimensions, so W = √(K/(K−1)) · V̄ Qᵀ with V̄ (K, K−1) an orthonormal
    basis of 1^⊥ and Q = I (or random orthogonal). Computed in float64, returned in ``dtype``.

    Args:
        num_classes: K ≥ 2.
        dim: d ≥ K − 1.
    Returns:
        (K, d) tensor.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(dim, int) or dim < num_classes - 1:
        raise ValueError(f"dim must be an int >= num_classes - 1 = {num_classes - 1}, got {dim!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    scale = math.sqrt(num_classes / (num_classes - 1))
    if dim == num_classes - 1:
        rotation = (_random_orthonormal(dim, dim, generator) if random_basis
                    else torch.eye(dim, dtype=torch.float64))
        weight = scale * _centred_basis(num_classes) @ rotation.T
    else:
        basis = (_random_orthonormal(dim, num_classes, generator) if random_basis
                 else torch.eye(dim, num_classes, dtype=torch.float64))
        centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
        weight = scale * (basis @ centring).T
    return weight.to(device=device, dtype=dtype)


class ETFClassifier(torch.nn.Module):
    """Linear classifier z = h Wᵀ + b with W = ``simplex_etf(num_classes, dim)`` fixed.

    W is a buffer (saved in the state dict, moved by ``.to()``, never trained); the bias is a
    trainable parameter when ``bias=True``. Drop-in for ``nn.Linear(dim, num_classes)``:
    input (N, d) -> logits (N, K); K·d fewer trainable parameters.
    """

    def __init__(self, dim: int, num_classes: int, bias: bool = True, random_basis: bool = False,
                 generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features = dim
        self.out_features = num_classes
        self.register_buffer(
            "weight", simplex_etf(num_classes, dim, random_basis, generator, dtype, device))
        self.bias = (torch.nn.Parameter(torch.zeros(num_classes, dtype=dtype, device=device))
                     if bias else None)

    def forward(self, features: Tensor) -> Tensor:
        if not features.is_floating_point():
            raise TypeError(f"features: expected a floating-point tensor, got {features.dtype}")
        if features.dim() == 0 or features.shape[-1] != self.in_features:
            raise ValueError(f"features: expected shape (..., {self.in_features}), got {tuple(features.shape)}")
        return torch.nn.functional.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dim={self.in_features}, num_classes={self.out_features}, bias={self.bias is not None}"
