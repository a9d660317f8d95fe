"""Plain float64 references of the neural-collapse metrics: two-pass from all features at
once (:func:`nc_metrics_two_pass`), and the dense K×K formulas applied to a streamed state
(:func:`nc_metrics_dense`).

Everything here is written for clarity, not speed: the tests compare :mod:`ncfast.ncstats`
against them. Features are rows: ``features`` (N, d), ``target`` (N,),
``weight`` (K, d), ``bias`` (K,).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def etf(num_classes: int, dtype=torch.float64, device=None) -> Tensor:
    """(I_K − 11ᵀ/K)/√(K−1): the simplex ETF Gram with unit Frobenius norm (Zhu et al., NeurIPS
    2021, eq. (8))."""
    K = num_classes
    return (torch.eye(K, dtype=dtype, device=device) - 1.0 / K) / (K - 1) ** 0.5


def _std_mean_ratio(values: Tensor) -> float:
    return float(values.std() / values.mean())


def _off_diagonal_cosines(vectors: Tensor) -> Tensor:
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    K = cos.shape[0]
    return cos[~torch.eye(K, dtype=torch.bool, device=cos.device)]


def _classifier_metrics(out: dict, weight: Tensor, bias, mbar: Tensor, mu_g: Tensor, center_classifier: bool):
    """NC2–NC4 and the classifier's equinorm/equiangularity/max-angle, densely, into ``out``;
    returns W and b in float64."""
    K = weight.shape[0]
    w = weight.to(torch.float64)
    b = torch.zeros(K, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    wc = w - w.mean(0) if center_classifier else w
    wwt = wc @ wc.T
    out["nc2"] = float((wwt / wwt.norm() - etf(K)).norm())
    wm = wc @ mbar
    out["nc3"] = float((wm / wm.norm() - etf(K)).norm())
    out["nc4"] = float((b + w @ mu_g).norm())
    out["equinorm_classifier"] = _std_mean_ratio(wc.norm(dim=1))
    cos_w = _off_diagonal_cosines(wc)
    out["equiangularity_classifier"] = float(cos_w.std())
    out["max_angle_classifier"] = float((cos_w + 1.0 / (K - 1)).abs().mean())
    return w, b


def nc_metrics_two_pass(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    nc1_per_class: bool = True,
    global_mean: str = "samples",
    center_classifier: bool = False,
    pinv_via_means: bool = False,
    quantiles=(0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0),
) -> dict:
    """Every metric of :class:`ncfast.NCMetrics` from all data at once, in float64, the textbook way.

    Class means first, then Σ_W from the centred features (two passes), Σ_B as a d×d matrix
    and ``torch.linalg.pinv(Σ_B, hermitian=True)`` (default tolerance max(d, d)·eps). For large
    d that pinv costs O(d³); ``pinv_via_means=True`` uses (M̄M̄ᵀ)^† = (M̄^†)ᵀM̄^† instead, with
    ``torch.linalg.pinv`` of the d×K matrix M̄. The other flags mean what they mean in
    :meth:`ncfast.NCStats.compute`. The cosine margins come back whole
    (``"cosine_margins"``, (N,)) besides their quantiles.
    """
    h = features.to(torch.float64)
    K = num_classes
    N, d = h.shape
    means = torch.stack([h[target == k].mean(0) for k in range(K)])
    mu_g = h.mean(0) if global_mean == "samples" else means.mean(0)
    centred = h - means[target]
    sigma_w = centred.T @ centred / N
    mbar = (means - mu_g).T  # d×K
    if pinv_via_means:
        mbar_pinv = torch.linalg.pinv(mbar)
        sigma_b_pinv = K * mbar_pinv.T @ mbar_pinv
    else:
        sigma_b_pinv = torch.linalg.pinv(mbar @ mbar.T / K, hermitian=True)
    trace = (sigma_w * sigma_b_pinv.T).sum()  # tr(AB) without the d³ product
    out = {"nc1": float(trace / K if nc1_per_class else trace)}
    class_var = torch.stack([(centred[target == k] ** 2).sum(1).mean() for k in range(K)])
    mean_norms = (means - mu_g).norm(dim=1)
    out["equinorm_means"] = _std_mean_ratio(mean_norms)
    cos_means = _off_diagonal_cosines((means - mu_g))
    out["equiangularity_means"] = float(cos_means.std())
    out["max_angle_means"] = float((cos_means + 1.0 / (K - 1)).abs().mean())
    cdnv = []
    for k in range(K):
        for l in range(K):
            if k != l:
                cdnv.append((class_var[k] + class_var[l]) / (2 * ((means[k] - means[l]) ** 2).sum()))
    out["cdnv"] = float(torch.stack(cdnv).mean())
    num_rank = []
    for k in range(K):
        hk = h[target == k]
        num_rank.append((torch.linalg.matrix_norm(hk, "nuc") / torch.linalg.matrix_norm(hk, "fro")) ** 2)
    out["numerical_rank"] = float(torch.stack(num_rank).mean())
    if weight is None:
        return out
    w, b = _classifier_metrics(out, weight, bias, mbar, mu_g, center_classifier)
    classifier = (h @ w.T + b).argmax(1)
    ncc = torch.cdist(h, means).argmin(1)
    out["ncc_mismatch"] = float((classifier != ncc).to(torch.float64).mean())
    # Zhou et al. 2022 §4: cos θ_j between h − μ_G and w_j − w̄, margin cos θ_y − max_{j≠y} cos θ_j.
    wt = w - w.mean(0)
    hc = h - mu_g
    cos = (hc @ wt.T) / (hc.norm(dim=1, keepdim=True) * wt.norm(dim=1)[None, :])
    true_cos = cos[torch.arange(N), target]
    others = cos.clone()
    others[torch.arange(N), target] = -float("inf")
    margins = true_cos - others.max(1).values
    out["cosine_margins"] = margins
    # The q-quantile as the inverse CDF: the smallest margin with at least q·N margins ≤ it.
    ordered = margins.sort().values
    out["cosine_margin_quantiles"] = {q: float(ordered[max(math.ceil(q * N) - 1, 0)]) for q in quantiles}
    return out


def nc_metrics_dense(
    counts: Tensor, means: Tensor, within_scatter: Tensor, class_sq: Tensor,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
    nc1_per_class: bool = True, global_mean: str = "samples", center_classifier: bool = False,
) -> dict:
    """The first-pass metrics of a streamed state (counts (K,), means (K, d), M_W (d, d),
    Σ_{i∈k}‖h_i − μ_k‖² (K,)) by the dense float64 formulas: every K×K matrix (cosines, Gram,
    distances, the ETF, WWᵀ, WM̄) formed whole. O(K²) memory: the oracle that
    :meth:`ncfast.NCStats.compute`'s tiled, O(K·d + d²) path is tested against."""
    K = counts.shape[0]
    n = counts.to(torch.float64)
    means = means.to(torch.float64)
    mu_g = (n[:, None] * means).sum(0) / n.sum() if global_mean == "samples" else means.mean(0)
    centred = means - mu_g
    mbar = centred.T
    sigma_b_pinv = torch.linalg.pinv(mbar @ mbar.T / K, hermitian=True)
    trace = ((within_scatter / n.sum()) * sigma_b_pinv.T).sum()
    out = {"nc1": float(trace / K if nc1_per_class else trace)}
    out["equinorm_means"] = _std_mean_ratio(centred.norm(dim=1))
    cos = _off_diagonal_cosines(centred)
    out["equiangularity_means"] = float(cos.std())
    out["max_angle_means"] = float((cos + 1.0 / (K - 1)).abs().mean())
    class_var = class_sq / n
    gram = centred @ centred.T
    distance_sq = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    off = ~torch.eye(K, dtype=torch.bool, device=means.device)
    out["cdnv"] = float(((class_var[:, None] + class_var[None, :]) / (2 * distance_sq))[off].mean())
    if weight is None:
        return out
    _classifier_metrics(out, weight, bias, mbar, mu_g, center_classifier)
    return out
