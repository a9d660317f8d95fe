"""Autograd of the fused losses (``ncfast::fused_loss`` and ``ncfast::fused_loss_``).

First order: the forward kernel already wrote the gradient; backward only scales it by the
incoming gradient (a scalar for "mean"/"sum", one factor per row for "none") and skips even
that for ``loss.backward()``. When the backward itself is differentiated (``create_graph=True``,
``torch.func.grad``/``hessian``) it instead recomputes the gradient from the saved logits with
differentiable torch ops — the closed form of :func:`ncfast.reference.losses.rows_and_grad`
(Zhou, You, Li, Liu, Liu, Qu, Zhu, NeurIPS 2022, eq. (3)–(6)) — so second derivatives are exact.

Three routes run the same implementation: :class:`FusedLossEager` (eager calls, the cheapest
``apply``), :class:`FusedLoss` (under torch.func transforms, which need ``setup_context``) and
the op itself with its registered autograd (under ``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import accumulation_dtype
from .loss_backends import class_last, forward, new_gradient
from .loss_reduction import mean_scale, total_weight
from .loss_options import LossOptions
from .reference import losses as reference

# ncfast.losses defines the ops and imports this module: it is imported where used, not here.
# Gradients returned for the inputs after the logits: target, weight, alpha and the options.
_NO_GRADIENTS = (None,) * (3 + len(LossOptions._fields))


def eager(logits: Tensor) -> bool:
    """Whether an ncfast op's implementation may run directly, skipping the custom-op dispatcher:
    not while torch.compile traces (it needs the op in its graph) nor on functorch's batched
    tensors (vmap runs the op). Both routes run the same function."""
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(logits)


def is_exactly_one(grad_loss: Tensor) -> bool:
    """Whether an incoming gradient is the scalar 1 of the usual ``loss.backward()``, read only
    from a plain CPU tensor outside tracing (fake and functional tensors have no value)."""
    return type(grad_loss) is Tensor and grad_loss.is_cpu and eager(grad_loss) and float(grad_loss) == 1.0


def _scale_gradient(grad: Tensor, grad_loss: Tensor, reduction: str, inplace: bool) -> Tensor:
    """grad · grad_loss. The usual ``loss.backward()`` passes exactly 1: then the stored
    gradient is returned as it is, with no pass over N×K (checked on plain CPU tensors only:
    no host sync on CUDA). Otherwise the product is a new tensor, so that the graph can be run
    again (``retain_graph``, gradcheck) — except with ``inplace_backward``, which scales in
    place (a second backward then raises, since the stored gradient's version changed)."""
    # "none": one factor per position, (N, 1) against (N, K), (B, 1, S) against (B, K, S).
    if reduction == "none":
        factor = grad_loss.reshape((grad.shape[0], 1) + grad.shape[2:])
    elif is_exactly_one(grad_loss):
        return grad
    else:
        factor = grad_loss
    if inplace and not torch.compiler.is_compiling():
        return grad.mul_(factor)
    return grad * factor


def _as_layout(rows: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`~ncfast.loss_backends.class_last`: (B·S, K) rows laid out as ``like``."""
    return rows if like.dim() == 2 else rows.reshape(like.shape[0], like.shape[2], like.shape[1]).movedim(-1, 1)


def _recomputed_gradients(logits, target, weight, alpha, options: LossOptions, grad_loss, want_target: bool):
    """∂/∂logits (and ∂/∂target for probability targets) of grad_loss · loss, recomputed from
    the logits with differentiable torch ops: the backward of the backward is then autograd's.
    Logits (N, K) with target (N,) or probabilities (N, K), or (B, K, S) with (B, S) or (B, K, S)."""
    acc = accumulation_dtype(logits.dtype)
    z = class_last(logits).to(acc)
    rows_target = class_last(target) if target.is_floating_point() else target.reshape(-1)
    _, grad, _ = reference.rows_and_grad(options.loss, z, rows_target, weight, alpha, options.ignore_index,
                                         **options.params())
    scale = grad_loss.to(acc)
    if options.reduction == "none":
        scale = scale.reshape(-1, 1)
    elif options.reduction == "mean":
        scale = scale * mean_scale(total_weight(rows_target, weight, options.ignore_index, acc))
    d_logits = _as_layout(grad * scale, logits).to(logits.dtype)
    if not want_target:
        return d_logits, None
    d_target = reference.soft_target_grad(z, weight, options.label_smoothing, options.softcap) * scale
    return d_logits, _as_layout(d_target, target).to(target.dtype)


def _keep_for_backward(ctx, logits, target, weight, alpha, options: LossOptions, grad: Tensor) -> None:
    ctx.options = options
    ctx.save_for_backward(grad, logits, target, weight, alpha)


def setup_context(ctx, inputs, output):
    logits, target, weight, alpha, *options = inputs
    _, grad, lse = output
    _keep_for_backward(ctx, logits, target, weight, alpha, LossOptions(*options), grad)
    ctx.mark_non_differentiable(grad, lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_forward(grad)


def _gradients(ctx, grad_loss: Tensor) -> tuple:
    """(∂/∂logits, ∂/∂target) of grad_loss · loss, from what :func:`_keep_for_backward` saved."""
    grad, logits, target, weight, alpha = ctx.saved_tensors
    want_target = ctx.needs_input_grad[1]
    if torch.is_grad_enabled() or want_target:  # create_graph=True, torch.func: a differentiable backward
        return _recomputed_gradients(logits, target, weight, alpha, ctx.options, grad_loss, want_target)
    return _scale_gradient(grad, grad_loss, ctx.options.reduction, inplace=False), None


def backward(ctx, grad_loss, _grad_of_grad, _grad_of_lse):
    if grad_loss is None:  # the loss itself took no part in what is differentiated
        return (None,) + _NO_GRADIENTS
    return _gradients(ctx, grad_loss) + _NO_GRADIENTS[1:]


def jvp(ctx, logits_tangent, *_other_tangents):
    """Forward mode: the loss moves by ⟨g, ż⟩ (per position for "none"); the gradient and lse
    outputs carry no tangent."""
    (grad,) = ctx.saved_tensors
    product = grad * logits_tangent
    return (product.sum(1).reshape(-1) if ctx.options.reduction == "none" else product.sum()), None, None


class FusedLoss(torch.autograd.Function):
    """The functional op with its autograd formula, in the form torch.func transforms take
    (eager mode; under torch.compile the op is called directly)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, alpha, *options):
        from . import losses
        if eager(logits):
            return losses._fused_loss(logits, target, weight, alpha, *options)
        return torch.ops.ncfast.fused_loss(logits, target, weight, alpha, *options)

    setup_context = staticmethod(setup_context)
    backward = staticmethod(backward)
    jvp = staticmethod(jvp)


class FusedLossEager(torch.autograd.Function):
    """:class:`FusedLoss` for eager calls outside every torch.func transform: the same
    formulas in the older form, whose ``apply`` neither binds the arguments through
    ``inspect.signature`` nor walks nine option arguments (the record travels whole). Its one
    output is the loss: the gradient stays inside, and the lse goes into the ``lse`` buffer
    passed in (None: not wanted, and the C++ kernel skips it). Each of these costs µs a call,
    more than a small call's kernel. (Forward mode, ``torch.func.jvp``, runs
    :class:`FusedLoss`.) The caller, a public loss function, has checked every shape."""

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, options, lse):
        grad = new_gradient(logits)
        value = forward(logits, target, weight, alpha, grad, lse, options)
        _keep_for_backward(ctx, logits, target, weight, alpha, options, grad)
        return value

    @staticmethod
    def backward(ctx, grad_loss):
        return _gradients(ctx, grad_loss) + (None, None, None, None)


# ``FusedLossEager.apply`` without ``torch.autograd.Function.apply``'s Python wrapper, whose only
# work outside torch.func transforms is unwrapping tensors left over from finished transforms
# (callers check that none is passed): several µs of a small call.
apply_eager = super(torch.autograd.Function, FusedLossEager).apply


def keep_gradient(ctx, grad: Tensor, reduction: str, lse: Tensor) -> None:
    """Saves the forward's gradient for a first-order backward that only scales it; the lse
    takes no gradient, and autograd need not fill zeros for it."""
    ctx.reduction = reduction
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


class InplaceFusedLoss(torch.autograd.Function):
    """``inplace_backward=True``: the logits' storage holds the gradient after the forward.

    The op bumps the logits' version counter, so a tensor that autograd saved elsewhere and
    that shares this storage raises at backward instead of silently using the gradient. The
    logits themselves are gone, so no second derivative: ``create_graph=True`` raises."""

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, *options):
        from . import losses
        if eager(logits):
            value, lse = losses._fused_loss_(logits, target, weight, alpha, *options)
            torch.autograd.graph.increment_version(logits)  # as the op's dispatcher does for a mutated input
        else:
            value, lse = torch.ops.ncfast.fused_loss_(logits, target, weight, alpha, *options)
        keep_gradient(ctx, logits, LossOptions(*options).reduction, lse)
        return value, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "inplace_backward=True: the logits' storage was overwritten by the gradient, so the loss has no "
                "second derivative (create_graph=True); call the loss with inplace_backward=False"
            )
        if grad_loss is None:
            return (None,) + _NO_GRADIENTS
        (grad,) = ctx.saved_tensors
        # A new tensor over the logits' storage: the saved one is the logits tensor itself, which the
        # caller holds, so autograd would copy it into .grad (N×K more memory) instead of taking it.
        return (_scale_gradient(grad, grad_loss, ctx.reduction, inplace=True).detach(),) + _NO_GRADIENTS
