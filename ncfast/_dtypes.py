"""The dtype rules every op family shares: the dtype sums are accumulated in, and the short name
the compiled kernels dispatch on."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every narrower float (float32, bfloat16, float16):
    reductions over a row or a batch are never accumulated in a 16-bit type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name the C++ and Triton launchers take."""
    return str(dtype).removeprefix("torch.")
