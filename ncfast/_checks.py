"""Argument checks shared by every op family: each raises where the argument enters, with the
argument's name in the message."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def finite_float(name: str, value, ok: Callable[[float], bool], expected: str) -> float:
    """A finite Python number satisfying ``ok``, as a float (NaN and ±inf are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not (-math.inf < value < math.inf and ok(value)):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def int64(name: str, value) -> int:
    """An int that fits torch's int64 (class indices and ``ignore_index`` are int64)."""
    integer(name, value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}: expected a value that fits in int64, got {value}")
    return value


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {value!r}")
    return value


def float_tensor(name: str, value, shape_text: str) -> Tensor:
    """A tensor of one of the floating dtypes the kernels take."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor of shape {shape_text}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {value.dtype}")
    return value


def class_indices(name: str, value, note: str = "") -> Tensor:
    """A tensor of integer class indices (its range is checked where the class count is known)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class indices, got {value.dtype}{note}")
    return value


def class_vector(name: str, vector, num_classes: int, device: torch.device, main_input: str) -> Tensor:
    """A floating (K,) vector of per-class values on ``device``."""
    if not isinstance(vector, Tensor):
        raise TypeError(f"{name}: expected a tensor of shape (K,) or None, got {type(vector).__name__}")
    if not vector.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {vector.dtype}")
    if vector.shape != (num_classes,):
        raise ValueError(f"{name}: expected shape ({num_classes},) (one entry per class), got {tuple(vector.shape)}")
    if vector.device != device:
        raise ValueError(f"{name}: is on {vector.device} but {main_input} are on {device}")
    return vector


def no_internal_overlap(name: str, tensor: Tensor, purpose: str) -> None:
    """Refuses a tensor two of whose elements share memory (``expand``, some ``as_strided``):
    an in-place write would put the rows' results over each other (torch refuses those too)."""
    extent = 1  # elements spanned by the dimensions seen so far, smallest stride first
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz > 1):
        if stride < extent:
            raise ValueError(
                f"{name}: elements overlap in memory (strides {tuple(tensor.stride())} for shape "
                f"{tuple(tensor.shape)}), so {purpose} cannot write into it; pass a tensor with its own "
                "storage (e.g. .clone()) or leave it off"
            )
        extent += stride * (size - 1)
