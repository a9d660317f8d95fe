"""Triton kernel of the fused loss family (SPEC §1, §7): cross-entropy with (weighted) label
smoothing, focal loss and rescaled MSE, loss and gradient in one launch, one program per row.

The per-row math is that of ``csrc/losses.cpp``: one sweep gives the row's statistics (max,
Σ exp(z − max), Σ_j w_j z_j or Σ_{j≠y} z_j², a NaN flag); one small function per loss turns them
into (ℓ, a, c, g_y); the gradient is written once as g_j = scale·(a·v_j + c·u_j) for j ≠ y and
scale·g_y at the target, with v_j = exp(z_j − max) (softmax losses) or z_j (MSE) and u_j the
class weight w_j (1 without weights).

A row of at most ``MAX_BLOCK`` columns is read once and kept in registers; a longer row is read
twice (online max / sum-exp over column blocks, then the gradient sweep, which recomputes the
exp: cheaper on a GPU than storing and re-reading it). The gradient may alias the logits (every
element is read before the same thread overwrites it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Longest row kept in registers (columns); longer rows take the two-sweep path. Tests lower it
# to run the two-sweep path at small K.
MAX_BLOCK = 16384

# Loss kinds (the order of ncfast.losses.LOSSES).
CROSS_ENTROPY, FOCAL, RESCALED_MSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]


# --------------------------------------------------------------------------------------------
# per-row math
# --------------------------------------------------------------------------------------------
@triton.jit
def _scalar(x, ACC: tl.constexpr):
    # x is an fp64 kernel argument on the device and a Python float in the interpreter: both
    # reach the accumulation type through fp64, so fp64 logits see the parameters exactly.
    return (tl.zeros([], tl.float64) + x).to(ACC)


@triton.jit
def _one_minus_exp(x):
    # 1 - exp(x) = -expm1(x) for x <= 0, accurate as x -> 0 (Kahan's exp/log ratio; Triton has
    # no portable expm1): 1 - p_y stays exact as p_y -> 1 (SPEC §1, Liger PR #1329). Below -1
    # there is no cancellation, and the ratio would meet log(0) once exp(x) underflows.
    u = tl.exp(x)
    near_zero = (u != 1.0) & (x > -1.0)
    kahan = (u - 1.0) * x / tl.log(tl.where(near_zero, u, 0.5))
    return -tl.where(near_zero, kahan, tl.where(u == 1.0, x, u - 1.0))


@triton.jit
def _target_log_prob(row_max, sumexp, target_logit):
    log_p = (target_logit - row_max) - tl.log(sumexp)
    return log_p, _one_minus_exp(log_p)


@triton.jit
def _cross_entropy_row(row_max, sumexp, target_logit, weighted_sum, w_y, class_weight_sum, K, smoothing):
    # ℓ = (1-α) w_y (lse - z_y) + (α/K) Σ_j w_j (lse - z_j)   (torch's weighted label smoothing)
    # g_j = p_j((1-α) w_y + α W/K) - (α/K) w_j - (1-α) w_y δ_jy
    log_p, one_minus_p = _target_log_prob(row_max, sumexp, target_logit)
    uniform = smoothing / K
    W = class_weight_sum
    loss = -(1 - smoothing) * w_y * log_p
    # Σ_j w_j (lse - z_j) written around the max; skipped at α = 0 so that a -inf logit
    # (a masked class) does not turn 0·inf into NaN.
    smooth = uniform * ((W * row_max - weighted_sum) + W * tl.log(sumexp))
    loss = tl.where(smoothing > 0, loss + smooth, loss)
    p_y = 1 - one_minus_p
    grad_target = -(1 - smoothing) * w_y * one_minus_p + uniform * (W * p_y - w_y)
    return loss, ((1 - smoothing) * w_y + uniform * W) / sumexp, -uniform, grad_target


@triton.jit
def _focal_row(row_max, sumexp, target_logit, w_y, alpha_y, gamma):
    # ℓ = -w_y α_y (1-p_y)^γ log p_y;  g_j = w_y α_y c (δ_jy - p_j),
    # c = (1-p_y)^γ (γ p_y · log p_y / (1-p_y) - 1), finite as p_y -> 1 for every γ >= 0.
    log_p, one_minus_p = _target_log_prob(row_max, sumexp, target_logit)
    factor = w_y * alpha_y
    positive = one_minus_p > 0
    safe = tl.where(positive, one_minus_p, 1.0)
    modulator = tl.where(positive, tl.exp(gamma * tl.log(safe)), tl.where(gamma == 0, 1.0, 0.0))
    log_ratio = tl.where(positive, log_p / safe, -1.0)
    c = modulator * (gamma * (1 - one_minus_p) * log_ratio - 1)
    return -factor * modulator * log_p, -factor * c / sumexp, 0.0, factor * c * one_minus_p


@triton.jit
def _rescaled_mse_row(target_logit, sumsq_others, w_y, kappa, beta):
    # ℓ = w_y (κ (z_y - β)² + Σ_{j≠y} z_j²);  g_j = 2 w_y z_j, g_y = 2 w_y κ (z_y - β)
    d = target_logit - beta
    return w_y * (kappa * d * d + sumsq_others), 2 * w_y, 0.0, 2 * w_y * kappa * d


@triton.jit
def _block_statistics(z, in_row, is_target, col_weight, KIND: tl.constexpr):
    """Of one block of a row: (max, Σ exp(z - max), Σ_j u_j z_j or Σ_{j≠y} z_j², any NaN)."""
    zero = tl.zeros([], z.dtype)
    if KIND == RESCALED_MSE:
        block_max, sumexp, linear, has_nan = zero, zero, tl.sum(tl.where(in_row & ~is_target, z * z, 0.0)), zero
    else:
        block_max = tl.max(z)
        # All -inf (padding, masked classes): shift by 0 so that exp gives 0, not NaN.
        shift = tl.where(block_max == float("-inf"), 0.0, block_max)
        sumexp = tl.sum(tl.exp(z - shift))
        linear = tl.sum(tl.where(in_row, col_weight * z, 0.0))
        has_nan = tl.max(tl.where(z != z, 1.0, zero))
    return block_max, sumexp, linear, has_nan


@triton.jit
def _merge_sumexp(row_max, sumexp, block_max, block_sumexp):
    new_max = tl.maximum(row_max, block_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    block_shift = tl.where(block_max == float("-inf"), 0.0, block_max)
    return new_max, sumexp * tl.exp(row_max - shift) + block_sumexp * tl.exp(block_shift - shift)


@triton.jit
def _row_result(row_max, sumexp, linear, has_nan, target_logit, w_y, alpha_y, class_weight_sum, K, valid,
                smoothing, gamma, kappa, beta, KIND: tl.constexpr):
    """(ℓ, a, c, g_y) of one row from its statistics; NaN for a row with a NaN or +inf logit,
    with only -inf logits (softmax losses), or with an out-of-range target."""
    if KIND == RESCALED_MSE:
        loss, a, c, grad_target = _rescaled_mse_row(target_logit, linear, w_y, kappa, beta)
        bad = ~valid
    else:
        if KIND == FOCAL:
            loss, a, c, grad_target = _focal_row(row_max, sumexp, target_logit, w_y, alpha_y, gamma)
        else:
            loss, a, c, grad_target = _cross_entropy_row(row_max, sumexp, target_logit, linear, w_y,
                                                         class_weight_sum, K, smoothing)
        bad = (has_nan > 0) | (row_max == float("inf")) | (row_max == float("-inf")) | ~valid
    nan = float("nan")
    return (tl.where(bad, nan, loss), tl.where(bad, nan, a), tl.where(bad, nan, c), tl.where(bad, nan, grad_target))


@triton.jit
def _gradient_block(z, cols, is_target, col_weight, row_max, a, c, grad_target, keep, KIND: tl.constexpr):
    if KIND == RESCALED_MSE:
        v = z
    else:
        v = tl.exp(z - row_max)
    g = tl.where(is_target, grad_target, a * v + c * col_weight)
    return tl.where(keep, g, 0.0)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["K", "BLOCK"], restore_value=["grad_ptr"])
@triton.jit
def _loss_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, alpha_ptr, sums_ptr,
    grad_ptr, grad_stride, row_loss_ptr, K, ignore_index,
    smoothing: tl.float64, gamma: tl.float64, kappa: tl.float64, beta: tl.float64,
    KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, COLUMN_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ONE_SWEEP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    y = tl.load(target_ptr + row * target_stride)
    keep = y != ignore_index
    valid = (y >= 0) & (y < K)
    # An out-of-range target is never read through: it reads column 0 and the row turns NaN.
    y_safe = tl.where(keep & valid, y, 0)
    w_y = tl.load(weight_ptr + y_safe).to(ACC) if HAS_WEIGHT else 1.0
    alpha_y = tl.load(alpha_ptr + y_safe).to(ACC) if HAS_ALPHA else 1.0
    target_logit = tl.load(z_row + y_safe, mask=keep).to(ACC)
    # Per-column weights enter only through weighted label smoothing; W = Σ_j w_j.
    class_weight_sum = tl.load(sums_ptr + 1).to(ACC) if COLUMN_WEIGHTS else tl.zeros([], ACC) + K
    scale = 1 / tl.load(sums_ptr).to(ACC) if MEAN else 1.0
    smoothing = _scalar(smoothing, ACC)
    gamma = _scalar(gamma, ACC)
    kappa = _scalar(kappa, ACC)
    beta = _scalar(beta, ACC)
    other = 0.0 if KIND == RESCALED_MSE else float("-inf")
    # Columns to read: none for an ignored row (its gradient is written as zeros).
    read_end = tl.where(keep, K, 0)
    cols = tl.arange(0, BLOCK)

    if ONE_SWEEP:
        # The whole row (K <= BLOCK) in registers: read once.
        in_row = cols < K
        z = tl.load(z_row + cols, mask=cols < read_end, other=other).to(ACC)
        col_weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC) if COLUMN_WEIGHTS else 1.0
        row_max, sumexp, linear, has_nan = _block_statistics(z, in_row, cols == y, col_weight, KIND)
        loss, a, c, grad_target = _row_result(row_max, sumexp, linear, has_nan, target_logit, w_y, alpha_y,
                                              class_weight_sum, K, valid, smoothing, gamma, kappa, beta, KIND)
        g = _gradient_block(z, cols, cols == y, col_weight, row_max, scale * a, scale * c, scale * grad_target,
                            keep, KIND)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
    else:
        # Sweep 1: online max / sum-exp over column blocks.
        row_max = tl.full([], float("-inf"), ACC)
        sumexp = tl.zeros([], ACC)
        linear = tl.zeros([], ACC)
        has_nan = tl.zeros([], ACC)
        for start in range(0, K, BLOCK):
            in_row = start + cols < K
            z = tl.load(z_row + start + cols, mask=start + cols < read_end, other=other).to(ACC)
            col_weight = tl.load(weight_ptr + start + cols, mask=in_row, other=0.0).to(ACC) if COLUMN_WEIGHTS else 1.0
            block_max, block_sumexp, block_linear, block_nan = _block_statistics(z, in_row, start + cols == y,
                                                                                 col_weight, KIND)
            row_max, sumexp = _merge_sumexp(row_max, sumexp, block_max, block_sumexp)
            linear += block_linear
            has_nan = tl.maximum(has_nan, block_nan)
        loss, a, c, grad_target = _row_result(row_max, sumexp, linear, has_nan, target_logit, w_y, alpha_y,
                                              class_weight_sum, K, valid, smoothing, gamma, kappa, beta, KIND)
        # Sweep 2: the gradient, block by block.
        for start in range(0, K, BLOCK):
            in_row = start + cols < K
            z = tl.load(z_row + start + cols, mask=start + cols < read_end, other=other).to(ACC)
            col_weight = tl.load(weight_ptr + start + cols, mask=in_row, other=0.0).to(ACC) if COLUMN_WEIGHTS else 1.0
            g = _gradient_block(z, start + cols, start + cols == y, col_weight, row_max, scale * a, scale * c,
                                scale * grad_target, keep, KIND)
            tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.store(row_loss_ptr + row, tl.where(keep, loss, 0.0))


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def loss_forward(logits, target, weight, alpha, grad, kind, params, ignore_index, mean):
    """Fills ``grad`` (N, K) with w_{y_i}·∂ℓ_i/∂z_i (divided by Σw when ``mean``) and returns
    ``(row_loss, total_weight)``: row_loss (N,) w_{y_i}·ℓ_i in fp32 (fp64 for fp64 logits) and
    total_weight the 0-d Σ_i w_{y_i} over the counted rows, both on the logits' device (no host
    sync).

    logits (N, K) with unit column stride, any row stride; target (N,) int64; weight, alpha
    (K,) or None; grad (N, K) with unit column stride, may be ``logits`` itself; kind 0/1/2 =
    cross-entropy / focal / rescaled MSE; params: label_smoothing, gamma, kappa, beta.
    """
    num_rows, num_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    row_loss = torch.empty(num_rows, dtype=acc, device=device)
    counted = (target != ignore_index) & (target >= 0) & (target < num_classes)
    if weight is not None:
        weight = weight.detach().to(device, acc).contiguous()
        row_weight = torch.where(counted, weight[target.clamp(0, num_classes - 1)], 0.0)
        sums = torch.stack([row_weight.sum(), weight.sum()])
    else:
        sums = torch.stack([counted.sum().to(acc), torch.zeros((), dtype=acc, device=device)])
    if alpha is not None:
        alpha = alpha.detach().to(device, acc).contiguous()
    if num_rows == 0:
        return row_loss, sums[0]
    block = min(triton.next_power_of_2(num_classes), MAX_BLOCK)
    _loss_kernel[(num_rows,)](
        logits, logits.stride(0), target, target.stride(0),
        weight if weight is not None else sums, alpha if alpha is not None else sums, sums,
        grad, grad.stride(0), row_loss, num_classes, ignore_index,
        float(params["label_smoothing"]), float(params["gamma"]), float(params["kappa"]), float(params["beta"]),
        KIND=kind, HAS_WEIGHT=weight is not None, HAS_ALPHA=alpha is not None,
        COLUMN_WEIGHTS=weight is not None and kind == CROSS_ENTROPY and params["label_smoothing"] > 0,
        MEAN=bool(mean), ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, ONE_SWEEP=block >= num_classes,
    )
    return row_loss, sums[0]
