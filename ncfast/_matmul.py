"""fp32 matrix products on the faster of the two CPU GEMM libraries torch ships.

``torch.mm`` sends fp32 CPU products to MKL, which runs its AVX2 code on AMD processors. oneDNN's
inner product, the kernel torch's inductor uses for CPU linear layers, runs AVX-512 there:
measured on a 2-core AMD EPYC (Zen 5) at (4096 × 1024)·(1024 × 4096), about 400 GFLOP/s against
MKL's 200. Where oneDNN cannot take the product (another dtype or device, a tensor that needs
autograd, an empty inner dimension) it is ``torch.mm``'s.
"""

from __future__ import annotations

from typing import Optional

import torch


def _onednn_linear():
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _onednn_linear()


def _one_unit_stride(x: torch.Tensor) -> torch.Tensor:
    # oneDNN describes a matrix by its two strides; one of them must be 1.
    return x if x.stride(1) == 1 or x.stride(0) == 1 else x.contiguous()


def mm_t(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for a (M, D), b (N, D) and bias (N,) or None; returns (M, N).
    The bias is added by the product itself (oneDNN's epilogue, or ``torch.addmm``), not in
    a pass of its own."""
    if (
        _ONEDNN_LINEAR is not None
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dim() == 2
        and b.dim() == 2
        and a.shape[1] > 0
        and a.shape[1] == b.shape[1]
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.shape == b.shape[:1]))
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, bias)))
    ):
        if bias is not None:
            bias = bias.contiguous()
        return _ONEDNN_LINEAR(_one_unit_stride(a), _one_unit_stride(b), bias, "none", [], "")
    return a @ b.T if bias is None else torch.addmm(bias, a, b.T)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (M, D) and b (D, N); returns (M, N)."""
    return mm_t(a, b.T)
