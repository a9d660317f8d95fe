"""Triton batch kernels of the streaming neural-collapse statistics, the GPU counterpart of
``csrc/ncstats.cpp`` (whose header derives the centring that folds Chan, Golub and LeVeque's
pairwise correction into the rows).

Two kernels, both free of atomics so that every result is bit-identical run to run:

* ``_class_sums_kernel``: per-class counts and float64 sums. One program owns a block of
  classes × a block of columns and walks all rows, adding ``onehot(y)ᵀ · x`` (an exact
  float64 product: the one-hot entries are 0 or 1).
* ``_centre_kernel``: one program per block of rows writes ``scale·(h_i − p_{y_i})`` (float32,
  or float64 for float64 features; ``scale`` a power of two) and the rows' squared norms
  ‖h_i − p_{y_i}‖² in float64; the per-class sums of those norms reuse ``_class_sums_kernel``
  on a one-column matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _class_sums_kernel(x_ptr, x_stride, y_ptr, sums_ptr, counts_ptr, N, D, K,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    classes = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float64)
    count = tl.zeros((BLOCK_K,), dtype=tl.float64)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        y = tl.load(y_ptr + rows, mask=in_rows, other=-1)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :],
                    mask=in_rows[:, None] & (cols[None, :] < D), other=0.0).to(tl.float64)
        onehot = (classes[:, None] == y[None, :]).to(tl.float64)
        acc += tl.dot(onehot, x)
        count += tl.sum(onehot, axis=1)
    in_classes = classes < K
    tl.store(sums_ptr + classes[:, None] * D + cols[None, :], acc,
             mask=in_classes[:, None] & (cols[None, :] < D))
    if pid_d == 0:
        tl.store(counts_ptr + classes, count, mask=in_classes)


@triton.jit
def _centre_kernel(x_ptr, x_stride, y_ptr, means_ptr, out_ptr, out_stride, row_sq_ptr, scale_ptr, N, D,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    y = tl.load(y_ptr + rows, mask=in_rows, other=0)
    row_sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    scale = tl.load(scale_ptr)  # float64: a Triton float scalar is float32 and cannot hold 2^±149
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = in_rows[:, None] & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float64)
        mean = tl.load(means_ptr + y[:, None] * D + cols[None, :], mask=mask, other=0.0)
        centred = x - mean
        row_sq += tl.sum(centred * centred, axis=1)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], (centred * scale).to(out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(row_sq_ptr + rows, row_sq, mask=in_rows)


def _class_sums(x: torch.Tensor, target: torch.Tensor, num_classes: int):
    N, D = x.shape
    sums = torch.empty(num_classes, D, dtype=torch.float64, device=x.device)
    counts = torch.empty(num_classes, dtype=torch.float64, device=x.device)
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    block_k = min(64, max(16, triton.next_power_of_2(num_classes)))
    grid = (triton.cdiv(D, block_d), triton.cdiv(num_classes, block_k))
    _class_sums_kernel[grid](x, x.stride(0), target, sums, counts, N, D, num_classes,
                             BLOCK_N=32, BLOCK_D=block_d, BLOCK_K=block_k)
    return counts, sums


def class_means(features: torch.Tensor, target: torch.Tensor, num_classes: int):
    """Per-class counts (K,) and means (K, d) in float64 of ``features`` (N, d) with contiguous
    rows; ``target`` (N,) int64 already checked to lie in [0, K)."""
    counts, sums = _class_sums(features, target, num_classes)
    return counts, sums / counts.clamp(min=1)[:, None]


def centre_rows(features: torch.Tensor, target: torch.Tensor, centres: torch.Tensor, centred: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Fills ``centred`` (N, d) (float32, or float64 for float64 features) with
    scale·(h_i − c_{y_i}) for the float64 ``centres`` (K, d) and returns the per-class sums of
    ‖h_i − c_{y_i}‖² (K,) in float64."""
    N, D = features.shape
    row_sq = torch.empty(N, dtype=torch.float64, device=features.device)
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    _centre_kernel[(triton.cdiv(N, 32),)](features, features.stride(0), target, centres, centred, centred.stride(0),
                                          row_sq, torch.tensor([scale], dtype=torch.float64, device=features.device),
                                          N, D, BLOCK_N=32, BLOCK_D=block_d)
    _, class_sq = _class_sums(row_sq[:, None], target, centres.shape[0])
    return class_sq[:, 0]
