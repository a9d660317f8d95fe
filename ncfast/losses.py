"""The fused loss family (SPEC §1): cross-entropy with label smoothing, focal loss and rescaled
MSE, each computing loss and gradient in one pass.

Layers, top to bottom:

* public functions (``cross_entropy``, ``focal_loss``, ``rescaled_mse``) and ``nn.Module``s:
  argument checking and torch's shape conventions;
* two ``torch.library`` ops, ``ncfast::fused_loss`` (functional, returns ``(loss, grad)``,
  with an autograd formula) and ``ncfast::fused_loss_`` (writes the gradient into the logits'
  own storage, for ``inplace_backward=True``);
* backend dispatch to the C++ kernel (CPU), the Triton kernel (CUDA) or the torch reference.

The backward pass only scales the stored gradient by the incoming gradient (a scalar for
"mean"/"sum", one factor per row for "none"), and skips even that for ``loss.backward()``.
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend, _checks
from .reference import losses as reference

LOSSES = ("cross_entropy", "focal", "rescaled_mse")
REDUCTIONS = _checks.REDUCTIONS


# --------------------------------------------------------------------------------------------
# backends: each takes logits as a (B, K, S) view with the caller's strides ((N, K) is
# (N, K, 1)), targets (B, S), fills ``grad`` (laid out as the logits, or the logits
# themselves) and ``lse`` (B·S,), and returns (per-position loss w_y·ℓ (B·S,) in b-major order,
# Σw of the counted positions)
# --------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_float64(vector: Optional[Tensor]):
    return None if vector is None else vector.detach().to("cpu", torch.float64).contiguous().numpy()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _num_positions(logits: Tensor) -> int:
    """B·S of (B, K, S) logits ((N, K) logits are S = 1): the number of per-position losses."""
    return logits.shape[0] * (logits.shape[2] if logits.dim() == 3 else 1)


def _cpp_forward(logits, target, weight, alpha, grad, lse, loss, params, ignore_index, mean):
    from . import _C

    rows = torch.empty(_num_positions(logits), dtype=_accumulation_dtype(logits.dtype))
    total = _C.loss_forward(
        _backend.cpu_buffer(logits), _backend.cpu_buffer(target), _backend.cpu_buffer(grad), rows.numpy(),
        lse.numpy(), _dtype_name(logits.dtype), LOSSES.index(loss), params["label_smoothing"], params["gamma"],
        params["kappa"], params["beta"], params["lse_square_scale"], params["softcap"], _as_float64(weight),
        _as_float64(alpha), ignore_index, mean, torch.get_num_threads(),
    )
    return rows, total


def _class_last(logits: Tensor) -> Tensor:
    """(B, K, S) logits as (B·S, K) rows (a copy unless S = 1)."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _torch_forward(logits, target, weight, alpha, grad, lse, loss, params, ignore_index, mean):
    z = _class_last(logits).to(_accumulation_dtype(logits.dtype))
    target = target.reshape(-1)
    rows, g, row_lse = reference.rows_and_grad(loss, z, target, weight, alpha, ignore_index, **params)
    total = reference.total_weight(target, weight, ignore_index, z.dtype)
    g = g.reshape(logits.shape[0], logits.shape[2], logits.shape[1]).movedim(-1, 1)
    grad.copy_(g / total if mean else g)
    lse.copy_(row_lse)
    return rows, total


def _triton_forward(logits, target, weight, alpha, grad, lse, loss, params, ignore_index, mean):
    from .triton_kernels import losses as kernels

    # The row kernel takes (N, K) rows with contiguous classes.
    rows_logits = _class_last(logits).contiguous()
    direct = grad.shape[2] == 1 and grad.stride(1) == 1
    rows_grad = grad[:, :, 0] if direct else torch.empty_like(rows_logits)
    out = kernels.loss_forward(rows_logits, target.reshape(-1), weight, alpha, rows_grad, LOSSES.index(loss), params,
                               ignore_index, mean, lse)
    if not direct:
        grad.copy_(rows_grad.reshape(logits.shape[0], logits.shape[2], logits.shape[1]).movedim(-1, 1))
    return out


_BACKEND_FORWARD = {"cpp": _cpp_forward, "torch": _torch_forward, "triton": _triton_forward}


def _check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target: value {int(target[i])} at index {i} is out of range [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )


def _reduce(rows: Tensor, total, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return rows.to(dtype)
    value = rows.sum()
    if reduction == "mean":
        value = value / total
    return value.to(dtype)


def _forward(logits, target, weight, alpha, grad, lse, loss, params, ignore_index, reduction) -> Tensor:
    """Fills ``grad`` (laid out as the (B, K, S) ``logits``) with ∂(reduced loss)/∂logits
    (per-position losses' gradients for "none") and ``lse`` (B·S,) with each position's
    log-sum-exp, and returns the reduced loss in the logits' dtype. (N, K) logits with (N,)
    targets are taken as S = 1."""
    if logits.dim() == 2:
        logits, grad, target = logits[:, :, None], grad[:, :, None], target[:, None]
    backend = _backend.backend_for(logits)
    if backend != "cpp" and target.device.type == "cpu":
        _check_target_values(target.reshape(-1), logits.shape[1], ignore_index)
    rows, total = _BACKEND_FORWARD[backend](
        logits, target, weight, alpha, grad, lse, loss, params, ignore_index, reduction == "mean"
    )
    return _reduce(rows, total, reduction, logits.dtype)


# --------------------------------------------------------------------------------------------
# vocabulary parallelism: each rank holds a slice of the K columns
# --------------------------------------------------------------------------------------------
def _combine_row_stats(stats: Tensor, loss: str, group) -> None:
    """All-reduces the per-slice statistics (max, Σexp(z − max), z_y, Σ w_j z_j, NaN flag)
    into the whole row's: the max first, then the sums rescaled to it."""
    import torch.distributed as dist

    if loss != "rescaled_mse":
        global_max = stats[:, 0].clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescale = torch.where(stats[:, 1] > 0, torch.exp(stats[:, 0] - global_max), 0.0)
        stats[:, 1] *= rescale
        stats[:, 0] = global_max
    sums = stats[:, 1:].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    stats[:, 1:] = sums


def _vocab_parallel_forward(logits, target, weight, grad, lse, loss, params, ignore_index, reduction, group):
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_local = logits.shape[1]
    total_classes, start = num_local * world, rank * num_local
    if target.device.type == "cpu":
        _check_target_values(target, total_classes, ignore_index)
    total = reference.total_weight(target, weight, ignore_index, _accumulation_dtype(logits.dtype))
    backend = _backend.backend_for(logits)
    logits = logits.contiguous()
    if backend == "cpp":
        from . import _C

        acc = _accumulation_dtype(logits.dtype)
        stats = torch.empty(logits.shape[0], 5, dtype=acc)
        common = dict(dtype=_dtype_name(logits.dtype), kind=LOSSES.index(loss),
                      label_smoothing=params["label_smoothing"], softcap=params["softcap"],
                      class_weight=_as_float64(weight), ignore_index=ignore_index, vocab_start=start,
                      total_classes=total_classes, num_threads=torch.get_num_threads())
        _C.loss_row_stats(_backend.cpu_buffer(logits), _backend.cpu_buffer(target), stats.numpy(), **common)
        _combine_row_stats(stats, loss, group)
        rows = torch.empty(logits.shape[0], dtype=acc)
        _C.loss_from_stats(_backend.cpu_buffer(logits), _backend.cpu_buffer(target), stats.numpy(),
                           _backend.cpu_buffer(grad), rows.numpy(), lse.numpy(), gamma=params["gamma"],
                           kappa=params["kappa"], beta=params["beta"], z_loss=params["lse_square_scale"], alpha=None,
                           mean=reduction == "mean", total_weight=float(total), **common)
    elif backend == "triton":
        from .triton_kernels import losses as kernels

        kind = LOSSES.index(loss)
        stats = kernels.row_stats(logits, target, weight, kind, params, ignore_index, start, total_classes)
        _combine_row_stats(stats, loss, group)
        rows, _ = kernels.loss_from_stats(logits, target, stats, weight, None, grad, kind, params, ignore_index,
                                          reduction == "mean", start, total_classes, lse)
    else:
        pieces = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(pieces, logits, group=group)
        z = torch.cat(pieces, dim=1).to(_accumulation_dtype(logits.dtype))
        rows, g, row_lse = reference.rows_and_grad(loss, z, target, weight, None, ignore_index, **params)
        g = g[:, start:start + num_local]
        grad.copy_(g / total if reduction == "mean" else g)
        lse.copy_(row_lse)
    return _reduce(rows, total, reduction, logits.dtype)


class _VocabParallelLoss(torch.autograd.Function):
    """Loss over logits whose K columns are split across the ranks of ``group`` (each holds an
    equal contiguous slice, rank r columns [r·K_r, (r+1)·K_r)): three all-reduces of N-vectors
    per forward, none in backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, loss, params, ignore_index, reduction, group):
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=_accumulation_dtype(logits.dtype), device=logits.device)
        value = _vocab_parallel_forward(logits, target, weight, grad, lse, loss, params, ignore_index, reduction,
                                        group)
        _keep_gradient(ctx, grad, reduction, lse)
        return value, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        return _stored_gradient(ctx, grad_loss, inplace=False, other_inputs=7)


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
                buffer = torch.empty(shape, dtype=dtype)
                self._buffer = buffer
            return buffer.view(shape)

    def release(self) -> None:
        """Drop the kept buffer (its memory returns once nothing else uses it)."""
        with self._lock:
            self._buffer = None


_workspace = _GradientWorkspace()
release_workspace = _workspace.release


def _new_gradient(logits: Tensor) -> Tensor:
    """A gradient buffer laid out as ``logits`` (the workspace when they are contiguous)."""
    if logits.device.type == "cpu" and logits.is_contiguous() and hasattr(torch._C, "_storage_Use_Count"):
        return _workspace.take(logits.shape, logits.dtype)
    return torch.empty_like(logits)


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------
def _params(label_smoothing, gamma, kappa, beta, lse_square_scale, softcap) -> dict:
    return {"label_smoothing": label_smoothing, "gamma": gamma, "kappa": kappa, "beta": beta,
            "lse_square_scale": lse_square_scale, "softcap": softcap}


def _new_lse(logits: Tensor) -> Tensor:
    return torch.empty(_num_positions(logits), dtype=_accumulation_dtype(logits.dtype), device=logits.device)


@torch.library.custom_op("ncfast::fused_loss", mutates_args=(), device_types=None)
def fused_loss(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Optional[Tensor], loss: str,
    label_smoothing: float, gamma: float, kappa: float, beta: float, ignore_index: int, reduction: str,
    lse_square_scale: float = 0.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and its gradient in one pass on (B, K, S) ``logits`` (any strides) and (B, S)
    ``target`` ((N, K) and (N,) are S = 1): ``(loss, grad, lse)`` with ``grad`` of the logits'
    shape, dtype and layout and ``lse`` (B·S,) each position's log-sum-exp (fp32; fp64 for fp64
    logits; 0 for ignored positions and the MSE). ``loss`` is one of :data:`LOSSES`; see
    :func:`cross_entropy`."""
    grad, lse = _new_gradient(logits), _new_lse(logits)
    params = _params(label_smoothing, gamma, kappa, beta, lse_square_scale, softcap)
    value = _forward(logits, target, weight, alpha, grad, lse, loss, params, ignore_index, reduction)
    return value, grad, lse


@fused_loss.register_fake
def _(logits, target, weight, alpha, loss, label_smoothing, gamma, kappa, beta, ignore_index, reduction,
      lse_square_scale=0.0, softcap=0.0):
    value = logits.new_empty((_num_positions(logits),) if reduction == "none" else ())
    return value, torch.empty_like(logits), _new_lse(logits)


@torch.library.custom_op("ncfast::fused_loss_", mutates_args=("logits",), device_types=None)
def fused_loss_(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Optional[Tensor], loss: str,
    label_smoothing: float, gamma: float, kappa: float, beta: float, ignore_index: int, reduction: str,
    lse_square_scale: float = 0.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """As :func:`fused_loss`, but the gradient overwrites ``logits``; returns ``(loss, lse)``."""
    params = _params(label_smoothing, gamma, kappa, beta, lse_square_scale, softcap)
    lse = _new_lse(logits)
    # Every backend reads each element before it writes its gradient, in any layout.
    return _forward(logits, target, weight, alpha, logits, lse, loss, params, ignore_index, reduction), lse


@fused_loss_.register_fake
def _(logits, target, weight, alpha, loss, label_smoothing, gamma, kappa, beta, ignore_index, reduction,
      lse_square_scale=0.0, softcap=0.0):
    return logits.new_empty((_num_positions(logits),) if reduction == "none" else ()), _new_lse(logits)


def _scale_gradient(grad: Tensor, grad_loss: Optional[Tensor], reduction: str, inplace: bool) -> Optional[Tensor]:
    """grad · grad_loss. The usual ``loss.backward()`` passes exactly 1: then the stored
    gradient is returned as it is, with no pass over N×K (checked on CPU only: no host sync on
    CUDA). Otherwise the product is a new tensor, so that the graph can be run again
    (``retain_graph``, gradcheck) — except with ``inplace_backward``, which scales in place
    (a second backward then raises, since the stored gradient's version changed)."""
    if grad_loss is None:  # the loss itself took no part in what is differentiated
        return None
    # "none": one factor per position, (B, 1, S) against a (B, K, S) gradient, (N, 1) against (N, K).
    factor = grad_loss.reshape((grad.shape[0], 1) + grad.shape[2:]) if reduction == "none" else grad_loss
    if (reduction != "none" and grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            and float(grad_loss) == 1.0):
        return grad
    if inplace and not torch.compiler.is_compiling():
        return grad.mul_(factor)
    return grad * factor


def _keep_gradient(ctx, grad: Tensor, reduction: str, *without_gradient: Tensor) -> None:
    """Saves the forward's gradient for the backward. The other outputs (the lse, the gradient
    output of the functional op) take no gradient, and autograd need not fill zeros for them."""
    ctx.reduction = reduction
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(*without_gradient)
    ctx.set_materialize_grads(False)


def _stored_gradient(ctx, grad_loss, inplace: bool, other_inputs: int) -> tuple:
    (grad,) = ctx.saved_tensors
    return (_scale_gradient(grad, grad_loss, ctx.reduction, inplace),) + (None,) * other_inputs


def _setup_context(ctx, inputs, output):
    _keep_gradient(ctx, output[1], inputs[10], output[1], output[2])


def _backward(ctx, grad_loss, _grad_of_grad, _grad_of_lse):
    return _stored_gradient(ctx, grad_loss, inplace=False, other_inputs=12)


torch.library.register_autograd("ncfast::fused_loss", _backward, setup_context=_setup_context)


class _InplaceFusedLoss(torch.autograd.Function):
    """``inplace_backward=True``: the logits' storage holds the gradient after the forward.

    The op bumps the logits' version counter, so a tensor that autograd saved elsewhere and
    that shares this storage raises at backward instead of silently using the gradient."""

    @staticmethod
    def forward(ctx, logits, *args):
        value, lse = torch.ops.ncfast.fused_loss_(logits, *args)
        _keep_gradient(ctx, logits, args[9], lse)
        return value, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        return _stored_gradient(ctx, grad_loss, inplace=True, other_inputs=12)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def loss_options(loss: str, num_classes: int, device: torch.device, label_smoothing=0.0, gamma=0.0, alpha=None,
                 kappa=1.0, beta=0.0, lse_square_scale=0.0, softcap=None) -> tuple[dict, Optional[Tensor]]:
    """Checks the hyper-parameters of ``loss`` (the others keep their neutral values) and returns
    them as the ops' keyword arguments, with ``alpha`` as a float64 (K,) tensor or None."""
    params = _params(0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    if loss == "cross_entropy":
        params["label_smoothing"] = _checks.finite_float("label_smoothing", label_smoothing, lambda a: 0 <= a < 1,
                                                         "a value in [0, 1)")
        params["lse_square_scale"] = _checks.finite_float("lse_square_scale", lse_square_scale, lambda v: v >= 0,
                                                          "a finite value >= 0")
        if softcap is not None:
            params["softcap"] = _checks.finite_float("softcap", softcap, lambda v: v > 0, "None or a finite value > 0")
    elif loss == "focal":
        params["gamma"] = _checks.finite_float("gamma", gamma, lambda g: g >= 0, "a finite value >= 0")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            value = _checks.finite_float("alpha", alpha, lambda a: True, "a finite value")
            alpha = torch.full((num_classes,), value, dtype=torch.float64, device=device)
        elif alpha is not None and not isinstance(alpha, Tensor):
            alpha = torch.as_tensor(alpha, dtype=torch.float64, device=device)
    else:
        params["kappa"] = _checks.finite_float("kappa", kappa, lambda k: k > 0, "a finite value > 0")
        params["beta"] = _checks.finite_float("beta", beta, lambda b: True, "a finite value")
    return params, alpha


def _as_rows(logits: Tensor, target: Tensor):
    """torch's conventions: (K,) with a scalar target, (N, K) with (N,), or (N, K, d1, ...)
    with (N, d1, ...). Returns the logits as a (B, K, S) view with their own strides (S = d1·d2·…,
    1 for (N, K); a copy only where the trailing dims cannot be flattened in place), the
    target as (B, S) int64 and the shape of a per-sample output."""
    _checks.float_tensor("logits", logits, "(N, K)")
    _checks.class_indices("target", target, " (probability targets are not supported)")
    if target.device != logits.device:
        raise ValueError(f"target: is on {target.device} but logits are on {logits.device}")
    if logits.dim() == 0:
        raise ValueError("logits: expected shape (K,), (N, K) or (N, K, d1, ...), got a scalar")
    if logits.dim() == 1:
        expected = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target: expected shape {expected} for logits of shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0:
        raise ValueError("logits: the class dimension is empty (K = 0)")
    if logits.dim() == 1:
        logits = logits[None, :, None]
    else:
        logits = logits.reshape(logits.shape[0], num_classes, math.prod(logits.shape[2:]))
    return logits, target.reshape(logits.shape[0], logits.shape[2]).to(torch.int64), expected


def _flattens_in_place(logits: Tensor) -> bool:
    """Whether the trailing dims of (N, K, d1, ...) logits merge into one without a copy (torch's
    rule for a view: each dim's stride is the next one's stride times its size)."""
    dims = [(size, stride) for size, stride in zip(logits.shape[2:], logits.stride()[2:]) if size != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(dims, dims[1:]))


def _fused(loss, logits, target, weight, ignore_index, reduction, inplace_backward, return_lse=False,
           process_group=None, **options):
    _checks.reduction(reduction)
    _checks.integer("ignore_index", ignore_index)
    rows_logits, rows_target, sample_shape = _as_rows(logits, target)
    num_classes = rows_logits.shape[1]
    if process_group is not None:
        import torch.distributed as dist

        num_classes *= dist.get_world_size(process_group)
    params, alpha = loss_options(loss, num_classes, logits.device, **options)
    if weight is not None:
        weight = _checks.class_vector("weight", weight, num_classes, logits.device, "logits")
    if alpha is not None:
        alpha = _checks.class_vector("alpha", alpha, num_classes, logits.device, "logits")
    if process_group is not None:
        if inplace_backward:
            raise ValueError("inplace_backward: not supported together with process_group")
        value, lse = _VocabParallelLoss.apply(_class_last(rows_logits), rows_target.reshape(-1), weight, loss, params,
                                              ignore_index, reduction, process_group)
    else:
        args = (rows_target, weight, alpha, loss, params["label_smoothing"], params["gamma"], params["kappa"],
                params["beta"], ignore_index, reduction, params["lse_square_scale"], params["softcap"])
        if inplace_backward:
            if not _flattens_in_place(logits):
                raise ValueError(f"inplace_backward: the trailing dims of logits {tuple(logits.shape)} with strides "
                                 f"{logits.stride()} cannot be flattened in place; make the logits contiguous first")
            value, lse = _InplaceFusedLoss.apply(rows_logits, *args)
        else:
            value, _, lse = torch.ops.ncfast.fused_loss(rows_logits, *args)
    if reduction == "none":
        value = value.reshape(sample_shape)
    return (value, lse.reshape(sample_shape)) if return_lse else value


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, inplace_backward: bool = False,
    lse_square_scale: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
    process_group=None,
):
    """Cross-entropy with label smoothing, fused with its gradient; a drop-in for
    :func:`torch.nn.functional.cross_entropy` with class-index targets.

    ℓ_i = lse(z_i) − Σ_j q_j z_ij with q = (1−α)e_y + α/K (seed 002 eq. (3), (5)), plus the
    z-loss λ·lse(z_i)² when ``lse_square_scale`` = λ > 0.

    Args:
        logits: (N, K), (K,) or (N, K, d1, ...), float32/float64/bfloat16/float16.
        target: (N,), () or (N, d1, ...) integer class indices in [0, K) or ``ignore_index``.
        weight: optional (K,) class weights; "mean" divides by Σ_i w_{y_i}, as torch does.
        ignore_index: rows with this target have loss 0, gradient 0 and do not count in "mean".
        reduction: "mean", "sum" or "none" (per-sample losses of the target's shape).
        label_smoothing: α in [0, 1).
        inplace_backward: write the gradient into ``logits``' storage (saves an N×K buffer;
            ``logits`` holds the gradient afterwards).
        lse_square_scale: λ ≥ 0 of the z-loss λ·lse² (PaLM), which keeps the log-partition near 0.
        softcap: if given (> 0), the logits are first capped to softcap·tanh(z/softcap) (Gemma 2).
        return_lse: also return each sample's log-sum-exp (fp32; fp64 for fp64 logits; 0 for
            ignored samples), as a tensor that does not take gradients.
        process_group: a ``torch.distributed`` group across which the classes are split: each
            rank passes its (N, K/world) slice of the logits, rank r holding columns
            [r·K/world, (r+1)·K/world); targets and ``weight`` are global. Every rank gets the
            loss of the full rows and the gradient of its slice.

    Returns: the loss, in the logits' dtype (and the lse with ``return_lse``). A row with NaN or
    +inf among its logits has loss and gradient NaN (as torch); −inf logits are masked classes.
    """
    return _fused("cross_entropy", logits, target, weight, ignore_index, reduction, inplace_backward,
                  return_lse=return_lse, process_group=process_group, label_smoothing=label_smoothing,
                  lse_square_scale=lse_square_scale, softcap=softcap)


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Union[None, float, Sequence[float], Tensor] = None,
    weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean", inplace_backward: bool = False,
) -> Tensor:
    """Focal loss ℓ_i = −α_{y_i} (1−p_{y_i})^γ log p_{y_i} (seed 002 eq. (6); Lin et al.), fused
    with its gradient. γ = 0 is cross-entropy exactly; stays finite as p_y → 1 for every γ ≥ 0.

    Args:
        logits, target, weight, ignore_index, reduction, inplace_backward: as :func:`cross_entropy`.
        gamma: the focusing parameter γ ≥ 0.
        alpha: optional per-class factor α_t, a (K,) tensor or sequence, or one float for all
            classes; it scales ℓ and g but not the "mean" divisor (which is Σ w_y).
    """
    return _fused("focal", logits, target, weight, ignore_index, reduction, inplace_backward, gamma=gamma,
                  alpha=alpha)


def rescaled_mse(
    logits: Tensor, target: Tensor, kappa: float = 1.0, beta: float = 1.0, weight: Optional[Tensor] = None,
    ignore_index: int = -100, reduction: str = "mean", inplace_backward: bool = False,
) -> Tensor:
    """Rescaled MSE ℓ_i = κ(z_{i,y} − β)² + Σ_{j≠y} z_ij² (seed 002 eq. (6); seed 000 eq. (4)
    writes (α, M) = (κ, β)); κ = β = 1 is the MSE against one-hot targets, summed over classes.

    "mean" averages the per-sample loss over samples (Σ w_y ℓ / Σ w_y), not over N·K elements
    as :func:`torch.nn.functional.mse_loss` does.

    Args:
        logits, target, weight, ignore_index, reduction, inplace_backward: as :func:`cross_entropy`.
        kappa: weight κ > 0 of the target coordinate.
        beta: target value β of the true-class logit.
    """
    return _fused("rescaled_mse", logits, target, weight, ignore_index, reduction, inplace_backward, kappa=kappa,
                  beta=beta)


class _LossModule(torch.nn.Module):
    def __init__(self, weight: Optional[Tensor], ignore_index: int, reduction: str, inplace_backward: bool):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward


class CrossEntropyLoss(_LossModule):
    """Module form of :func:`cross_entropy`; a drop-in for :class:`torch.nn.CrossEntropyLoss`."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, inplace_backward: bool = False):
        super().__init__(weight, ignore_index, reduction, inplace_backward)
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, self.inplace_backward)


class FocalLoss(_LossModule):
    """Module form of :func:`focal_loss`."""

    def __init__(self, gamma: float = 2.0, alpha: Union[None, float, Sequence[float], Tensor] = None,
                 weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 inplace_backward: bool = False):
        super().__init__(weight, ignore_index, reduction, inplace_backward)
        self.gamma = gamma
        if alpha is not None and not isinstance(alpha, (int, float)):
            alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return focal_loss(input, target, self.gamma, self.alpha, self.weight, self.ignore_index, self.reduction,
                          self.inplace_backward)


class RescaledMSELoss(_LossModule):
    """Module form of :func:`rescaled_mse`."""

    def __init__(self, kappa: float = 1.0, beta: float = 1.0, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean", inplace_backward: bool = False):
        super().__init__(weight, ignore_index, reduction, inplace_backward)
        self.kappa = kappa
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return rescaled_mse(input, target, self.kappa, self.beta, self.weight, self.ignore_index, self.reduction,
                            self.inplace_backward)
