"""The fused loss family: cross-entropy with label smoothing, focal loss and rescaled MSE
(Zhou, You, Li, Liu, Liu, Qu, Zhu, NeurIPS 2022, "Are All Losses Created Equal: A Neural
Collapse Perspective", eq. (3)–(6)), each computing loss and gradient in one pass.

Layers, top to bottom:

* public functions (``cross_entropy``, ``focal_loss``, ``rescaled_mse``) and ``nn.Module``s:
  argument checking (once per distinct set of arguments, into a
  :class:`~ncfast.loss_options.LossOptions` record) and torch's shape conventions;
* two ``torch.library`` ops, ``ncfast::fused_loss`` (functional, returns ``(loss, grad, lse)``)
  and ``ncfast::fused_loss_`` (writes the gradient into the logits' own storage, for
  ``inplace_backward=True``); the options record is flattened once at the op boundary and
  rebuilt by name behind it. Their autograd (first and second order, torch.func) is in
  :mod:`ncfast.loss_autograd`, whose eager route calls the backends directly (the custom-op
  dispatcher costs more than a small call's kernel);
* backend dispatch to the C++ kernel (CPU), the Triton kernel (CUDA) or the torch reference, in
  :mod:`ncfast.loss_backends`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, loss_autograd
from .loss_backends import (check_op_shapes, class_last, forward, new_gradient, new_lse, num_positions,
                            release_workspace)
from .loss_options import LOSSES, OPTIONS_SCHEMA, LossOptions, alpha_vector, checked_options, loss_options

REDUCTIONS = _checks.REDUCTIONS
__all__ = ["LOSSES", "LossOptions", "loss_options", "cross_entropy", "focal_loss", "rescaled_mse",
           "CrossEntropyLoss", "FocalLoss", "RescaledMSELoss", "release_workspace"]


# --------------------------------------------------------------------------------------------
# torch.library ops: the options record is flattened here, once, and rebuilt by name behind it
# --------------------------------------------------------------------------------------------
_INPUTS_SCHEMA = "Tensor? weight, Tensor? alpha, " + OPTIONS_SCHEMA


def _fused_loss(logits: Tensor, target: Tensor, weight, alpha, *options) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and its gradient in one pass on (B, K, S) ``logits`` (any strides) and (B, S)
    ``target`` ((N, K) and (N,) are S = 1; probability targets are (N, K)): ``(loss, grad, lse)``
    with ``grad`` of the logits' shape, dtype and layout and ``lse`` (B·S,) each position's
    log-sum-exp (fp32; fp64 for fp64 logits; 0 for ignored positions and the MSE). ``options``
    are the fields of :class:`LossOptions`, in order."""
    check_op_shapes(logits, target, weight, alpha)
    grad, lse = new_gradient(logits), new_lse(logits)
    value = forward(logits, target, weight, alpha, grad, lse, LossOptions(*options))
    return value, grad, lse


def _fused_loss_(logits: Tensor, target: Tensor, weight, alpha, *options) -> tuple[Tensor, Tensor]:
    """As :func:`_fused_loss`, but the gradient overwrites ``logits``; returns ``(loss, lse)``.
    Every backend reads each element before it writes its gradient, in any layout."""
    check_op_shapes(logits, target, weight, alpha)
    lse = new_lse(logits)
    return forward(logits, target, weight, alpha, logits, lse, LossOptions(*options)), lse


def _loss_shape(logits: Tensor, options) -> tuple:
    return (num_positions(logits),) if LossOptions(*options).reduction == "none" else ()


fused_loss = torch.library.custom_op(
    "ncfast::fused_loss", _fused_loss, mutates_args=(), device_types=None,
    schema=f"(Tensor logits, Tensor target, {_INPUTS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)
fused_loss_ = torch.library.custom_op(
    "ncfast::fused_loss_", _fused_loss_, mutates_args=("logits",), device_types=None,
    schema=f"(Tensor(a!) logits, Tensor target, {_INPUTS_SCHEMA}) -> (Tensor, Tensor)",
)


@fused_loss.register_fake
def _(logits, target, weight, alpha, *options):
    value = logits.new_empty(_loss_shape(logits, options))
    return value, torch.empty_like(logits), new_lse(logits)


@fused_loss_.register_fake
def _(logits, target, weight, alpha, *options):
    return logits.new_empty(_loss_shape(logits, options)), new_lse(logits)


torch.library.register_autograd("ncfast::fused_loss", loss_autograd.backward, setup_context=loss_autograd.setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _as_rows(logits: Tensor, target: Tensor):
    """torch's conventions: (K,) with a scalar target, (N, K) with (N,), or (N, K, d1, ...)
    with (N, d1, ...); probability targets have the logits' shape. Returns, for class indices,
    the logits as a (B, K, S) view with their own strides (S = d1·d2·…; a copy only where the
    trailing dims cannot be flattened in place) and the target as (B, S) int64, or (N, K)
    logits as they are with (N,) int64 targets ((K,) logits are (1, K, 1)); for
    probability targets (N·d1·…, K) class-last logits and targets; and the shape of a
    per-sample output."""
    if (isinstance(logits, Tensor) and isinstance(target, Tensor) and target.dtype is torch.int64
            and logits.dtype in _checks.FLOAT_DTYPES and logits.dim() == 2 and target.dim() == 1
            and target.shape[0] == logits.shape[0] and logits.shape[1] and target.device == logits.device):
        return logits, target, target.shape  # the usual call, every check below passed, nothing to reshape
    _checks.float_tensor("logits", logits, "(N, K)")
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a tensor, got {type(target).__name__}")
    soft = target.is_floating_point()
    if not soft:
        _checks.class_indices("target", target)
    if target.device != logits.device:
        raise ValueError(f"target: is on {target.device} but logits are on {logits.device}")
    if logits.dim() == 0:
        raise ValueError("logits: expected shape (K,), (N, K) or (N, K, d1, ...), got a scalar")
    if logits.dim() == 1:
        expected = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if soft and target.shape != logits.shape:
        raise TypeError(f"target: expected integer class indices of shape {expected} or probabilities of the "
                        f"logits' shape {tuple(logits.shape)}, got {target.dtype} of shape {tuple(target.shape)}")
    if not soft and tuple(target.shape) != expected:
        raise ValueError(f"target: expected shape {expected} for logits of shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0:
        raise ValueError("logits: the class dimension is empty (K = 0)")
    if logits.dim() == 1:
        logits = logits[None] if soft else logits[None, :, None]
        target = target[None] if soft else target
    elif soft:
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
        target = target.movedim(1, -1).reshape(-1, num_classes)
    elif logits.dim() > 2:
        logits = logits.reshape(logits.shape[0], num_classes, math.prod(logits.shape[2:]))
    if soft:
        return logits, target, expected
    if logits.dim() == 2:
        return logits, target.to(torch.int64), expected
    return logits, target.reshape(logits.shape[0], logits.shape[2]).to(torch.int64), expected


def _flattens_in_place(logits: Tensor) -> bool:
    """Whether the trailing dims of (N, K, d1, ...) logits merge into one without a copy (torch's
    rule for a view: each dim's stride is the next one's stride times its size)."""
    dims = [(size, stride) for size, stride in zip(logits.shape[2:], logits.stride()[2:]) if size != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(dims, dims[1:]))


def _fused(loss, logits, target, weight, inplace_backward, return_lse=False, process_group=None, alpha=None,
           **arguments):
    rows_logits, rows_target, sample_shape = _as_rows(logits, target)
    num_classes = rows_logits.shape[1]
    options = checked_options(loss, **arguments)
    if alpha is not None:
        alpha = alpha_vector(alpha, num_classes, logits.device)
    if rows_target.is_floating_point():
        _check_soft_target(options, process_group, inplace_backward)
    if weight is not None and process_group is None:  # else the ranks' slices give K
        weight = _checks.class_vector("weight", weight, num_classes, logits.device, "logits")
    if alpha is not None:
        alpha = _checks.class_vector("alpha", alpha, num_classes, logits.device, "logits")
    lse = None
    if process_group is not None:
        from . import vocab_parallel

        if inplace_backward:
            raise ValueError("inplace_backward: not supported together with process_group")
        value, lse = vocab_parallel.loss(class_last(rows_logits), rows_target.reshape(-1), weight, options,
                                         process_group)
    elif inplace_backward:
        soft = rows_target.is_floating_point()
        if logits.dim() > 2 and (soft or not _flattens_in_place(logits)):
            raise ValueError(f"inplace_backward: logits of shape {tuple(logits.shape)} with strides {logits.stride()} "
                             "cannot be used in place here (probability targets, or trailing dims that do not "
                             "flatten without a copy); make the logits (N, K) or contiguous first")
        _checks.no_internal_overlap("logits", rows_logits, "inplace_backward=True")
        if soft and rows_target.requires_grad and torch.is_grad_enabled():
            raise ValueError("inplace_backward: the gradient of probability targets needs inplace_backward=False")
        value, lse = loss_autograd.InplaceFusedLoss.apply(rows_logits, rows_target, weight, alpha, *options)
    elif torch.compiler.is_compiling():  # the op, whose autograd is registered: dynamo traces no custom jvp
        value, _, lse = torch.ops.ncfast.fused_loss(rows_logits, rows_target, weight, alpha, *options)
    elif torch._C._functorch.maybe_current_level() is None:  # no torch.func transform around this call
        lse = new_lse(rows_logits) if return_lse else None
        if _functorch_wrapped(rows_logits, rows_target, weight, alpha):  # left over from a finished transform
            value = loss_autograd.FusedLossEager.apply(rows_logits, rows_target, weight, alpha, options, lse)
        else:
            value = loss_autograd.apply_eager(rows_logits, rows_target, weight, alpha, options, lse)
    else:
        value, _, lse = loss_autograd.FusedLoss.apply(rows_logits, rows_target, weight, alpha, *options)
    if options.reduction == "none" and logits.dim() != 2:  # (N, K) logits: the rows are the samples already
        value = value.reshape(sample_shape)
    return (value, lse.reshape(sample_shape)) if return_lse else value


def _functorch_wrapped(*tensors) -> bool:
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for tensor in tensors:
        if tensor is not None and is_wrapped(tensor):
            return True
    return False


def _check_soft_target(options: LossOptions, process_group, inplace_backward) -> None:
    if options.loss != "cross_entropy":
        raise TypeError(f"target: probability targets are defined for cross-entropy only; {options.loss} takes "
                        "integer class indices")
    if options.lse_square_scale:
        raise ValueError("lse_square_scale: the z-loss is defined for class-index targets only")
    if process_group is not None:
        raise ValueError("process_group: vocabulary parallelism takes class-index targets only")


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, inplace_backward: bool = False,
    lse_square_scale: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
    process_group=None,
):
    """Cross-entropy with label smoothing, fused with its gradient; a drop-in for
    :func:`torch.nn.functional.cross_entropy` (class-index and probability targets).

    ℓ_i = lse(z_i) − Σ_j q_j z_ij with q = (1−α)e_y + α/K (Zhou et al. 2022, eq. (3), (5)), plus
    the z-loss λ·lse(z_i)² when ``lse_square_scale`` = λ > 0. With probability targets q_i
    (mixup, distillation), ℓ_i = −Σ_j w_j q'_ij log p_ij, q' = (1−α) q_i + α/K, as torch.

    Args:
        logits: (N, K), (K,) or (N, K, d1, ...), float32/float64/bfloat16/float16.
        target: (N,), () or (N, d1, ...) integer class indices in [0, K) or ``ignore_index``;
            or probabilities of the logits' shape (any float dtype; ``ignore_index`` does not
            apply, "mean" divides by the number of samples, and the target gets a gradient
            when it requires one).
        weight: optional (K,) class weights, of any floating dtype (torch requires the logits'
            dtype; here it is read at the accumulation precision, fp32 or fp64); "mean"
            divides by Σ_i w_{y_i}, as torch does.
        ignore_index: rows with this target have loss 0, gradient 0 and do not count in "mean".
        reduction: "mean", "sum" or "none" (per-sample losses of the target's shape).
        label_smoothing: α in [0, 1].
        inplace_backward: write the gradient into ``logits``' storage (saves an N×K buffer;
            ``logits`` holds the gradient afterwards; no second derivative; logits whose
            elements overlap in memory, e.g. ``expand``-ed, are refused).
        lse_square_scale: λ ≥ 0 of the z-loss λ·lse² (PaLM), which keeps the log-partition near 0.
        softcap: if given (≥ 1e-30), the logits are first capped to softcap·tanh(z/softcap) (Gemma 2).
        return_lse: also return each sample's log-sum-exp (fp32; fp64 for fp64 logits; 0 for
            ignored samples), as a tensor that does not take gradients.
        process_group: a ``torch.distributed`` group across which the classes are split: each
            rank passes its (N, K_r) slice of the logits, the slices in rank order (they may
            differ in size); targets and ``weight`` are global. Every rank gets the loss of the
            full rows and the gradient of its slice.

    Returns: the loss, in the logits' dtype (and the lse with ``return_lse``). A row with NaN or
    +inf among its logits has loss and gradient NaN (as torch); −inf logits are masked classes.
    First and second derivatives (``create_graph=True``) and torch.func transforms work.
    """
    return _fused("cross_entropy", logits, target, weight, inplace_backward, return_lse=return_lse,
                  process_group=process_group, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap)


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Union[None, float, Sequence[float], Tensor] = None,
    weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean", inplace_backward: bool = False,
) -> Tensor:
    """Focal loss ℓ_i = −α_{y_i} (1−p_{y_i})^γ log p_{y_i} (Zhou et al. 2022, eq. (6); Lin et al.),
    fused with its gradient. γ = 0 is cross-entropy exactly; stays finite as p_y → 1 for every γ ≥ 0.

    Args:
        logits, target, weight, ignore_index, reduction, inplace_backward: as :func:`cross_entropy`
            (class-index targets only).
        gamma: the focusing parameter γ ≥ 0.
        alpha: optional per-class factor α_t, a (K,) tensor or sequence, or one float for all
            classes; it scales ℓ and g but not the "mean" divisor (which is Σ w_y).
    """
    return _fused("focal", logits, target, weight, inplace_backward, ignore_index=ignore_index, reduction=reduction,
                  gamma=gamma, alpha=alpha)


def rescaled_mse(
    logits: Tensor, target: Tensor, kappa: float = 1.0, beta: float = 1.0, weight: Optional[Tensor] = None,
    ignore_index: int = -100, reduction: str = "mean", inplace_backward: bool = False,
) -> Tensor:
    """Rescaled MSE ℓ_i = κ(z_{i,y} − β)² + Σ_{j≠y} z_ij² (Zhou et al. 2022, eq. (6); Zhou, Li,
    Ding, You, Qu, Zhu, ICML 2022, eq. (4), writes (α, M) = (κ, β)); κ = β = 1 is the MSE
    against one-hot targets, summed over classes.

    "mean" averages the per-sample loss over samples (Σ w_y ℓ / Σ w_y), not over N·K elements
    as :func:`torch.nn.functional.mse_loss` does.

    Args:
        logits, target, weight, ignore_index, reduction, inplace_backward: as :func:`cross_entropy`
            (class-index targets only).
        kappa: weight κ > 0 of the target coordinate.
        beta: target value β of the true-class logit.
    """
    return _fused("rescaled_mse", logits, target, weight, inplace_backward, ignore_index=ignore_index,
                  reduction=reduction, kappa=kappa, beta=beta)


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
                 label_smoothing: float = 0.0, inplace_backward: bool = False, lse_square_scale: float = 0.0,
                 softcap: Optional[float] = None):
        super().__init__(weight, ignore_index, reduction, inplace_backward)
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             self.inplace_backward, self.lse_square_scale, self.softcap)


class FocalLoss(_LossModule):
    """Module form of :func:`focal_loss`."""

    def __init__(self, gamma: float = 2.0, alpha: Union[None, float, Sequence[float], Tensor] = None,
                 weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 inplace_backward: bool = False):
        super().__init__(weight, ignore_index, reduction, inplace_backward)
        self.gamma = gamma
        if isinstance(alpha, (list, tuple)):
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
