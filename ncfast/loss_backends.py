"""Backend dispatch of the fused losses: the C++ kernels (CPU), the Triton kernels (CUDA) and
the torch reference, behind one :func:`forward`; the reused CPU gradient buffer.

Every backend takes logits as a (B, K, S) view with the caller's strides and targets (B, S), or
(N, K) logits with (N,) targets (S = 1), fills ``grad`` (laid out as the logits, or the logits
themselves) and ``lse`` (B·S,; the C++ kernels also take None: not wanted), and returns
(per-position loss w_y·ℓ (B·S,) in b-major order, Σw of the counted positions, the reduced loss
or None where the caller reduces). Probability targets come as (N, K) rows."""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._dtypes import accumulation_dtype, dtype_name
from .loss_options import LossOptions
from .loss_reduction import mean_scale, total_weight
from .reference import losses as reference


def as_float64(vector: Optional[Tensor]):
    """A per-class vector as the C++ kernels read it: a float64 numpy array, or None."""
    return None if vector is None else vector.detach().to("cpu", torch.float64).contiguous().numpy()


def num_positions(logits: Tensor) -> int:
    """B·S of (B, K, S) logits ((N, K) logits are S = 1): the number of per-position losses."""
    return logits.shape[0] * (logits.shape[2] if logits.dim() == 3 else 1)


def new_lse(logits: Tensor) -> Tensor:
    """A buffer for each position's log-sum-exp: (B·S,), fp32 (fp64 for fp64 logits)."""
    return torch.empty(num_positions(logits), dtype=accumulation_dtype(logits.dtype), device=logits.device)


def _float64_vector(vector: Optional[Tensor]) -> Optional[Tensor]:
    """A per-class vector as the C++ forward reads it: a contiguous float64 CPU tensor, or None."""
    if vector is None:
        return None
    if not vector.is_cpu:
        return vector.detach().to("cpu", torch.float64).contiguous()
    return (vector if vector.dtype is torch.float64 else vector.double()).contiguous()


def _address(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _cpp_forward(logits, target, weight, alpha, grad, lse, options, mean):
    # The kernel reads and writes these tensors by address, with sizes and strides passed
    # alongside: no per-call buffer objects (which cost more than a small call's kernel).
    # ``target`` comes as (B, S) or (N,) int64; the other tensors are this module's own.
    if target.dtype is not torch.int64:
        target = target.to(torch.int64)
    if logits.dim() == 3:  # (B, K, S): (outer, classes, inner) strides
        B, K, S = logits.shape
        logits_layout, grad_layout, target_layout = logits.stride(), grad.stride(), target.stride()
    else:  # (N, K): S = 1
        (B, K), S = logits.shape, 1
        logits_layout, grad_layout, target_layout = (*logits.stride(), 0), (*grad.stride(), 0), (target.stride(0), 0)
    dtype = logits.dtype
    rows = torch.empty(B * S, dtype=accumulation_dtype(dtype))
    # The kernel also reduces the rows (float64, fixed order): no tensor op after the call.
    value = None if options.reduction == "none" else torch.empty((), dtype=dtype)
    weight, alpha = _float64_vector(weight), _float64_vector(alpha)
    total = _backend._C.loss_forward(
        logits.data_ptr(), B, K, S, *logits_layout, target.data_ptr(), *target_layout, grad.data_ptr(), *grad_layout,
        rows.data_ptr(), _address(lse), _address(value), dtype_name(dtype), options.kind, options.label_smoothing,
        options.gamma, options.kappa, options.beta, options.lse_square_scale, options.softcap, _address(weight),
        _address(alpha), options.ignore_index, mean, torch.get_num_threads(),
    )
    return rows, total, value


def _as_blocks(tensor: Tensor) -> Tensor:
    """(N, K) as the (N, K, 1) view; (B, K, S) as it is."""
    return tensor if tensor.dim() == 3 else tensor[:, :, None]


def class_last(logits: Tensor) -> Tensor:
    """(B, K, S) logits (or targets) as (B·S, K) rows, positions in b-major order (a copy unless
    S = 1); (N, K) as it is."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _torch_rows(logits, target, weight, alpha, lse, options, mean):
    """The reference on (N, K) rows: per-row losses, the gradient (scaled for "mean") and Σw."""
    z = logits.to(accumulation_dtype(logits.dtype))
    rows, g, row_lse = reference.rows_and_grad(options.loss, z, target, weight, alpha, options.ignore_index,
                                               **options.params())
    total = total_weight(target, weight, options.ignore_index, z.dtype)
    lse.copy_(row_lse)
    return rows, (g * mean_scale(total) if mean else g), total


def _torch_forward(logits, target, weight, alpha, grad, lse, options, mean):
    logits, grad = _as_blocks(logits), _as_blocks(grad)
    rows, g, total = _torch_rows(class_last(logits), target.reshape(-1), weight, alpha, lse, options, mean)
    grad.copy_(g.reshape(logits.shape[0], logits.shape[2], logits.shape[1]).movedim(-1, 1))
    return rows, total, None


def _torch_soft_forward(logits, target, weight, alpha, grad, lse, options, mean):
    rows, g, total = _torch_rows(logits, target, weight, alpha, lse, options, mean)
    grad.copy_(g)
    return rows, total


def _triton_forward(logits, target, weight, alpha, grad, lse, options, mean):
    from .triton_kernels import losses as kernels

    # The (B, K, S) view as it lies, any strides: the kernel reads class-strided tiles in place
    # and writes the gradient in ``grad``'s own layout (no transposed copy in or out).
    target = target if target.dim() == 2 else target[:, None]
    rows, total = kernels.loss_forward(_as_blocks(logits), target, weight, alpha, _as_blocks(grad), options.kind,
                                       options.params(), options.ignore_index, mean, lse)
    return rows, total, None


_BACKEND_FORWARD = {"cpp": _cpp_forward, "torch": _torch_forward, "triton": _triton_forward}


# Probability targets (cross-entropy only): ℓ_i = −Σ_j w_j q'_ij log p_ij, "mean" divides by N
# (as torch), g_ij = (Σ_k w_k q'_ik) p_ij − w_j q'_ij. The kernels read q in the logits' dtype.
def _soft_rows_count(logits: Tensor, mean: bool) -> tuple[Tensor, float]:
    num_rows = logits.shape[0]
    total = torch.tensor(float(num_rows), dtype=accumulation_dtype(logits.dtype), device=logits.device)
    return total, (1.0 / num_rows if mean and num_rows else 1.0)


def _cpp_soft_forward(logits, target, weight, alpha, grad, lse, options, mean):
    from . import _C

    total, scale = _soft_rows_count(logits, mean)
    rows = torch.empty(logits.shape[0], dtype=accumulation_dtype(logits.dtype))
    target = target.to(logits.dtype).contiguous()
    _C.soft_cross_entropy_forward(
        _backend.cpu_buffer(logits), _backend.cpu_buffer(target), _backend.cpu_buffer(grad), rows.numpy(),
        None if lse is None else lse.numpy(), dtype_name(logits.dtype), as_float64(weight), options.label_smoothing,
        options.softcap, scale, torch.get_num_threads(),
    )
    return rows, total


def _triton_soft_forward(logits, target, weight, alpha, grad, lse, options, mean):
    from .triton_kernels import losses as kernels

    total, scale = _soft_rows_count(logits, mean)
    target = target.to(logits.dtype).contiguous()
    rows = kernels.soft_loss_forward(logits, target, weight, grad, options.label_smoothing, options.softcap, scale,
                                     lse)
    return rows, total


_BACKEND_SOFT_FORWARD = {"cpp": _cpp_soft_forward, "torch": _torch_soft_forward, "triton": _triton_soft_forward}


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises ValueError naming the first class index outside [0, K) that is not ignore_index."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target: value {int(target[i])} at index {i} is out of range [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )


def reduce_rows(rows: Tensor, total, reduction: str, dtype: torch.dtype) -> Tensor:
    """The per-row losses reduced as torch does ("mean" divides by ``total``), in ``dtype``."""
    if reduction == "none":
        return rows if rows.dtype is dtype else rows.to(dtype)
    value = rows.sum()
    if reduction == "mean":
        value = value / total
    return value.to(dtype)


def check_op_shapes(logits: Tensor, target: Tensor, weight, alpha) -> None:
    """The ops may be called directly (``torch.ops.ncfast.fused_loss``), past the public
    functions' checks; the kernels read by address, so the ops check every size before
    :func:`forward`."""
    K = logits.shape[1]
    if target.is_floating_point():
        expected = tuple(logits.shape)
    else:
        expected = (logits.shape[0],) + ((logits.shape[2],) if logits.dim() == 3 else ())
    if tuple(target.shape) != expected:
        raise ValueError(f"target: expected shape {expected} for logits of shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    for name, vector in (("weight", weight), ("alpha", alpha)):
        if vector is not None and tuple(vector.shape) != (K,):
            raise ValueError(f"{name}: expected shape ({K},), got {tuple(vector.shape)}")


def forward(logits, target, weight, alpha, grad, lse, options: LossOptions) -> Tensor:
    """Fills ``grad`` (laid out as ``logits``) with ∂(reduced loss)/∂logits (per-position losses'
    gradients for "none") and ``lse`` (B·S,) with each position's log-sum-exp (None: not
    wanted), and returns the reduced loss in the logits' dtype. Class indices come with
    (B, K, S) logits and (B, S) targets ((N, K) with (N,) is S = 1); probability targets with
    (N, K) logits and targets. The caller has checked the shapes (:func:`check_op_shapes`)."""
    backend = _backend.backend_for(logits)
    if lse is None and backend != "cpp":  # the C++ kernels skip it; the others always write one
        lse = new_lse(logits)
    mean = options.reduction == "mean"
    if target.is_floating_point():
        # The probability-target kernels read and write class-last rows.
        out = grad if grad.stride(-1) == 1 or grad.shape[1] <= 1 else torch.empty(
            grad.shape, dtype=grad.dtype, device=grad.device)
        if logits.stride(-1) != 1 and logits.shape[1] > 1:
            logits = logits.contiguous()
        rows, total = _BACKEND_SOFT_FORWARD[backend](logits, target, weight, alpha, out, lse, options, mean)
        if out is not grad:
            grad.copy_(out)
        return reduce_rows(rows, total, options.reduction, logits.dtype)
    if backend != "cpp" and target.device.type == "cpu":
        check_target_values(target.reshape(-1), logits.shape[1], options.ignore_index)
    rows, total, value = _BACKEND_FORWARD[backend](logits, target, weight, alpha, grad, lse, options, mean)
    return reduce_rows(rows, total, options.reduction, logits.dtype) if value is None else value


def _fresh(buffer: Tensor) -> Tensor:
    """A CPU buffer just allocated, given transparent huge pages where it is large enough to be
    a mapping of its own (otherwise its 4 KiB page faults cost more than a short-row loss)."""
    nbytes = buffer.numel() * buffer.element_size()
    if nbytes >= _backend._C.HUGE_PAGE_MIN_BYTES:
        _backend._C.advise_huge_pages(buffer.data_ptr(), nbytes)
    return buffer


class _GradientWorkspace:
    """The CPU gradient buffer, reused across steps.

    torch's CPU allocator hands large blocks back to the OS, so a fresh N×K gradient costs a
    page fault per 4 KiB on every step — often more than the fused loss itself. The last
    buffer is kept and handed out again once no other tensor shares its storage (checked
    under a lock, so concurrent calls never share one). CUDA has its own caching allocator."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffer: Optional[Tensor] = None

    @staticmethod
    def _unshared(buffer: Tensor) -> bool:
        # Every caller got its own view (a tensor of its own on the same storage), so the
        # storage's count is ours plus the temporary storage object once all of them are gone.
        return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        with self._lock:
            buffer = self._buffer
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype or not self._unshared(buffer):
                buffer = _fresh(torch.empty(shape, dtype=dtype))
                self._buffer = buffer
            return buffer.view(shape)

    def release(self) -> None:
        """Drop the kept buffer (its memory returns once nothing else uses it)."""
        with self._lock:
            self._buffer = None


_workspace = _GradientWorkspace()
release_workspace = _workspace.release


# Below glibc's default mmap threshold (128 KiB) a fresh buffer comes from the heap without page
# faults: cheaper than the workspace's lock and storage check.
_WORKSPACE_MIN_BYTES = 128 * 1024


def new_gradient(logits: Tensor) -> Tensor:
    """A gradient buffer laid out as ``logits`` (the workspace when they are contiguous and large)."""
    if (logits.is_cpu and logits.numel() * logits.element_size() >= _WORKSPACE_MIN_BYTES
            and logits.is_contiguous() and hasattr(torch._C, "_storage_Use_Count")):
        return _workspace.take(logits.shape, logits.dtype)
    return _fresh(torch.empty_like(logits)) if logits.is_cpu else torch.empty_like(logits)
