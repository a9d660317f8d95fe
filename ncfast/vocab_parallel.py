"""Vocabulary-parallel losses: each rank of a ``torch.distributed`` group holds a slice of the K
columns of the logits (the slices in rank order, of any sizes).

Per forward: one all-gather of three integers per rank (slice size and target range, so that
every rank learns the split and every rank raises together on a bad target, before any of
them enters the statistics' collectives), then the three all-reduces of N-vectors that merge
the per-slice row statistics. None in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, loss_autograd, loss_backends
from ._dtypes import accumulation_dtype, dtype_name
from .loss_reduction import mean_scale, total_weight
from .loss_options import LossOptions
from .reference import losses as reference


def _split(logits: Tensor, target: Tensor, options: LossOptions, group) -> list[int]:
    """Every rank's slice size, agreed by all ranks; raises
    ValueError on every rank alike when a target is outside [0, total) and not ignored."""
    import torch.distributed as dist

    counted = target[target != options.ignore_index]
    low = int(counted.min()) if counted.numel() else 0
    high = int(counted.max()) if counted.numel() else 0
    mine = torch.tensor([logits.shape[1], low, high], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.to(logits.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    sizes, lows, highs = torch.stack(gathered).cpu().unbind(1)
    total = int(sizes.sum())
    if int(lows.min()) < 0 or int(highs.max()) >= total:
        bad = int(lows.min()) if int(lows.min()) < 0 else int(highs.max())
        raise ValueError(f"target: value {bad} is out of range [0, {total}) (the classes of all ranks) "
                         f"and is not ignore_index={options.ignore_index}")
    return sizes.tolist()


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


def _forward(logits, target, weight, grad, lse, options: LossOptions, group, sizes: list[int]):
    import torch.distributed as dist

    start, total_classes = sum(sizes[: dist.get_rank(group)]), sum(sizes)
    acc = accumulation_dtype(logits.dtype)
    total = total_weight(target, weight, options.ignore_index, acc)
    mean = options.reduction == "mean"
    backend = _backend.backend_for(logits)
    logits = logits.contiguous()
    if backend == "cpp":
        from . import _C

        stats = torch.empty(logits.shape[0], 5, dtype=acc)
        common = dict(dtype=dtype_name(logits.dtype), kind=options.kind,
                      label_smoothing=options.label_smoothing, softcap=options.softcap,
                      class_weight=loss_backends.as_float64(weight), ignore_index=options.ignore_index, vocab_start=start,
                      total_classes=total_classes, num_threads=torch.get_num_threads())
        _C.loss_row_stats(_backend.cpu_buffer(logits), _backend.cpu_buffer(target), stats.numpy(), **common)
        _combine_row_stats(stats, options.loss, group)
        rows = torch.empty(logits.shape[0], dtype=acc)
        _C.loss_from_stats(_backend.cpu_buffer(logits), _backend.cpu_buffer(target), stats.numpy(),
                           _backend.cpu_buffer(grad), rows.numpy(), lse.numpy(), gamma=options.gamma,
                           kappa=options.kappa, beta=options.beta, z_loss=options.lse_square_scale, alpha=None,
                           mean=mean, total_weight=float(total), **common)
    elif backend == "triton":
        from .triton_kernels import losses as kernels

        params = options.params()
        stats = kernels.row_stats(logits, target, weight, options.kind, params, options.ignore_index, start,
                                  total_classes)
        _combine_row_stats(stats, options.loss, group)
        rows, _ = kernels.loss_from_stats(logits, target, stats, weight, None, grad, options.kind, params,
                                          options.ignore_index, mean, start, total_classes, lse)
    else:
        # gloo gathers equal sizes only: every slice travels padded to the widest.
        pieces = [logits.new_empty((logits.shape[0], max(sizes))) for _ in sizes]
        dist.all_gather(pieces, torch.nn.functional.pad(logits, (0, max(sizes) - logits.shape[1])), group=group)
        z = torch.cat([piece[:, :size] for piece, size in zip(pieces, sizes)], dim=1).to(acc)
        rows, g, row_lse = reference.rows_and_grad(options.loss, z, target, weight, None, options.ignore_index,
                                                   **options.params())
        g = g[:, start:start + logits.shape[1]]
        grad.copy_(g * mean_scale(total) if mean else g)
        lse.copy_(row_lse)
    return loss_backends.reduce_rows(rows, total, options.reduction, logits.dtype)


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, options, group, sizes):
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=accumulation_dtype(logits.dtype), device=logits.device)
        value = _forward(logits, target, weight, grad, lse, options, group, sizes)
        loss_autograd.keep_gradient(ctx, grad, options.reduction, lse)
        return value, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("process_group: the vocabulary-parallel loss has first derivatives only "
                               "(create_graph=True is not supported)")
        if grad_loss is None:
            return (None,) * 6
        (grad,) = ctx.saved_tensors
        factor = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
        return (grad * factor,) + (None,) * 5


def loss(logits: Tensor, target: Tensor, weight, options: LossOptions, group) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` of the rows whose columns are split over ``group``; logits (N, K_r) this
    rank's slice, target (N,) global class indices, weight (K,) global or None."""
    sizes = _split(logits, target, options, group)
    if weight is not None:
        weight = _checks.class_vector("weight", weight, sum(sizes), logits.device, "logits")
    return _VocabParallelLoss.apply(logits, target, weight, options, group, sizes)
