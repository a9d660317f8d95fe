"""Backend selection: every op dispatches on its tensors' device (CPU -> the C++ kernels,
CUDA -> Triton); :func:`use_backend` forces one, :func:`available_backends` lists them."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("cpp", "triton", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("ncfast_backend", default=None)

try:
    from . import _C  # noqa: F401  (the compiled CPU kernels)

    _HAS_CPP = True
except ImportError:  # pragma: no cover - only a broken install lands here
    _HAS_CPP = False


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """The backends usable in this process, best first: ``"cpp"`` (compiled CPU kernels),
    ``"triton"`` (with a CUDA device, or on CPU tensors under ``TRITON_INTERPRET=1``) and
    ``"torch"`` (the pure-torch reference, always there)."""
    names = []
    if _HAS_CPP:
        names.append("cpp")
    if _has_triton() and (torch.cuda.is_available() or _triton_interpreted()):
        names.append("triton")
    names.append("torch")
    return names


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every ncfast op in the ``with`` block onto one backend.

    ``name`` is ``"cpp"`` (CPU tensors only), ``"triton"`` (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``) or ``"torch"`` (the reference, any device)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name not in available_backends():
        raise ValueError(f"backend: {name!r} is not available here; available: {available_backends()}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``tensor``."""
    forced = _forced.get()
    if forced is None and tensor.is_cpu:  # the usual case, first: it is on every call's path
        return "cpp" if _HAS_CPP else "torch"
    on_cuda = tensor.device.type == "cuda"
    if forced == "cpp" and tensor.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors only, got a tensor on {tensor.device}")
    if forced == "triton" and not (on_cuda or _triton_interpreted()):
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    if forced is not None:
        return forced
    if on_cuda and _has_triton():
        return "triton"
    if tensor.device.type == "cpu" and _HAS_CPP:
        return "cpp"
    return "torch"


def cpu_buffer(tensor: torch.Tensor):
    """A zero-copy numpy view of a CPU tensor for the C++ kernels (bf16 travels as int16)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()
