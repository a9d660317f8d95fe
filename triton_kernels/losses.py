"""Triton kernel of the fused loss family: cross-entropy with (weighted) label smoothing and
z-loss, focal loss and rescaled MSE (Zhou et al., NeurIPS 2022, "Are All Losses Created Equal:
A Neural Collapse Perspective", eq. (3)-(6)), optionally on logits capped by
softcap·tanh(z/softcap); loss, gradient and each row's lse in one launch.

The per-row math is that of ``csrc/losses.cpp``: one sweep gives the row's statistics (max,
Σ exp(z − max), Σ_j w_j z_j or Σ_{j≠y} z_j², a NaN flag); one small function per loss turns them
into (ℓ, a, c, g_y); the gradient is written once as g_j = scale·(a·v_j + c·u_j) for j ≠ y and
scale·g_y at the target, with v_j = exp(z_j − max) (softmax losses) or z_j (MSE) and u_j the
class weight w_j (1 without weights); with a softcap every g_j is then multiplied by the cap's
derivative 1 - (capped z_j / softcap)².

Layout. The logits are a (B, K, S) view — (N, K) rows are (N, K, 1), and dense predictions
(N, K, d1, ...) are (N, K, d1·d2·…) — whose rows are the B·S positions (b, s), written in
b-major order (row b·S + s) to the per-row outputs. A view with S = 1 is read as one batch of B
positions, so that every layout is "batches × positions × classes" and one program takes a
tile of ROWS consecutive positions of one batch × BLOCK classes. The strides decide which way
the tile is read along memory: with unit class stride (rows) along the classes, several short
rows per program when K is small; with unit position stride (NCHW segmentation, (B, V, T)
token classification) along the positions, so that loads stay coalesced without a transposed
copy. The gradient is written with its own strides (the caller's layout).

A tile whose classes fit in ``BLOCK`` columns is read once and kept in registers; a longer one
is read twice (online max / sum-exp over column blocks, then the gradient sweep, which
recomputes the exp: cheaper on a GPU than storing and re-reading it). The gradient may alias
the logits (every element is read before the same program overwrites it).

With the classes split across processes (vocabulary parallelism) the same kernel runs in two
phases: :func:`row_stats` writes each row's statistics over the local slice, the caller
all-reduces them, and :func:`loss_from_stats` writes the loss and the slice's gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ncfast._dtypes import accumulation_dtype

# Longest row kept in registers (columns), and the most elements of one program's tile; longer
# rows take the two-sweep path. Tests lower it to run the two-sweep path at small K.
MAX_BLOCK = 16384
# Rows of at most this many (power-of-two padded) columns are processed several per program:
# one program per row would leave most of its lanes idle.
MULTI_ROW_CLASSES = 256
# Classes per block when the class dimension is strided: the tile is then wide along the
# positions (coalesced) and short along the classes; more classes take the two-sweep path.
STRIDED_BLOCK = 128
# Fewest positions per program when the class dimension is strided (128 bytes of fp32).
STRIDED_MIN_ROWS = 32
# Elements of one tile under the interpreter (one config, small enough to give several
# programs, a partial last one among them, at test sizes).
INTERPRETER_TILE = 128
ROW_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Loss kinds (the order of ncfast.losses.LOSSES).
CROSS_ENTROPY, FOCAL, RESCALED_MSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Kernel phases: the fused loss, or vocabulary parallelism's statistics / loss from statistics.
FUSED, STATS, FROM_STATS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
STATS_FIELDS = tl.constexpr(5)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    """Warps to try for a kernel of one program per row (one config under the interpreter)."""
    if INTERPRETED:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]


def _tile_configs():
    """Positions per program × warps to try for the tiled kernel (:func:`_prune_configs`
    narrows them to the launch, to one under the interpreter)."""
    warps = (4,) if INTERPRETED else (1, 2, 4, 8, 16, 32)
    return [triton.Config({"ROWS": rows}, num_warps=w) for rows in ROW_CHOICES for w in warps]


def _row_counts(block, budget, strided):
    """The positions per program worth trying for a tile of ``block`` classes: the tile fits the
    budget; long unit-stride rows go one per program; strided tiles are wide along positions."""
    fitting = [rows for rows in ROW_CHOICES if rows * block <= budget] or [1]
    if not strided and block > MULTI_ROW_CLASSES:
        return [1]
    if strided:
        return [rows for rows in fitting if rows >= STRIDED_MIN_ROWS] or fitting[-1:]
    return fitting


def _prune_configs(configs, named_args, **kwargs):
    """Autotuning's candidates for this launch. Under the interpreter one: the largest tile of
    at most ``INTERPRETER_TILE`` elements (else the smallest candidate). On a GPU the four
    largest tiles that fit, each with between 1 and 64 elements per thread."""
    block = kwargs["BLOCK"]
    counts = _row_counts(block, kwargs["TILE_BUDGET"], kwargs["STRIDED"])
    if INTERPRETED:
        rows = ([r for r in counts if r * block <= INTERPRETER_TILE] or counts[:1])[-1]
        return [c for c in configs if c.kwargs["ROWS"] == rows][:1]
    counts = counts[-4:]
    kept = [c for c in configs if c.kwargs["ROWS"] in counts
            and 32 * c.num_warps <= c.kwargs["ROWS"] * block <= 64 * 32 * c.num_warps]
    return kept or [c for c in configs if c.kwargs["ROWS"] == counts[0]][:1]


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
    # no portable expm1): 1 - p_y stays exact as p_y -> 1 (Liger-Kernel PR #1329). Below -1
    # there is no cancellation, and the ratio would meet log(0) once exp(x) underflows.
    u = tl.exp(x)
    near_zero = (u != 1.0) & (x > -1.0)
    kahan = (u - 1.0) * x / tl.log(tl.where(near_zero, u, 0.5))
    return -tl.where(near_zero, kahan, tl.where(u == 1.0, x, u - 1.0))


@triton.jit
def _tanh(x):
    # Triton has no portable tanh: tanh|x| = m / (2 - m) with m = 1 - exp(-2|x|), exact near 0.
    m = _one_minus_exp(-2.0 * tl.abs(x))
    t = m / (2.0 - m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_logits(ptr, mask, other, softcap, ACC: tl.constexpr, CAP: tl.constexpr):
    """Logits as the loss sees them: softcap·tanh(z/softcap) when CAP (Gemma 2's logit cap);
    ``other`` where ``mask`` is false."""
    z = tl.load(ptr, mask=mask, other=other).to(ACC)
    if CAP:
        z = tl.where(mask, softcap * _tanh(z / softcap), other)
    return z


@triton.jit
def _target_log_prob(row_max, sumexp, target_logit):
    log_p = (target_logit - row_max) - tl.log(sumexp)
    return log_p, _one_minus_exp(log_p)


@triton.jit
def _cross_entropy_row(row_max, sumexp, target_logit, weighted_sum, w_y, class_weight_sum, K, smoothing, z_loss):
    # ℓ = (1-α) w_y (lse - z_y) + (α/K) Σ_j w_j (lse - z_j) + w_y λ lse²  (torch's weighted label
    # smoothing, plus the z-loss);  g_j = p_j((1-α) w_y + α W/K + 2 w_y λ lse) - (α/K) w_j - (1-α) w_y δ_jy
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
    lse = row_max + tl.log(sumexp)
    z_coef = 2 * w_y * z_loss * lse
    return (loss + w_y * z_loss * lse * lse, ((1 - smoothing) * w_y + uniform * W + z_coef) / sumexp, -uniform,
            grad_target + z_coef * p_y)


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
def _column(x, like):
    """A per-row value broadcast against ``like``: x itself for one row (1-D blocks), x[:, None]
    for a (rows, columns) tile."""
    if len(like.shape) == 2:
        return x[:, None]
    else:
        return x


@triton.jit
def _block_statistics(z, in_row, is_target, col_weight, KIND: tl.constexpr):
    """Of one block of a row, or of each row of a (rows, columns) block (reduced along the last
    axis): (max, Σ exp(z - max), Σ_j u_j z_j or Σ_{j≠y} z_j², any NaN)."""
    zero = tl.zeros([], z.dtype)
    has_nan = tl.max(tl.where(z != z, 1.0, zero), axis=-1)
    if KIND == RESCALED_MSE:
        linear = tl.sum(tl.where(in_row & ~is_target, z * z, 0.0), axis=-1)
        block_max, sumexp = tl.zeros_like(linear), tl.zeros_like(linear)
    else:
        block_max = tl.max(z, axis=-1)
        # All -inf (padding, masked classes): shift by 0 so that exp gives 0, not NaN.
        shift = tl.where(block_max == float("-inf"), 0.0, block_max)
        sumexp = tl.sum(tl.exp(z - _column(shift, z)), axis=-1)
        linear = tl.sum(tl.where(in_row, col_weight * z, 0.0), axis=-1)
    return block_max, sumexp, linear, has_nan


@triton.jit
def _merge_sumexp(row_max, sumexp, block_max, block_sumexp):
    new_max = tl.maximum(row_max, block_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    block_shift = tl.where(block_max == float("-inf"), 0.0, block_max)
    return new_max, sumexp * tl.exp(row_max - shift) + block_sumexp * tl.exp(block_shift - shift)


@triton.jit
def _row_result(row_max, sumexp, linear, has_nan, target_logit, w_y, alpha_y, class_weight_sum, K, valid,
                smoothing, gamma, kappa, beta, z_loss, KIND: tl.constexpr):
    """(ℓ, a, c, g_y, lse) of one row from its statistics; all NaN for a row with a NaN logit,
    with a +inf logit or only -inf logits (softmax losses), or with an out-of-range target."""
    if KIND == RESCALED_MSE:
        loss, a, c, grad_target = _rescaled_mse_row(target_logit, linear, w_y, kappa, beta)
        lse = tl.zeros_like(loss)
        bad = (has_nan > 0) | ~valid
    else:
        if KIND == FOCAL:
            loss, a, c, grad_target = _focal_row(row_max, sumexp, target_logit, w_y, alpha_y, gamma)
        else:
            loss, a, c, grad_target = _cross_entropy_row(row_max, sumexp, target_logit, linear, w_y,
                                                         class_weight_sum, K, smoothing, z_loss)
        lse = row_max + tl.log(sumexp)
        bad = (has_nan > 0) | (row_max == float("inf")) | (row_max == float("-inf")) | ~valid
    nan = float("nan")
    return (tl.where(bad, nan, loss), tl.where(bad, nan, a), tl.where(bad, nan, c), tl.where(bad, nan, grad_target),
            tl.where(bad, nan, lse))


@triton.jit
def _gradient_block(z, is_target, col_weight, row_max, a, c, grad_target, keep, softcap, KIND: tl.constexpr,
                    CAP: tl.constexpr):
    if KIND == RESCALED_MSE:
        v = z
    else:
        v = tl.exp(z - row_max)
    g = tl.where(is_target, grad_target, a * v + c * col_weight)
    if CAP:
        g = g * (1 - (z / softcap) * (z / softcap))
    return tl.where(keep, g, 0.0)


@triton.jit
def _load_block(z_rows, class_stride, start, cols, K, keep, in_tile, u_row, other, softcap, ACC: tl.constexpr,
                CAP: tl.constexpr, COLUMN_WEIGHTS: tl.constexpr, STRIDED: tl.constexpr):
    """Columns start + cols of a tile of rows (row pointers ``z_rows``, (ROWS,)): the logits as
    the loss sees them (ROWS, BLOCK), ``other`` in the rows not kept and past the last column;
    which columns are in the rows (1, BLOCK); the class weights u_j (1, BLOCK) or 1.

    Rows not kept are not read, except in a class-strided tile: there a mask that changes from
    one position to the next would stop vector loads along the positions, so they are read and
    then replaced."""
    j = start + cols
    in_row = (j < K)[None, :]
    offsets = (j.to(tl.int64) * class_stride)[None, :]
    if STRIDED:
        z = _load_logits(z_rows[:, None] + offsets, in_row & in_tile[:, None], other, softcap, ACC, CAP)
        z = tl.where(keep[:, None], z, other)
    else:
        z = _load_logits(z_rows[:, None] + offsets, in_row & keep[:, None], other, softcap, ACC, CAP)
    u = tl.load(u_row + j, mask=j < K, other=0.0).to(ACC)[None, :] if COLUMN_WEIGHTS else 1.0
    return z, in_row, u


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_tile_configs(), key=["K", "BLOCK", "PHASE", "STRIDED", "TILE_BUDGET"],
                 prune_configs_by={"early_config_prune": _prune_configs}, restore_value=["grad_ptr"])
@triton.jit
def _loss_kernel(
    logits_ptr, logits_stride_b, logits_stride_k, logits_stride_s, target_ptr, target_stride_b, target_stride_s,
    weight_ptr, alpha_ptr, sums_ptr, stats_ptr, grad_ptr, grad_stride_b, grad_stride_k, grad_stride_s,
    row_loss_ptr, lse_ptr, S, K, total_classes, vocab_start, ignore_index,
    smoothing: tl.float64, gamma: tl.float64, kappa: tl.float64, beta: tl.float64, z_loss: tl.float64,
    softcap: tl.float64,
    PHASE: tl.constexpr, KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
    COLUMN_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, CAP: tl.constexpr, WRITE_LSE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, ONE_SWEEP: tl.constexpr, STRIDED: tl.constexpr,
    TILE_BUDGET: tl.constexpr, ROWS: tl.constexpr,
):
    """A tile of ROWS positions s of one batch b (rows b·S + s) × their K columns, the global
    columns vocab_start + j of total_classes. TILE_BUDGET only steers autotuning."""
    tiles = tl.cdiv(S, ROWS)
    program = tl.program_id(0)
    batch = (program // tiles).to(tl.int64)
    position = (program % tiles) * ROWS + tl.arange(0, ROWS)
    in_tile = position < S
    position = position.to(tl.int64)
    row = batch * S + position
    z_rows = logits_ptr + batch * logits_stride_b + position * logits_stride_s
    g_rows = grad_ptr + batch * grad_stride_b + position * grad_stride_s
    y = tl.load(target_ptr + batch * target_stride_b + position * target_stride_s, mask=in_tile, other=ignore_index)
    keep = y != ignore_index
    valid = (y >= 0) & (y < total_classes)
    # An out-of-range target is never read through: it reads column 0 and the row turns NaN.
    y_safe = tl.where(keep & valid, y, 0)
    y_local = y - vocab_start
    local_target = keep & valid & (y_local >= 0) & (y_local < K)
    w_y = tl.load(weight_ptr + y_safe).to(ACC) if HAS_WEIGHT else 1.0
    alpha_y = tl.load(alpha_ptr + y_safe).to(ACC) if HAS_ALPHA else 1.0
    # Per-column weights enter only through weighted label smoothing; W = Σ_j w_j.
    class_weight_sum = tl.load(sums_ptr + 1).to(ACC) if COLUMN_WEIGHTS else tl.zeros([], ACC) + total_classes
    scale = 1 / tl.load(sums_ptr).to(ACC) if MEAN else 1.0
    smoothing = _scalar(smoothing, ACC)
    gamma = _scalar(gamma, ACC)
    kappa = _scalar(kappa, ACC)
    beta = _scalar(beta, ACC)
    z_loss = _scalar(z_loss, ACC)
    softcap = _scalar(softcap, ACC)
    other = 0.0 if KIND == RESCALED_MSE else float("-inf")
    cols = tl.arange(0, BLOCK)
    u_row = weight_ptr + vocab_start
    is_target = cols[None, :] == y_local[:, None]

    # The rows' statistics: (max, Σ exp(z - max) (MSE: 0), z_y, Σ_j u_j z_j or Σ_{j≠y} z_j², NaN).
    if PHASE == FROM_STATS:
        stats = stats_ptr + row * STATS_FIELDS
        row_max = tl.load(stats, mask=in_tile, other=0.0).to(ACC)
        target_logit = tl.load(stats + 2, mask=in_tile, other=0.0).to(ACC)
        has_nan = tl.load(stats + 4, mask=in_tile, other=0.0).to(ACC)
        if KIND == RESCALED_MSE:
            sumexp = tl.zeros([ROWS], ACC)
            linear = tl.load(stats + 1, mask=in_tile, other=0.0).to(ACC)
        else:
            sumexp = tl.load(stats + 1, mask=in_tile, other=0.0).to(ACC)
            linear = tl.load(stats + 3, mask=in_tile, other=0.0).to(ACC)
    else:
        target_logit = _load_logits(z_rows + tl.where(local_target, y_local, 0) * logits_stride_k, local_target, 0.0,
                                    softcap, ACC, CAP)
        if ONE_SWEEP:
            # The whole rows (K <= BLOCK) in registers: read once.
            z, in_row, u = _load_block(z_rows, logits_stride_k, 0, cols, K, keep, in_tile, u_row, other, softcap,
                                       ACC, CAP, COLUMN_WEIGHTS, STRIDED)
            row_max, sumexp, linear, has_nan = _block_statistics(z, in_row, is_target, u, KIND)
        else:
            # Online max / sum-exp over column blocks.
            row_max = tl.full([ROWS], float("-inf"), ACC)
            sumexp = tl.zeros([ROWS], ACC)
            linear = tl.zeros([ROWS], ACC)
            has_nan = tl.zeros([ROWS], ACC)
            for start in range(0, K, BLOCK):
                z_block, in_block, u = _load_block(z_rows, logits_stride_k, start, cols, K, keep, in_tile, u_row,
                                                   other, softcap, ACC, CAP, COLUMN_WEIGHTS, STRIDED)
                block_max, block_sumexp, block_linear, block_nan = _block_statistics(
                    z_block, in_block, (start + cols[None, :]) == y_local[:, None], u, KIND)
                row_max, sumexp = _merge_sumexp(row_max, sumexp, block_max, block_sumexp)
                linear += block_linear
                has_nan = tl.maximum(has_nan, block_nan)

    if PHASE == STATS:
        # The layout processes exchange: the MSE's Σ z² travels in the sum-exp slot.
        stats = stats_ptr + row * STATS_FIELDS
        zero = tl.zeros([], ACC)
        tl.store(stats, tl.where(keep, row_max, zero), mask=in_tile)
        tl.store(stats + 1, tl.where(keep, linear if KIND == RESCALED_MSE else sumexp, zero), mask=in_tile)
        tl.store(stats + 2, tl.where(keep, target_logit, zero), mask=in_tile)
        tl.store(stats + 3, tl.where(keep, zero if KIND == RESCALED_MSE else linear, zero), mask=in_tile)
        tl.store(stats + 4, tl.where(keep, has_nan, zero), mask=in_tile)
    else:
        loss, a, c, grad_target, lse = _row_result(row_max, sumexp, linear, has_nan, target_logit, w_y, alpha_y,
                                                   class_weight_sum, total_classes, valid, smoothing, gamma, kappa,
                                                   beta, z_loss, KIND)
        row_max, keep_row = row_max[:, None], keep[:, None]
        a, c, grad_target = (scale * a)[:, None], (scale * c)[:, None], (scale * grad_target)[:, None]
        if ONE_SWEEP and PHASE == FUSED:
            g = _gradient_block(z, is_target, u, row_max, a, c, grad_target, keep_row, softcap, KIND, CAP)
            g_tile = g_rows[:, None] + (cols.to(tl.int64) * grad_stride_k)[None, :]
            tl.store(g_tile, g.to(grad_ptr.dtype.element_ty), mask=in_row & in_tile[:, None])
        else:
            # The gradient sweep, block by block, recomputing exp(z - max).
            for start in range(0, K, BLOCK):
                z_block, in_block, u = _load_block(z_rows, logits_stride_k, start, cols, K, keep, in_tile, u_row,
                                                   other, softcap, ACC, CAP, COLUMN_WEIGHTS, STRIDED)
                g = _gradient_block(z_block, (start + cols[None, :]) == y_local[:, None], u, row_max, a, c,
                                    grad_target, keep_row, softcap, KIND, CAP)
                g_tile = g_rows[:, None] + ((start + cols).to(tl.int64) * grad_stride_k)[None, :]
                tl.store(g_tile, g.to(grad_ptr.dtype.element_ty), mask=in_block & in_tile[:, None])
        tl.store(row_loss_ptr + row, tl.where(keep, loss, 0.0), mask=in_tile)
        if WRITE_LSE:
            tl.store(lse_ptr + row, tl.where(keep, lse, 0.0), mask=in_tile)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _as_positions(logits, target, grad):
    """(B, K, S) views of the logits and gradient and the (B, S) target: (N, K) is (N, K, 1),
    and a view with S = 1 is read as one batch of B positions (strides swapped, no copy)."""
    if logits.dim() == 2:
        logits, grad, target = logits[:, :, None], grad[:, :, None], target[:, None]
    if logits.shape[2] == 1:
        logits, grad, target = logits.permute(2, 1, 0), grad.permute(2, 1, 0), target.permute(1, 0)
    return logits, target, grad


def _launch(phase, logits, target, weight, alpha, grad, stats, lse, kind, params, ignore_index, mean, vocab_start,
            total_classes):
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    grad = logits if grad is None else grad  # the statistics phase writes no gradient
    logits, target, grad = _as_positions(logits, target, grad)
    num_batches, num_classes, num_positions = logits.shape
    row_loss = torch.empty(num_batches * num_positions, dtype=acc, device=device)
    counted = (target != ignore_index) & (target >= 0) & (target < total_classes)
    if weight is not None:
        weight = weight.detach().to(device, acc).contiguous()
        row_weight = torch.where(counted, weight[target.clamp(0, total_classes - 1)], 0.0)
        sums = torch.stack([row_weight.sum(), weight.sum()])
    else:
        sums = torch.stack([counted.sum().to(acc), torch.zeros((), dtype=acc, device=device)])
    if alpha is not None:
        alpha = alpha.detach().to(device, acc).contiguous()
    if row_loss.numel() == 0:
        return row_loss, sums[0]
    # fp64 rows take twice the registers: half the columns fit (sm_90 spills beyond).
    budget = MAX_BLOCK // (2 if acc == torch.float64 else 1)
    strided = logits.stride(1) != 1 and num_classes > 1
    block = min(triton.next_power_of_2(num_classes), budget, STRIDED_BLOCK if strided else budget)
    softcap = float(params.get("softcap", 0.0))

    def grid(meta):
        return (num_batches * triton.cdiv(num_positions, meta["ROWS"]),)

    _loss_kernel[grid](
        logits, *logits.stride(), target, *target.stride(),
        sums if weight is None else weight, sums if alpha is None else alpha, sums, sums if stats is None else stats,
        grad, *grad.stride(), row_loss, row_loss if lse is None else lse, num_positions, num_classes, total_classes,
        vocab_start, ignore_index,
        float(params["label_smoothing"]), float(params["gamma"]), float(params["kappa"]), float(params["beta"]),
        float(params.get("lse_square_scale", 0.0)), softcap,
        PHASE=phase, KIND=kind, HAS_WEIGHT=weight is not None, HAS_ALPHA=alpha is not None,
        COLUMN_WEIGHTS=weight is not None and kind == CROSS_ENTROPY and params["label_smoothing"] > 0,
        MEAN=bool(mean), CAP=softcap > 0, WRITE_LSE=lse is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, ONE_SWEEP=block >= num_classes,
        STRIDED=strided, TILE_BUDGET=budget,
    )
    return row_loss, sums[0]


def loss_forward(logits, target, weight, alpha, grad, kind, params, ignore_index, mean, lse=None):
    """Fills ``grad`` with w_y·∂ℓ/∂z of every row (divided by Σw when ``mean``) and returns
    ``(row_loss, total_weight)``: row_loss (B·S,) w_y·ℓ of row b·S + s in fp32 (fp64 for fp64
    logits) and total_weight the 0-d Σ w_y over the counted rows, both on the logits' device (no
    host sync). ``lse``, when given, a (B·S,) tensor of row_loss's dtype, receives each row's
    log-sum-exp (0 for ignored rows and for the MSE).

    logits (B, K, S) with any strides — (N, K, d1·d2·…) dense predictions: the class stride
    need not be 1 — or (N, K), read as (N, K, 1); target (B, S) (or (N,)) int64; weight, alpha
    (K,) or None; grad of the logits' shape with any strides (the caller's layout), may be
    ``logits`` itself; kind 0/1/2 = cross-entropy / focal / rescaled MSE; params:
    label_smoothing, gamma, kappa, beta and, optional (0: off), lse_square_scale (the z-loss λ)
    and softcap.
    """
    return _launch(FUSED, logits, target, weight, alpha, grad, None, lse, kind, params, ignore_index, mean, 0,
                   logits.shape[1])


def row_stats(logits, target, weight, kind, params, ignore_index, vocab_start, total_classes):
    """Vocabulary parallelism, phase 1: the statistics of this process's slice of the classes.

    logits (N, K_r) hold global columns [vocab_start, vocab_start + K_r) of total_classes;
    weight (total_classes,) or None. Returns stats (N, 5): max, Σ exp(z - max) (MSE:
    Σ_{j≠y} z_j²), z_y (0 off this slice), Σ_j w_j z_j, NaN flag; zeros for ignored rows. The
    caller combines them over processes: the max by max, the rest by sums (sum-exps rescaled to
    the global max first)."""
    acc = accumulation_dtype(logits.dtype)
    stats = torch.empty(logits.shape[0], STATS_FIELDS.value, dtype=acc, device=logits.device)
    _launch(STATS, logits, target, weight, None, None, stats, None, kind, params, ignore_index, False, vocab_start,
            total_classes)
    return stats


def loss_from_stats(logits, target, stats, weight, alpha, grad, kind, params, ignore_index, mean, vocab_start,
                    total_classes, lse=None):
    """Vocabulary parallelism, phase 2: as :func:`loss_forward` for this slice of the classes,
    from the combined ``stats`` of :func:`row_stats` (one read of the slice). Every process gets
    the whole row's loss, lse and Σw."""
    return _launch(FROM_STATS, logits, target, weight, alpha, grad, stats, lse, kind, params, ignore_index, mean,
                   vocab_start, total_classes)


# --------------------------------------------------------------------------------------------
# probability targets (cross-entropy only)
# --------------------------------------------------------------------------------------------
@triton.jit
def _soft_target_block(target_ptr, cols, in_row, class_weight_ptr, keep, uniform, ACC: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr):
    """w_j q'_j over one column block, q' = (1−α) q + α/K; 0 outside the row."""
    wq = keep * tl.load(target_ptr + cols, mask=in_row, other=0.0).to(ACC) + uniform
    if HAS_WEIGHT:
        wq = wq * tl.load(class_weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
    return tl.where(in_row, wq, 0.0)


@triton.autotune(configs=_configs(), key=["K", "BLOCK"])
@triton.jit
def _soft_loss_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, class_weight_ptr, grad_ptr, grad_stride, row_loss_ptr,
    lse_ptr, K, label_smoothing, softcap, grad_scale,
    HAS_WEIGHT: tl.constexpr, CAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row: ℓ = (Σ_j w_j q'_j)·lse − Σ_j w_j q'_j z_j and g_j = scale·((Σ_k w_k q'_k) p_j − w_j q'_j),
    the second sweep recomputing exp (online max / sum-exp over column blocks in the first)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    q_row = target_ptr + row * target_stride
    keep = 1.0 - _scalar(label_smoothing, ACC)
    uniform = _scalar(label_smoothing, ACC) / K
    cap = _scalar(softcap, ACC)
    row_max = tl.full([], float("-inf"), ACC)
    sumexp = tl.zeros([], ACC)
    weight_sum = tl.zeros([], ACC)
    weighted_logits = tl.zeros([], ACC)
    has_nan = tl.zeros([], tl.int32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < K
        z = _load_logits(z_row + cols, in_row, float("-inf"), cap, ACC, CAP)
        wq = _soft_target_block(q_row, cols, in_row, class_weight_ptr, keep, uniform, ACC, HAS_WEIGHT)
        has_nan = tl.maximum(has_nan, tl.max((z != z).to(tl.int32)))
        block_max = tl.max(tl.where(z != z, float("-inf"), z))
        shift = tl.where(block_max == float("-inf"), 0.0, block_max)
        block_sumexp = tl.sum(tl.where(in_row, tl.exp(z - shift), 0.0))
        row_max, sumexp = _merge_sumexp(row_max, sumexp, block_max, block_sumexp)
        weight_sum += tl.sum(wq)
        weighted_logits += tl.sum(tl.where(in_row, wq * z, 0.0))
    lse = row_max + tl.log(sumexp)
    bad = (has_nan > 0) | (row_max == float("inf"))
    tl.store(row_loss_ptr + row, tl.where(bad, float("nan"), weight_sum * lse - weighted_logits))
    tl.store(lse_ptr + row, tl.where(bad, float("nan"), lse))
    scale = _scalar(grad_scale, ACC)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < K
        z = _load_logits(z_row + cols, in_row, float("-inf"), cap, ACC, CAP)
        wq = _soft_target_block(q_row, cols, in_row, class_weight_ptr, keep, uniform, ACC, HAS_WEIGHT)
        g = scale * (weight_sum * tl.exp(z - lse) - wq)
        if CAP:
            g = g * (1.0 - (z / cap) * (z / cap))
        g = tl.where(bad, float("nan"), g)
        tl.store(grad_ptr + row * grad_stride + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def soft_loss_forward(logits, target, weight, grad, label_smoothing, softcap, grad_scale, lse):
    """Cross-entropy against probability targets q (N, K), as torch defines it: fills ``grad``
    (N, K) with grad_scale·∂ℓ_i/∂z_i, g_ij = (Σ_k w_k q'_ik) p_ij − w_j q'_ij, q' = (1−α) q + α/K,
    and ``lse`` (N,) with each row's log-sum-exp; returns the per-row losses (N,) in fp32 (fp64
    for fp64 logits). logits, target, grad with unit column stride (grad may be ``logits``);
    weight (K,) or None; softcap 0: off."""
    num_rows, num_classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc, device=logits.device)
    if num_rows == 0:
        return row_loss
    if weight is not None:
        weight = weight.detach().to(logits.device, acc).contiguous()
    block = min(triton.next_power_of_2(num_classes), MAX_BLOCK // (2 if acc == torch.float64 else 1))
    _soft_loss_kernel[(num_rows,)](
        logits, logits.stride(0), target, target.stride(0), row_loss if weight is None else weight, grad,
        grad.stride(0), row_loss, lse, num_classes, float(label_smoothing), float(softcap), float(grad_scale),
        HAS_WEIGHT=weight is not None, CAP=softcap > 0, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK=block,
    )
    return row_loss
