"""The first-pass neural-collapse metrics of a streamed state (:class:`NCMetrics`), assembled
from the O(K·d + d²) products of ``ncstats_pairwise``: no K×K matrix is ever formed."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from . import ncstats_pairwise as pairwise
from .ncstats_checks import ieee_fp32_matmul


# --------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------
class UndefinedMetricError(ValueError):
    """A metric came out non-finite: the statistics overflow float64 or their geometry leaves it
    undefined (e.g. every feature 0, or two classes sharing a mean, for the CDNV)."""


@dataclasses.dataclass
class NCMetrics:
    """Neural-collapse metrics. Classifier metrics are ``None`` without a weight; second-pass
    metrics are ``None`` without a :class:`NCSecondPass`. ``classes_used`` is the number of
    classes the metrics ran over: ``num_classes``, or the observed ones with
    ``classes="observed"``.

    ``str(metrics)`` is a two-column table; :meth:`as_dict` gives plain Python values.
    """

    num_samples: int
    num_classes: int
    classes_used: int
    dim: int
    nc1: float  #: (1/K) tr(Σ_W Σ_B^†), Zhu et al. 2021 eq. (7)
    equinorm_means: float  #: std/mean of ‖μ_k − μ_G‖
    equiangularity_means: float  #: std over k≠l of cos∠(μ_k − μ_G, μ_l − μ_G)
    max_angle_means: float  #: mean over k≠l of |cos + 1/(K−1)|
    cdnv: float  #: mean over k≠l of (σ_k² + σ_l²)/(2‖μ_k − μ_l‖²)
    nc2: Optional[float] = None  #: ‖WWᵀ/‖WWᵀ‖_F − ETF‖_F, Zhu et al. 2021 eq. (8)
    nc3: Optional[float] = None  #: ‖WM̄/‖WM̄‖_F − ETF‖_F, Zhu et al. 2021 eq. (9)
    nc4: Optional[float] = None  #: ‖b + Wμ_G‖₂, Zhu et al. 2021 eq. (10)
    equinorm_classifier: Optional[float] = None
    equiangularity_classifier: Optional[float] = None
    max_angle_classifier: Optional[float] = None
    ncc_mismatch: Optional[float] = None  #: fraction with argmax(Wh+b) ≠ argmin_k ‖h − μ_k‖
    cosine_margin_quantiles: Optional[dict] = None  #: {q: value}, from the histogram
    cosine_margin_histogram: Optional[dict] = None  #: {"edges": [...], "counts": [...]}
    numerical_rank: Optional[float] = None  #: (1/K) Σ_k (‖H_k‖_*/‖H_k‖_F)², Zhou et al. 2022 §4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UndefinedMetricError(f"{field.name}: came out {value}; the statistics overflow float64 or are degenerate "
                                 f"(e.g. two classes share a mean)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "cosine_margin_histogram":
                continue
            if field.name == "cosine_margin_quantiles":
                for q, v in value.items():
                    rows.append((f"cosine_margin q={q:g}", f"{v:.6g}"))
            elif isinstance(value, float):
                rows.append((field.name, f"{value:.6g}"))
            else:
                rows.append((field.name, str(value)))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def global_mean_of(counts: Tensor, means: Tensor, global_mean: str, index: Optional[Tensor] = None) -> Tensor:
    """μ_G (d,) float64: the mean of all samples ("samples") or of the class means ("classes")
    of the classes ``index`` (all when ``None``), with no K×d temporary."""
    if global_mean == "samples":  # classes outside ``index`` have no samples: they add nothing
        return (counts @ means) / counts.sum()
    total = torch.zeros(means.shape[1], dtype=torch.float64, device=means.device)
    count = means.shape[0] if index is None else index.numel()
    for _, _, rows in pairwise.row_blocks(count, index):
        total += means[rows].sum(0)
    return total / count


def _pairwise_dtype(value: Optional[torch.dtype], num_classes: int) -> torch.dtype:
    if value is None:
        return torch.float64 if num_classes <= pairwise.FLOAT64_TILES_UP_TO else torch.float32
    if value not in (torch.float32, torch.float64):
        raise ValueError(f"pairwise_dtype: expected torch.float32, torch.float64 or None, got {value!r}")
    return value


def _classifier_metrics(w: Tensor, b: Optional[Tensor], means: Tensor, mu_g: Tensor, mean_summary,
                        center_classifier: bool, tile_dtype: torch.dtype, index: Optional[Tensor]) -> dict:
    """NC2, NC3, NC4 and the classifier's equinorm / equiangularity / max-angle from d×d
    products and one pairwise sweep (``ncstats_pairwise``), a block of rows at a time, over the
    rows ``index`` of w (K, d) and means (K, d) (all when ``None``); b (K',) already selected."""
    K = w.shape[0] if index is None else index.numel()
    centre = None
    if center_classifier:
        centre = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
        for _, _, rows in pairwise.row_blocks(K, index):
            centre += w[rows].sum(0, dtype=torch.float64)
        centre /= K
    summary = pairwise.summarize_rows(w, centre, tile_dtype, index)
    trace_wm = 0.0  # tr(W_c M̄) = Σ_k (w_k − w̄)·(μ_k − μ_G)
    logit_bias = torch.empty(K, dtype=torch.float64, device=w.device)
    for start, stop, selected in pairwise.row_blocks(K, index):
        rows = w[selected].to(torch.float64, copy=True)
        logit_bias[start:stop] = rows @ mu_g
        if centre is not None:
            rows -= centre
        trace_wm += float((rows * (means[selected] - mu_g)).sum())
    if b is not None:
        logit_bias += b
    gram, w_sum = summary.gram, summary.row_sum
    max_angle, _, equiangularity = pairwise.pairwise_sums(summary.unit, summary.norms,
                                                          mean_cos=pairwise.mean_cosine(summary))
    return dict(
        nc2=pairwise.distance_to_etf(pairwise.etf_inner(float(gram.trace()), w_sum, w_sum, K),
                                     float(torch.linalg.matrix_norm(gram)), K),
        nc3=pairwise.distance_to_etf(pairwise.etf_inner(trace_wm, w_sum, mean_summary.row_sum, K),
                                     float((gram * mean_summary.gram).sum()) ** 0.5, K),
        nc4=float(torch.linalg.vector_norm(logit_bias)),
        equinorm_classifier=pairwise.std_mean_ratio(summary.norms),
        equiangularity_classifier=equiangularity,
        max_angle_classifier=max_angle,
    )


def state_metrics(counts: Tensor, means: Tensor, class_sq: Tensor, within_scatter: Tensor, w: Optional[Tensor],
                  b: Optional[Tensor], index: Optional[Tensor], *, nc1_per_class: bool, global_mean: str,
                  center_classifier: bool, pairwise_dtype: Optional[torch.dtype]) -> dict:
    """The first-pass fields of :class:`NCMetrics` of a state: counts (K,), means (K, d),
    class_sq (K,), M_W (d, d), classifier rows w (K, d) and b (K,) or None (already checked),
    over the classes ``index`` (all when ``None``; every class used has samples). The rows in
    use are read a block at a time, never copied whole."""
    num_classes, d = means.shape
    K = num_classes if index is None else index.numel()
    mu_g = global_mean_of(counts, means, global_mean, index)
    if index is not None:
        counts, class_sq, b = counts[index], class_sq[index], None if b is None else b[index]
    tile_dtype = _pairwise_dtype(pairwise_dtype, K)
    summary = pairwise.summarize_rows(means, mu_g, tile_dtype, index)
    with ieee_fp32_matmul(means.device):
        max_angle, cdnv, equiangularity = pairwise.pairwise_sums(summary.unit, summary.norms, class_sq / counts,
                                                                 pairwise.mean_cosine(summary))
        summary.unit = None  # the K×d tile operand is not needed any more
        values = dict(
            num_samples=int(counts.sum()), num_classes=num_classes, classes_used=K, dim=d,
            nc1=pairwise.nc1(within_scatter, float(counts.sum()), summary.gram, K, nc1_per_class,
                             (means if index is None else means[index]) - mu_g if K <= d else None),
            equinorm_means=pairwise.std_mean_ratio(summary.norms),
            equiangularity_means=equiangularity,
            max_angle_means=max_angle, cdnv=cdnv,
        )
        if w is not None:
            values.update(_classifier_metrics(w, b, means, mu_g, summary, center_classifier, tile_dtype, index))
    return values
