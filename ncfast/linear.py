"""Fused linear + loss: ``<loss>(H Wᵀ + b, y)`` and its gradients for H, W and b
without ever holding the (N, K) logits.

The rows are processed in chunks of ``C`` rows, ``C`` chosen from the shapes and the cache
size (:func:`chunk_rows`: a cache-sized chunk, but enough rows for the GEMMs to run at full
speed, and at most ``chunk_memory`` bytes). Per chunk ``c``:

1. ``Z_c = H_c Wᵀ + b`` — one GEMM, the bias added by its epilogue (oneDNN's inner product for
   fp32 on CPU, :mod:`ncfast._matmul`; ``torch.addmm`` elsewhere);
2. the fused loss kernel (``ncfast::fused_loss_``, C++ on CPU, Triton on CUDA) overwrites
   ``Z_c`` with ``G_c = ∂ℓ/∂Z_c`` and returns the per-row losses;
3. ``dH_c = G_c W`` (oneDNN for fp32 on CPU), ``dW += G_cᵀ H_c`` (``addmm_``, accumulating in
   place: oneDNN has no accumulating form) and ``db += Σ_rows G_c`` (one pass over the cached
   chunk).

Extra memory is one chunk (C·K) plus the gradients themselves (N·d + K·d + K); no copy of W
or H. The work is the three GEMMs the unfused computation needs (6·N·K·d flops) plus one read
and one write of each chunk by the loss kernel and one read for db.

Like Liger's and cut-cross-entropy's fused linear cross-entropy, the gradients are computed
in the forward pass (where the chunk of logits exists anyway) and the backward pass only
scales them by the incoming scalar gradient (or, for the usual factor of exactly 1 on CPU, hands
them over as they are, so that they become the ``.grad`` with no copy). For reduction="none" the incoming gradient is a
vector u (one factor per row) and ``dW = Σ_i u_i G_iᵀ H_i`` cannot be formed before u is
known, so the forward computes the losses only and the backward recomputes each chunk's
logits and gradient, scales row i by u_i and runs the gradient GEMMs: 4 GEMMs instead of 3,
and no (N, K) or (N, d) state kept between forward and backward.

The "mean" divisor Σ_i w_{y_i} is a tensor applied to the finished gradients (N·d + K·d
elements, cheap next to the GEMMs), so there is no host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, loss_autograd, loss_backends
from ._dtypes import accumulation_dtype
from ._matmul import mm, mm_t
from .loss_reduction import mean_scale, total_weight
from .loss_options import OPTIONS_SCHEMA, LossOptions, loss_options
from .reference import losses as reference

#: Default ceiling on one chunk of logits, in bytes (per call; see ``chunk_memory``).
CHUNK_MEMORY_BYTES = 256 * 2**20

#: Fewest rows per chunk at which the three GEMMs keep their speed. Every chunk streams all of
#: W (K, d) twice and the dW accumulator (K, d) in and out, and the dW GEMM's inner dimension is
#: the chunk's rows. With the logits and dH on oneDNN, the fused call against torch.mm's three
#: bare GEMMs at N = 8192, d = 256, K = 32000 (medians of interleaved rounds, 2 cores): on a
#: Zen 4 (quiet) 64 rows 1.23×, 128 rows 1.00-1.14× (three runs), 192 rows 0.98×; on a Zen 5
#: shared with other jobs 131 rows 1.34×, 192 rows 1.09×, 256 rows 1.03×. At 128 rows (16 MiB
#: of logits at K = 32000 fp32) the peak extra memory is below that of torch's chunked
#: ``F.linear_cross_entropy`` (Zen 4: 57 MiB against 85 MiB; at 192 rows ncfast's was above).
GEMM_ROWS = 128


def _last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the CPU's last-level cache (Linux sysfs), ``default`` where it is not readable."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return default
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text or default)


#: Bytes of logits a chunk may fill when that is more than :data:`GEMM_ROWS` rows: half the
#: last-level cache, so that the chunk is still cached between the logits GEMM, the loss kernel
#: and the two gradient GEMMs that each read it.
CACHED_CHUNK_BYTES = _last_level_cache_bytes() // 2


#: A cache-sized chunk is rounded down to a multiple of this many rows, a whole number of the
#: GEMMs' register blocks (131 rows at K = 32000 ran 1.10× the bare GEMMs where 128 ran 1.00×).
CHUNK_ROW_MULTIPLE = 32


def chunk_rows(num_rows: int, num_classes: int, dtype: torch.dtype, chunk_memory: int = CHUNK_MEMORY_BYTES) -> int:
    """Rows per chunk: as many as fill half the last-level cache with (rows, K) logits (a
    multiple of :data:`CHUNK_ROW_MULTIPLE`), but at least :data:`GEMM_ROWS` (the GEMMs'
    efficiency), at most ``chunk_memory`` bytes of logits and at most ``num_rows``; at least one.

    Short rows (small K) thus run in cache-sized chunks (with a 32 MiB cache: 256 rows at
    K = 16384 fp32, 128 at K = 32000); long rows in :data:`GEMM_ROWS`-row chunks, the fewest
    at which the GEMMs keep their speed."""
    per_row = max(num_classes * dtype.itemsize, 1)
    cached = CACHED_CHUNK_BYTES // per_row
    preferred = max(GEMM_ROWS, cached - cached % CHUNK_ROW_MULTIPLE)
    return max(1, min(num_rows, preferred, chunk_memory // per_row))


# --------------------------------------------------------------------------------------------
# the chunked computation (device-agnostic: torch GEMMs + the dispatched loss op)
# --------------------------------------------------------------------------------------------
def _chunked(features, weight, bias, target, class_weight, alpha, options, chunk,
             row_scale, grad_features, grad_weight, grad_bias):
    """Per-row losses (N,) in the accumulation dtype and the unscaled gradients
    Σ_i u_i ∂(w_{y_i} ℓ_i) (u = ``row_scale`` or 1); a gradient not asked for is (0,).

    Per chunk: the logits (with the bias added by the GEMM) and dH on
    :func:`~ncfast._matmul.mm_t` (oneDNN for fp32 on CPU), dW accumulated in place by
    ``addmm_`` (oneDNN has no accumulating form: its product plus an add costs a (K, d)
    temporary and a pass), db as the chunk's column sums. No copy of W or H is made."""
    num_rows = features.shape[0]
    num_classes = weight.shape[0]
    dtype, device = features.dtype, features.device
    accumulate = accumulation_dtype(dtype)
    rows = torch.empty(num_rows, dtype=accumulate, device=device)
    chunk = max(1, min(chunk, num_rows))
    # Distinct (0,) tensors: a custom op's outputs may not alias one another.
    d_features = torch.empty_like(features) if grad_features else features.new_empty((0,))
    # Low-precision dW and db are summed over the chunks in fp32 (each chunk's GEMM rounds once).
    d_weight = torch.zeros(weight.shape, dtype=accumulate, device=device) if grad_weight else None
    d_bias = torch.zeros(num_classes, dtype=accumulate, device=device) if grad_bias else None
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        h = features[start:stop]
        z = mm_t(h, weight, bias)
        value, _ = torch.ops.ncfast.fused_loss_(z, target[start:stop], class_weight, alpha,
                                                *options._replace(reduction="none"))
        rows[start:stop] = value
        if row_scale is not None:
            z.mul_(row_scale[start:stop, None].to(dtype))
        if grad_features:
            d_features[start:stop] = mm(z, weight)
        if grad_weight and accumulate == dtype:
            d_weight.addmm_(z.t(), h)
        elif grad_weight:
            d_weight.add_(torch.mm(z.t(), h))
        if grad_bias:
            d_bias.add_(z.sum(0, dtype=accumulate))
        # Before the next chunk's logits are allocated: one chunk alive at a time.
        del z
    d_weight = d_weight.to(dtype) if grad_weight else features.new_empty((0,))
    d_bias = d_bias.to(dtype) if grad_bias else features.new_empty((0,))
    return rows, d_features, d_weight, d_bias


def _fused_linear_loss(features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                       class_weight: Optional[Tensor], alpha: Optional[Tensor], chunk: int,
                       row_scale: Optional[Tensor], grad_features: bool, grad_weight: bool, grad_bias: bool,
                       *options) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dH, dW, db)``: the reduced loss of ``<loss>(H Wᵀ + b, y)`` and its gradients
    (each (0,) unless its ``grad_*`` flag is set), computed ``chunk`` rows at a time;
    ``options`` are the fields of :class:`~ncfast.loss_options.LossOptions`, in order.

    With ``row_scale`` u (N,) the gradients are those of Σ_i u_i ℓ_i (the backward of
    reduction="none"); otherwise those of the reduced loss."""
    options = LossOptions(*options)
    if target.device.type == "cpu" and not target.is_floating_point():  # the global row index; on CUDA: a sync
        loss_backends.check_target_values(target, weight.shape[0], options.ignore_index)
    rows, d_features, d_weight, d_bias = _chunked(
        features, weight, bias, target, class_weight, alpha, options, chunk, row_scale, grad_features, grad_weight,
        grad_bias,
    )
    if options.reduction == "none":
        return rows.to(features.dtype), d_features, d_weight, d_bias
    value = rows.sum()
    if options.reduction == "mean":
        # No counted row: loss NaN (0/0) but gradient 0, as torch; a tensor select, no sync.
        total = total_weight(target, class_weight, options.ignore_index, rows.dtype)
        value = value / total
        scale = mean_scale(total)
        for grad in (d_features, d_weight, d_bias):
            grad.mul_(scale.to(grad.dtype))
    return value.to(features.dtype), d_features, d_weight, d_bias


fused_linear_loss = torch.library.custom_op(
    "ncfast::fused_linear_loss", _fused_linear_loss, mutates_args=(), device_types=None,
    schema="(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, Tensor? alpha, "
           "int chunk, Tensor? row_scale, bool grad_features, bool grad_weight, bool grad_bias, "
           f"{OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
)


@fused_linear_loss.register_fake
def _(features, weight, bias, target, class_weight, alpha, chunk, row_scale, grad_features, grad_weight, grad_bias,
      *options):
    value = features.new_empty((features.shape[0],) if LossOptions(*options).reduction == "none" else ())
    return (
        value,
        torch.empty_like(features) if grad_features else features.new_empty((0,)),
        torch.empty_like(weight) if grad_weight else features.new_empty((0,)),
        features.new_empty((weight.shape[0],)) if grad_bias else features.new_empty((0,)),
    )


_NO_GRADIENTS = (None,) * (7 + len(LossOptions._fields))  # class_weight … grad_bias, then the options


def _setup_context(ctx, inputs, output):
    features, weight, bias, target, class_weight, alpha, chunk, _, grad_features, grad_weight, grad_bias, *options = inputs
    # The gradient outputs are non-differentiable: no zero-filled (N, d)/(K, d) grads for them.
    ctx.set_materialize_grads(False)
    ctx.options = LossOptions(*options)
    ctx.computed = (grad_features, grad_weight, grad_bias)
    ctx.chunk = chunk
    saved = (features, weight, bias, target, class_weight, alpha)
    ctx.save_for_backward(*saved, *(output[1:] if ctx.options.reduction != "none" else ()))
    ctx.save_for_forward(*saved)
    ctx.mark_non_differentiable(*output[1:])


def _logits_and_grad(features, weight, bias, target, class_weight, alpha, options):
    """The unfused Z = H Wᵀ + b and G = Σ_i ∂(w_{y_i} ℓ_i)/∂Z in the accumulation dtype."""
    acc = accumulation_dtype(features.dtype)
    z = torch.nn.functional.linear(features.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    _, grad, _ = reference.rows_and_grad(options.loss, z, target, class_weight, alpha, options.ignore_index,
                                         **options.params())
    return z, grad


def _recomputed_gradients(features, weight, bias, target, class_weight, alpha, options, grad_loss, wanted):
    """(dH, dW, db, dq) of grad_loss · loss from the unfused formula, in differentiable torch
    ops (for second derivatives); entries not in ``wanted`` are None."""
    z, grad = _logits_and_grad(features, weight, bias, target, class_weight, alpha, options)
    acc = z.dtype
    scale = grad_loss.to(acc)
    if options.reduction == "none":
        scale = scale[:, None]
    elif options.reduction == "mean":
        scale = scale * mean_scale(total_weight(target, class_weight, options.ignore_index, acc))
    grad = grad * scale
    d_target = None
    if wanted[3]:
        d_target = (reference.soft_target_grad(z, class_weight, options.label_smoothing, options.softcap)
                    * scale).to(target.dtype)
    return (
        (grad @ weight.to(acc)).to(features.dtype) if wanted[0] else None,
        (grad.t() @ features.to(acc)).to(weight.dtype) if wanted[1] else None,
        grad.sum(0).to(bias.dtype) if wanted[2] else None,
        d_target,
    )


def _backward(ctx, grad_loss, *_grads_of_grads):
    if grad_loss is None:  # not materialised: nothing flows back
        return (None,) * 4 + _NO_GRADIENTS
    features, weight, bias, target, class_weight, alpha, *stored = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled() or wanted[3]:  # create_graph=True, torch.func, or a soft target's gradient
        grads = _recomputed_gradients(features, weight, bias, target, class_weight, alpha, ctx.options, grad_loss,
                                      wanted)
        return grads + _NO_GRADIENTS
    if ctx.options.reduction == "none":
        computed = (wanted[0], wanted[1], wanted[2] and bias is not None)
        _, *grads = torch.ops.ncfast.fused_linear_loss(features, weight, bias, target, class_weight, alpha,
                                                       ctx.chunk, grad_loss, *computed, *ctx.options)
    else:
        # The usual loss.backward() passes exactly 1: the stored gradients are handed over as
        # they are (no second (N, d) + (K, d) set; autograd takes them as .grad without a copy
        # once the graph frees them). Any other factor makes new tensors, so that the graph can
        # run again (retain_graph).
        computed = ctx.computed
        grads = stored if loss_autograd.is_exactly_one(grad_loss) else [grad * grad_loss for grad in stored]
    grads = tuple(grad if needed else None for grad, needed in zip(grads, computed))
    return grads + (None,) + _NO_GRADIENTS


def _jvp(ctx, features_t, weight_t, bias_t, target_t, *_other_tangents):
    """Forward mode: the loss moves by Σ_i ⟨G_i, Ż_i⟩ (+ ⟨∂ℓ/∂q, q̇⟩), Ż = Ḣ Wᵀ + H Ẇᵀ + ḃ,
    from the unfused logits (forward-mode second derivatives, e.g. ``torch.func.hessian``)."""
    features, weight, bias, target, class_weight, alpha = ctx.saved_tensors
    options = ctx.options
    z, grad = _logits_and_grad(features, weight, bias, target, class_weight, alpha, options)
    z_t = torch.zeros_like(z)
    if features_t is not None:
        z_t = z_t + features_t.to(z.dtype) @ weight.to(z.dtype).t()
    if weight_t is not None:
        z_t = z_t + features.to(z.dtype) @ weight_t.to(z.dtype).t()
    if bias_t is not None:
        z_t = z_t + bias_t.to(z.dtype)
    rows = (grad * z_t).sum(1)
    if target_t is not None and target.is_floating_point():
        rows = rows + (reference.soft_target_grad(z, class_weight, options.label_smoothing, options.softcap)
                       * target_t.to(z.dtype)).sum(1)
    if options.reduction == "none":
        value = rows
    else:
        value = rows.sum()
        if options.reduction == "mean":
            value = value * mean_scale(total_weight(target, class_weight, options.ignore_index,
                                                                        z.dtype))
    return value.to(features.dtype), None, None, None


torch.library.register_autograd("ncfast::fused_linear_loss", _backward, setup_context=_setup_context)


class _FusedLinearLoss(torch.autograd.Function):
    """The op with its autograd formula, in the form torch.func transforms take (eager mode;
    it skips the custom-op dispatcher)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(features, weight, bias, target, class_weight, alpha, chunk, row_scale, *flags_and_options):
        run = _fused_linear_loss if loss_autograd.eager(features) else torch.ops.ncfast.fused_linear_loss
        return run(features, weight, bias, target, class_weight, alpha, chunk, row_scale, *flags_and_options)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_matrix(name: str, tensor, shape_text: str) -> Tensor:
    _checks.float_tensor(name, tensor, shape_text)
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected shape {shape_text}, got {tuple(tensor.shape)}")
    return tensor


def _check_same(name: str, tensor: Tensor, features: Tensor) -> None:
    if tensor.dtype != features.dtype:
        raise TypeError(f"{name}: has dtype {tensor.dtype} but features have {features.dtype}; cast one of them")
    if tensor.device != features.device:
        raise ValueError(f"{name}: is on {tensor.device} but features are on {features.device}")


def _linear_loss(loss, features, weight, bias, target, class_weight, ignore_index, reduction, chunk_memory,
                 **options) -> Tensor:
    features = _check_matrix("features", features, "(N, d)")
    weight = _check_matrix("weight", weight, "(K, d)")
    _check_same("weight", weight, features)
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight: expected shape (K, {features.shape[1]}) to match features of shape {tuple(features.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    num_rows, num_classes = features.shape[0], weight.shape[0]
    if num_classes == 0:
        raise ValueError("weight: the class dimension is empty (K = 0)")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a tensor of shape (K,) or None, got {type(bias).__name__}")
        _check_same("bias", bias, features)
        if bias.shape != (num_classes,):
            raise ValueError(f"bias: expected shape ({num_classes},) (one entry per row of weight), got {tuple(bias.shape)}")
    soft = isinstance(target, Tensor) and target.is_floating_point()
    if soft and loss != "cross_entropy":
        raise TypeError(f"target: probability targets are defined for cross-entropy only; {loss} takes integer "
                        "class indices")
    if not soft:
        _checks.class_indices("target", target)
    if soft and target.shape != (num_rows, num_classes):
        raise TypeError(f"target: expected integer class indices of shape ({num_rows},) or probabilities of shape "
                        f"({num_rows}, {num_classes}), got {target.dtype} of shape {tuple(target.shape)}")
    expected = (num_rows, num_classes) if soft else (num_rows,)
    if target.shape != expected:
        raise ValueError(f"target: expected shape {expected} for features of shape {tuple(features.shape)} and "
                         f"{num_classes} classes, got {tuple(target.shape)}")
    if target.device != features.device:
        raise ValueError(f"target: is on {target.device} but features are on {features.device}")
    if isinstance(chunk_memory, bool) or not isinstance(chunk_memory, int):
        raise TypeError(f"chunk_memory: expected an int (bytes), got {type(chunk_memory).__name__}")
    if chunk_memory <= 0:
        raise ValueError(f"chunk_memory: expected a positive number of bytes, got {chunk_memory}")
    options, alpha = loss_options(loss, num_classes, features.device, ignore_index, reduction, **options)
    if soft and options.lse_square_scale:
        raise ValueError("lse_square_scale: the z-loss is defined for class-index targets only")
    if class_weight is not None:
        class_weight = _checks.class_vector("class_weight", class_weight, num_classes, features.device, "features")
    if alpha is not None:
        alpha = _checks.class_vector("alpha", alpha, num_classes, features.device, "features")
    target = target if soft else target.to(torch.int64)
    features, weight = features.contiguous(), weight.contiguous()
    chunk = chunk_rows(num_rows, num_classes, features.dtype, chunk_memory)
    grad_on = torch.is_grad_enabled() and reduction != "none"
    flags = (grad_on and features.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    # Under torch.compile the op itself (its autograd is registered): dynamo traces no custom jvp.
    op = torch.ops.ncfast.fused_linear_loss if torch.compiler.is_compiling() else _FusedLinearLoss.apply
    value, *_ = op(features, weight, bias, target, class_weight, alpha, chunk, None, *flags, *options)
    return value


def linear_cross_entropy(
    features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor] = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0, softcap: Optional[float] = None, chunk_memory: int = CHUNK_MEMORY_BYTES,
) -> Tensor:
    """``cross_entropy(features @ weight.T + bias, target)`` without materialising the logits.

    ℓ_i = lse(z_i) − Σ_j q_j z_ij, z_i = W h_i + b, q = (1−α)e_y + α/K (Zhou et al., NeurIPS 2022,
    "Are All Losses Created Equal", eqs. (3), (5)).

    Args:
        features: (N, d) penultimate features H, float32/float64/bfloat16/float16.
        weight: (K, d) classifier W, same dtype and device.
        bias: (K,) or None.
        target: (N,) integer class indices in [0, K) or ``ignore_index``, or (N, K)
            probabilities (as :func:`ncfast.cross_entropy`).
        class_weight: optional (K,) class weights (``weight=`` of :func:`ncfast.cross_entropy`).
        ignore_index, reduction, label_smoothing, lse_square_scale (z-loss), softcap: as
            :func:`ncfast.cross_entropy` (``return_lse`` and ``process_group`` are not offered here).
        chunk_memory: most bytes of logits held at once; the rows per chunk are chosen within
            it from the shapes and the cache size (:func:`ncfast.linear.chunk_rows`).

    Returns: the loss in the features' dtype ((N,) for reduction="none"); differentiable in
    features, weight and bias. Extra memory: one chunk of logits plus the gradients.
    """
    return _linear_loss("cross_entropy", features, weight, bias, target, class_weight, ignore_index, reduction,
                        chunk_memory, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                        softcap=softcap)


def linear_focal_loss(
    features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, gamma: float = 2.0,
    alpha: Union[None, float, Sequence[float], Tensor] = None, class_weight: Optional[Tensor] = None,
    ignore_index: int = -100, reduction: str = "mean", chunk_memory: int = CHUNK_MEMORY_BYTES,
) -> Tensor:
    """``focal_loss(features @ weight.T + bias, target)`` without materialising the logits:
    ℓ_i = −α_{y_i} (1−p_{y_i})^γ log p_{y_i} (Zhou et al., NeurIPS 2022, eq. (6)).

    Args:
        features, weight, bias, target, class_weight, ignore_index, reduction, chunk_memory:
            as :func:`linear_cross_entropy`.
        gamma, alpha: as :func:`ncfast.focal_loss`.
    """
    return _linear_loss("focal", features, weight, bias, target, class_weight, ignore_index, reduction, chunk_memory,
                        gamma=gamma, alpha=alpha)


def linear_rescaled_mse(
    features: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, kappa: float = 1.0, beta: float = 1.0,
    class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
    chunk_memory: int = CHUNK_MEMORY_BYTES,
) -> Tensor:
    """``rescaled_mse(features @ weight.T + bias, target)`` without materialising the logits:
    ℓ_i = κ(z_{i,y} − β)² + Σ_{j≠y} z_ij² (Zhou et al., NeurIPS 2022, eq. (6); Zhou et al., ICML 2022, eq. (4)).

    Args:
        features, weight, bias, target, class_weight, ignore_index, reduction, chunk_memory:
            as :func:`linear_cross_entropy`.
        kappa, beta: as :func:`ncfast.rescaled_mse`.
    """
    return _linear_loss("rescaled_mse", features, weight, bias, target, class_weight, ignore_index, reduction,
                        chunk_memory, kappa=kappa, beta=beta)
