"""The geometry metrics of K vectors (class means or classifier rows) in O(K·d + d²) memory.

Every metric that compares classes is a function of the K×K Gram of the rows, which at a
vocabulary's K (10⁵) does not fit in memory. Here nothing K×K is ever formed:

* from d×d products (O(K·d²) flops, float64): the Gram VᵀV (NC1 and, through ‖VVᵀ‖_F =
  ‖VᵀV‖_F and ⟨WWᵀ, ETF⟩, NC2/NC3), and from row sums the mean cosine
  Σ_{k≠l} c_kl / (K(K−1)) with Σ_{k≠l} c_kl = ‖Σ_k û_k‖² − Σ_k ‖û_k‖²;
* the metrics that truly need every pair (max-angle: mean |c_kl + 1/(K−1)|, Papyan, Han and
  Donoho 2020; CDNV: mean (σ_k² + σ_l²)/(2‖μ_k − μ_l‖²), Galanti et al.; the equiangularity,
  the standard deviation of c_kl, as Σ (c_kl − mean)²: centred on the known mean, it stays
  exact when all cosines agree, where Σc² − (Σc)²/P would cancel to ~1e-8) as a sweep over
  T×T tiles of cosines ÛᵢÛⱼᵀ, upper triangle only (the sums are symmetric in k, l), each tile
  one GEMM and one fused reduction (``csrc/ncstats.cpp`` on CPU, torch ops elsewhere).

Precision of the tiles (``pairwise_dtype``): float64 reproduces the dense float64 formulas to
rounding (~1e-15 relative). float32 takes half the memory and, on CPU, runs on oneDNN's
AVX-512 GEMM (:func:`ncfast._matmul.mm_t`): ~4× float64's rate on the 2-core Zen 5 measured
(≈ 430 against ≈ 107 GFLOP/s at d = 1024), ~2× where both use the same library. A
cosine of two unit rows then carries an absolute error below d·2⁻²⁴ (≈ √d·2⁻²⁴ in practice,
~2e-6 at d = 1024), so the max-angle is off by at most that much in absolute terms, and a
CDNV term by a relative 2‖u_k‖‖u_l‖/‖u_k − u_l‖² times it — small unless two means nearly
coincide relative to their length (never near collapse, where ‖u_k − u_l‖² ≈ ‖u_k‖² + ‖u_l‖²).
The d×d Grams are always float64; the equiangularity carries the tiles' cosine error; NC2/NC3
are √(2 − 2⟨A, E⟩/‖A‖_F) with an absolute error ~1e-8 when they are near 0 (they are distances
to the ETF: exactly collapsed gives ≲ 1e-8, not 0).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._matmul import mm_t

#: rows of one pairwise tile (its GEMM is T²·d multiply-adds). oneDNN allocates each product:
#: a 2048² float32 tile (16 MiB) is reused by the C allocator and stays in this CPU's 32 MiB L3
#: for the reduction, where a 4096² one (64 MiB) is a fresh mmap and page faults each time.
#: Measured on 2 Zen 5 cores at d = 1024: 460 GFLOP/s at T = 2048, 404 at T = 4096.
TILE_ROWS = 2048
#: rows converted to float64 at a time when summarising a K×d matrix (16 MiB at d = 1024)
BLOCK_ROWS = 2048
#: up to this many classes the pairwise tiles are float64 by default, float32 above
FLOAT64_TILES_UP_TO = 8192
#: column blocks of the float64 Gram VᵀV: only the 10 blocks on and above the diagonal are
#: multiplied (62.5 % of the flops; at d = 1024, 2048-row blocks: 27 ms instead of 41)
GRAM_COLUMN_BLOCKS = 4


@dataclasses.dataclass
class RowSummary:
    """What the metrics need of K vectors v_k (rows of a K×d matrix), in float64.

    ``norms`` (K,) ‖v_k‖; ``gram`` (d, d) VᵀV; ``unit_sum`` (d,) Σ_k û_k; ``unit_sq`` Σ_k ‖û_k‖²
    (K, less the zero rows); ``row_sum`` (d,) Σ_k v_k; ``unit`` (K, d) the unit rows in the
    tiles' dtype (``None`` unless asked for)."""

    norms: Tensor
    gram: Tensor
    unit_sum: Tensor
    unit_sq: float
    row_sum: Tensor
    unit: Optional[Tensor]


def row_blocks(count: int, index: Optional[Tensor]):
    """(start, stop, rows) for each block of ≤ BLOCK_ROWS of the ``count`` rows in use: ``rows``
    picks them out of the full matrix (a slice, or the block's part of ``index``), so a subset
    of classes is never copied whole."""
    for start in range(0, count, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, count)
        yield start, stop, (slice(start, stop) if index is None else index[start:stop])


def _add_upper_gram(gram: Tensor, rows: Tensor) -> None:
    """gram += rowsᵀ rows on and above the diagonal blocks only (``rows`` (R, d), ``gram``
    (d, d)); :func:`_mirror_upper` completes it once every block of rows is in."""
    d = gram.shape[0]
    width = -(-d // GRAM_COLUMN_BLOCKS)
    for i in range(0, d, width):
        gram[i:i + width, i:].addmm_(rows[:, i:i + width].T, rows[:, i:])


def _mirror_upper(gram: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle is ``gram``'s (exactly symmetric)."""
    return gram.triu() + gram.triu(1).T


def summarize_rows(matrix: Tensor, centre: Optional[Tensor], unit_dtype: Optional[torch.dtype],
                   index: Optional[Tensor] = None) -> RowSummary:
    """Summarise the rows v_k = matrix_k − centre of ``matrix`` (K, d) (only the rows ``index``
    when given), any float dtype, a block of rows at a time (no K×d float64 copy). ``centre``
    (d,) float64 or ``None``. ``unit_dtype``: also keep the unit rows (K, d) in that dtype for
    :func:`pairwise_sums`."""
    K, d = matrix.shape if index is None else (index.numel(), matrix.shape[1])
    f64 = dict(dtype=torch.float64, device=matrix.device)
    norms = torch.empty(K, **f64)
    gram = torch.zeros(d, d, **f64)
    unit_sum = torch.zeros(d, **f64)
    row_sum = torch.zeros(d, **f64)
    unit_sq = torch.zeros((), **f64)
    unit = None if unit_dtype is None else torch.empty(K, d, dtype=unit_dtype, device=matrix.device)
    for start, stop, selected in row_blocks(K, index):
        rows = matrix[selected].to(torch.float64, copy=True)  # a copy: normalised in place below
        if centre is not None:
            rows -= centre
        _add_upper_gram(gram, rows)
        row_sum += rows.sum(0)
        norm = torch.linalg.vector_norm(rows, dim=1)
        norms[start:stop] = norm
        rows.div_(norm[:, None])
        unit_sum += rows.sum(0)
        unit_sq += (rows * rows).sum()
        if unit is not None:
            unit[start:stop] = rows
    return RowSummary(norms, _mirror_upper(gram), unit_sum, float(unit_sq), row_sum, unit)


def std_mean_ratio(values: Tensor) -> float:
    """std/mean (unbiased std, as torch.std) of a 1-D tensor: the equinorm."""
    return float(values.std() / values.mean())


def mean_cosine(summary: RowSummary) -> float:
    """Mean over ordered pairs k ≠ l of cos∠(v_k, v_l), from the unit rows' sum."""
    K = summary.norms.shape[0]
    return (float(summary.unit_sum.dot(summary.unit_sum)) - summary.unit_sq) / (K * (K - 1))


def distance_to_etf(inner: float, frobenius: float, num_classes: int) -> float:
    """‖A/‖A‖_F − E‖_F for the unit simplex ETF Gram E = (I − 11ᵀ/K)/√(K−1) (Zhu et al. 2021
    eq. (8)–(9)), given ⟨A, E⟩ and ‖A‖_F: ‖E‖_F = 1, so the square is 2 − 2⟨A, E⟩/‖A‖_F."""
    return max(2.0 - 2.0 * inner / frobenius, 0.0) ** 0.5


def etf_inner(trace: float, row_sum: Tensor, col_sum: Tensor, num_classes: int) -> float:
    """⟨A, E⟩ for A = XYᵀ (K×K) from tr(A) = Σ_k x_k·y_k and the row sums Σx_k, Σy_k:
    ⟨A, I − 11ᵀ/K⟩/√(K−1) = (tr A − (Σx)·(Σy)/K)/√(K−1)."""
    K = num_classes
    return (trace - float(row_sum.dot(col_sum)) / K) / (K - 1) ** 0.5


def nc1(within_scatter: Tensor, num_samples: float, gram: Tensor, num_classes: int, per_class: bool,
        centred_means: Optional[Tensor] = None) -> float:
    """(1/K) tr(Σ_W Σ_B^†) (Zhu et al. 2021 eq. (7)) with Σ_B = M̄M̄ᵀ/K, ``gram`` = M̄M̄ᵀ (d×d)
    for the centred means M̄ (d×K). With M̄M̄ᵀ = Σ_i λ_i u_i u_iᵀ, Σ_B^† = K Σ_i λ_i⁻¹ u_i u_iᵀ
    and (1/K) tr(Σ_W Σ_B^†) = Σ_i λ_i⁻¹ u_iᵀ Σ_W u_i.

    Every factorisation is thin: for K ≤ d (pass ``centred_means`` (K, d)) a QR of the d×K M̄
    and an SVD of its K×K triangle (Σ_B's d − K + 1 null directions never appear, so they
    cannot produce spurious tiny eigenvalues to invert); for K > d an eigendecomposition of
    the d×d ``gram``. Both keep λ_i above d·eps·λ_max, torch.linalg.pinv's default rule for
    Σ_B."""
    d = gram.shape[0]
    if centred_means is not None:
        q, r = torch.linalg.qr(centred_means.T)
        u_r, s, _ = torch.linalg.svd(r, full_matrices=False)
        u, lam = q @ u_r, s * s
    else:
        lam, u = torch.linalg.eigh(gram)
    keep = lam > d * torch.finfo(torch.float64).eps * float(lam.max())
    u, lam = u[:, keep], lam[keep]
    sigma_w = within_scatter / num_samples
    trace_over_k = float(((u * (sigma_w @ u)).sum(0) / lam).sum())
    return trace_over_k if per_class else trace_over_k * num_classes


def _tile_sums_torch(cos: Tensor, norm_r: Tensor, norm_c: Tensor, var_r: Optional[Tensor], var_c: Optional[Tensor],
                     shift: float, mean: float, diagonal: bool):
    """The fused tile reduction of ``csrc/ncstats.cpp`` in torch ops (CUDA and the non-C++
    backends): (Σ|cos + shift|, Σ (v_k + v_l)/(2‖u_k − u_l‖²), Σ (cos − mean)²) over the tile."""
    c = cos.to(torch.float64)
    off = torch.ones_like(c, dtype=torch.bool)
    if diagonal:
        off.fill_diagonal_(False)
    abs_sum = float(torch.where(off, (c + shift).abs(), 0.0).sum())
    sq_sum = float(torch.where(off, (c - mean).square(), 0.0).sum())
    if var_r is None:
        return abs_sum, 0.0, sq_sum
    distance_sq = norm_r[:, None].square() + norm_c[None, :].square() - 2 * norm_r[:, None] * norm_c[None, :] * c
    terms = torch.where(off, (var_r[:, None] + var_c[None, :]) / (2 * distance_sq), 0.0)
    return abs_sum, float(terms.sum()), sq_sum


def _tile_sums(cos: Tensor, norm_r: Tensor, norm_c: Tensor, var_r: Optional[Tensor], var_c: Optional[Tensor],
               shift: float, mean: float, diagonal: bool):
    if _backend.backend_for(cos) != "cpp":
        return _tile_sums_torch(cos, norm_r, norm_c, var_r, var_c, shift, mean, diagonal)
    from . import _C

    empty = torch.empty(0, dtype=torch.float64).numpy()
    return _C.ncstats_pairwise_tile(
        cos.numpy(), norm_r.numpy(), norm_c.numpy(), empty if var_r is None else var_r.numpy(),
        empty if var_c is None else var_c.numpy(), shift, mean, diagonal, torch.get_num_threads())


def pairwise_sums(unit: Tensor, norms: Tensor, variances: Optional[Tensor] = None, mean_cos: float = 0.0,
                  tile: Optional[int] = None):
    """Means over ordered pairs k ≠ l of |cos_kl + 1/(K−1)| (max-angle) and, with
    ``variances`` (K,) σ_k², of (σ_k² + σ_l²)/(2‖u_k − u_l‖²) (CDNV), and the unbiased std of
    cos_kl around its mean ``mean_cos`` (:func:`mean_cosine`; the equiangularity), where
    ``unit`` (K, d) holds û_k and ``norms`` (K,) ‖u_k‖. Only the tiles i ≤ j are computed (each
    off-diagonal one counts twice); memory is one T×T tile (``tile`` rows, default
    :data:`TILE_ROWS`). Float32 CPU tiles are oneDNN's products (:func:`ncfast._matmul.mm_t`).
    Returns (max_angle, cdnv or None, equiangularity)."""
    K = unit.shape[0]
    tile = TILE_ROWS if tile is None else tile
    shift = 1.0 / (K - 1)
    abs_total = cdnv_total = sq_total = 0.0
    for i in range(0, K, tile):
        rows = unit[i:i + tile]
        for j in range(i, K, tile):
            cols = unit[j:j + tile]
            cos = mm_t(rows, cols)
            var_r = None if variances is None else variances[i:i + tile]
            var_c = None if variances is None else variances[j:j + tile]
            abs_sum, cdnv_sum, sq_sum = _tile_sums(cos, norms[i:i + tile], norms[j:j + tile], var_r, var_c, shift,
                                                   mean_cos, i == j)
            weight = 1.0 if i == j else 2.0
            abs_total += weight * abs_sum
            cdnv_total += weight * cdnv_sum
            sq_total += weight * sq_sum
    pairs = K * (K - 1)
    equiangularity = (sq_total / (pairs - 1)) ** 0.5 if pairs > 1 else 0.0
    return abs_total / pairs, (None if variances is None else cdnv_total / pairs), equiangularity
