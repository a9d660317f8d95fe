"""Argument checking shared by :class:`ncfast.NCStats` and :class:`ncfast.NCSecondPass`:
errors are raised where an argument enters, naming it."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _checks

GLOBAL_MEANS = ("samples", "classes")
#: ``classes=`` of compute / the second pass: every class must have samples, or only those that do
CLASS_SETS = ("all", "observed")


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_batch(features, target, dim: int, device: torch.device):
    """(features (N, d) contiguous, target (N,) int64 contiguous) after the shape, dtype and
    device checks (not the class range: see :func:`check_target_range`)."""
    _checks.float_tensor("features", features, f"(N, {dim})")
    _checks.class_indices("target", target)
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features: expected shape (N, {dim}), got {tuple(features.shape)}")
    if target.shape != (features.shape[0],):
        raise ValueError(f"target: expected shape ({features.shape[0]},) to match features, got {tuple(target.shape)}")
    if features.device != device:
        raise ValueError(f"features: is on {features.device} but the statistics live on {device} "
                         f"(pass device= when creating them)")
    if target.device != device:
        raise ValueError(f"target: is on {target.device} but features are on {device}")
    return features.detach().contiguous(), target.to(torch.int64).contiguous()


def check_target_range(target: Tensor, num_classes: int) -> None:
    if target.numel() == 0:
        return
    low, high = torch.aminmax(target)
    if int(low) < 0 or int(high) >= num_classes:
        bad = (target < 0) | (target >= num_classes)
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target: value {int(target[i])} at index {i} is out of range [0, {num_classes})")


def _check_finite(name: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")


def check_classifier(weight, bias, num_classes: int, dim: int, device: torch.device):
    """(weight, bias) validated, on ``device``, in their own dtype (no float64 copy of a K×d
    weight: the metrics convert it a block of rows at a time); bias ``None`` stays ``None``."""
    if weight is None:
        if bias is not None:
            raise ValueError("bias: given without weight; the classifier metrics need both")
        return None, None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor of shape ({num_classes}, {dim})")
    if weight.shape != (num_classes, dim):
        raise ValueError(f"weight: expected shape ({num_classes}, {dim}), got {tuple(weight.shape)}")
    weight = weight.detach().to(device)
    _check_finite("weight", weight)
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias: expected a floating-point tensor of shape ({num_classes},)")
        if bias.shape != (num_classes,):
            raise ValueError(f"bias: expected shape ({num_classes},), got {tuple(bias.shape)}")
        bias = bias.detach().to(device, torch.float64)
        _check_finite("bias", bias)
    return weight, bias


def check_global_mean(global_mean: str) -> str:
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean: expected one of {GLOBAL_MEANS}, got {global_mean!r}")
    return global_mean


def observed_index(counts: Tensor, classes: str, caller: str) -> Optional[Tensor]:
    """The classes a metric runs over: ``None`` for all K (``classes="all"``, which raises
    ValueError listing the classes without samples), or the sorted indices of the classes
    with samples (``classes="observed"``; at least two needed)."""
    if classes not in CLASS_SETS:
        raise ValueError(f"classes: expected one of {CLASS_SETS}, got {classes!r}")
    missing = (counts == 0).nonzero().flatten()
    K = counts.shape[0]
    if missing.numel() == 0:
        return None
    if classes == "all":
        shown = ", ".join(map(str, missing[:10].tolist())) + (", ..." if missing.numel() > 10 else "")
        raise ValueError(f"{caller}: {missing.numel()} of {K} classes have no samples ({shown}); every class "
                         f"needs at least one, or pass classes='observed' to use the {K - missing.numel()} "
                         f"observed classes only")
    observed = (counts > 0).nonzero().flatten()
    if observed.numel() < 2:
        raise ValueError(f"{caller}: {observed.numel()} of {K} classes have samples; the metrics need at least 2")
    return observed


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device):
    """TF32 off for the float32 GEMMs: its 10-bit mantissa wipes out NC1 in the collapsed
    regime and puts 1e-3 errors into every cosine."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def validated_state(state, num_classes: int, dim: int, device: torch.device):
    """(counts, means, within_scatter, class_sq) of a :meth:`ncfast.NCStats.state_dict`, as
    float64 copies on ``device``, after checking every entry (ValueError naming it)."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected the dict of NCStats.state_dict(), got {type(state).__name__}")
    for name, expected in (("num_classes", num_classes), ("dim", dim)):
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value != expected:
            raise ValueError(f"state: entry {name!r} is {value!r}, expected {expected}")
    K, d = num_classes, dim
    out = []
    for name, shape in (("counts", (K,)), ("means", (K, d)), ("within_scatter", (d, d)), ("class_sq", (K,))):
        value = state.get(name)
        if not isinstance(value, Tensor) or not value.is_floating_point():
            found = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"state: entry {name!r} must be a real floating-point tensor, got {found}")
        if value.shape != shape:
            raise ValueError(f"state: entry {name!r} must have shape {shape}, got {tuple(value.shape)}")
        value = value.detach().to(device, torch.float64, copy=True)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state: entry {name!r} contains NaN or infinite values")
        out.append(value)
    counts, _, scatter, class_sq = out
    if bool((counts < 0).any()) or not torch.equal(counts, counts.round()):
        raise ValueError("state: entry 'counts' must hold whole numbers >= 0")
    if bool((class_sq < 0).any()):
        raise ValueError("state: entry 'class_sq' must be >= 0 (sums of squared distances)")
    scale = float(scatter.abs().max())
    # Gram sums are symmetric to rounding; eigenvalues of a PSD float64 sum go negative by at
    # most ~d·eps of the largest.
    if float((scatter - scatter.T).abs().max()) > 1e-10 * scale:
        raise ValueError("state: entry 'within_scatter' is not symmetric")
    if scale > 0 and float(torch.linalg.eigvalsh(scatter).min()) < -1e-9 * d * scale:
        raise ValueError("state: entry 'within_scatter' is not positive semi-definite")
    return tuple(out)
