"""Reference loss formulas, written plainly in torch; autograd gives their gradients.

Cross-entropy with label smoothing, focal loss and rescaled MSE as in Zhou, You, Li, Liu, Liu,
Qu, Zhu (NeurIPS 2022) "Are All Losses Created Equal: A Neural Collapse Perspective", eq. (3)–(6).
Each ``*_rows`` function returns the per-row loss ``w_{y_i}·ℓ_i`` (0 for ignored rows) and is
differentiable; :func:`rows_and_grad` gives the gradient in closed form, itself differentiable
(the second derivatives of the fused ops are taken through it)."""

from __future__ import annotations

import torch

from ..loss_reduction import total_weight


def _gather_target(values: torch.Tensor, target: torch.Tensor, ignore_index: int):
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    return values.gather(1, safe[:, None])[:, 0], keep, safe


def _class_factor(weight, safe, keep, dtype):
    factor = keep.to(dtype)
    if weight is not None:
        factor = factor * weight.to(dtype)[safe]
    return factor


def capped(logits, softcap=0.0):
    """softcap·tanh(z/softcap) (Gemma 2's logit cap); the logits themselves when softcap is 0."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                       softcap=0.0):
    """ℓ = w_y (lse(z) − Σ_j q_j z_j), q = (1−α)e_y + α/K (Zhou et al., NeurIPS 2022, eq. (3), (5));
    with class weights the smoothing term is (α/K) Σ_j w_j (lse − z_j), as in torch. Optional z-loss
    w_y λ lse², on the logits capped by softcap·tanh(z/softcap) when softcap > 0."""
    logits = capped(logits, softcap)
    log_p = torch.log_softmax(logits, dim=1)
    log_p_y, keep, safe = _gather_target(log_p, target, ignore_index)
    row_weight = _class_factor(weight, safe, keep, logits.dtype)
    loss = -(1 - label_smoothing) * log_p_y * row_weight
    if label_smoothing > 0:
        column_weight = 1.0 if weight is None else weight.to(logits.dtype)
        loss = loss - label_smoothing / logits.shape[1] * (log_p * column_weight).sum(dim=1)
    if lse_square_scale > 0:
        loss = loss + lse_square_scale * row_weight * torch.logsumexp(logits, dim=1) ** 2
    return torch.where(keep, loss, 0.0)


def focal_rows(logits, target, gamma=2.0, alpha=None, weight=None, ignore_index=-100):
    """ℓ = −α_y (1−p_y)^γ log p_y (Zhou et al., NeurIPS 2022, eq. (4); Lin et al., ICCV 2017)."""
    log_p_y, keep, safe = _gather_target(torch.log_softmax(logits, dim=1), target, ignore_index)
    one_minus_p = -torch.expm1(log_p_y)
    # (1-p)^γ with a gradient that stays finite at p = 1 (the limit there is 0 for γ > 0).
    positive = one_minus_p > 0
    modulator = torch.where(positive, torch.where(positive, one_minus_p, 1.0) ** gamma, 0.0 ** gamma)
    loss = -modulator * log_p_y
    if alpha is not None:
        loss = loss * alpha.to(logits.dtype)[safe]
    return torch.where(keep, loss, 0.0) * _class_factor(weight, safe, keep, logits.dtype)


def rescaled_mse_rows(logits, target, kappa=1.0, beta=1.0, weight=None, ignore_index=-100):
    """ℓ = κ(z_y − β)² + Σ_{j≠y} z_j² (Zhou et al., NeurIPS 2022, eq. (6); Zhou et al., ICML 2022,
    eq. (4) with (α, M) = (κ, β))."""
    z_y, keep, safe = _gather_target(logits, target, ignore_index)
    is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, safe[:, None], True)
    others = (logits**2).masked_fill(is_target, 0.0).sum(dim=1)
    loss = kappa * (z_y - beta) ** 2 + others
    return torch.where(keep, loss, 0.0) * _class_factor(weight, safe, keep, logits.dtype)


def soft_cross_entropy_rows(logits, target, weight=None, label_smoothing=0.0, softcap=0.0):
    """Cross-entropy against probability targets q (N, K), as torch defines it:
    ℓ_i = −Σ_j w_j q'_ij log p_ij with q' = (1−α) q + α/K (no ignore_index; "mean" divides by N)."""
    logits = capped(logits, softcap)
    return -(_weighted_soft_target(target, weight, label_smoothing, logits.dtype) * torch.log_softmax(logits, 1)).sum(1)


def _weighted_soft_target(target, weight, label_smoothing, dtype):
    q = target.to(dtype)
    if label_smoothing > 0:
        q = (1 - label_smoothing) * q + label_smoothing / q.shape[1]
    return q if weight is None else q * weight.to(dtype)


def reduce(rows, target, weight, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / total_weight(target, weight, ignore_index, rows.dtype)


def rows_and_grad(loss, logits, target, weight=None, alpha=None, ignore_index=-100, label_smoothing=0.0,
                  gamma=2.0, kappa=1.0, beta=1.0, lse_square_scale=0.0, softcap=0.0):
    """Per-row losses, their gradient ∂(Σ_i rows_i)/∂logits in closed form (the g column of
    Zhou et al. 2022, eq. (3)–(6)) and each row's lse (0 for ignored rows and the MSE), without
    autograd: the ``"torch"`` backend, and — being made of differentiable torch ops — the first
    derivative that second-order autograd differentiates. Ignored rows get exactly 0 even when
    they hold ±inf/NaN (their logits are replaced before any arithmetic). ``target`` is (N,)
    class indices, or (N, K) probabilities for cross-entropy. Tests check it against autograd
    of the ``*_rows`` functions above."""
    if target.is_floating_point():
        keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        keep = target != ignore_index
        logits = torch.where(keep[:, None], logits, 0.0)
    z = capped(logits, softcap)
    if target.is_floating_point():
        rows, grad = _soft_rows_and_grad(z, target, weight, label_smoothing)
    else:
        rows, grad = _rows_and_grad(loss, z, target, weight, alpha, ignore_index, label_smoothing, gamma, kappa,
                                    beta, lse_square_scale)
    lse = torch.where(keep, torch.logsumexp(z, dim=1), 0.0) if loss != "rescaled_mse" else torch.zeros_like(rows)
    if softcap:
        grad = grad * (1 - (z / softcap) ** 2)
    return rows, grad, lse


def _soft_rows_and_grad(logits, target, weight, label_smoothing):
    """g_ij = (Σ_k w_k q'_ik) p_ij − w_j q'_ij, the gradient of :func:`soft_cross_entropy_rows`."""
    wq = _weighted_soft_target(target, weight, label_smoothing, logits.dtype)
    rows = -(wq * torch.log_softmax(logits, 1)).sum(1)
    return rows, wq.sum(1, keepdim=True) * torch.softmax(logits, 1) - wq


def soft_target_grad(logits, weight=None, label_smoothing=0.0, softcap=0.0):
    """∂(Σ_i ℓ_i)/∂q for probability targets: −(1−α) w_j log p_ij (torch differentiates the
    target too, e.g. for distillation from a trained teacher)."""
    log_p = torch.log_softmax(capped(logits, softcap), 1)
    grad = -(1 - label_smoothing) * log_p
    return grad if weight is None else grad * weight.to(log_p.dtype)


def _rows_and_grad(loss, logits, target, weight, alpha, ignore_index, label_smoothing, gamma, kappa, beta,
                   lse_square_scale):
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    row_factor = _class_factor(weight, safe, keep, logits.dtype)  # w_y, 0 on ignored rows
    is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, safe[:, None], True)
    if loss == "rescaled_mse":
        rows = rescaled_mse_rows(logits, target, kappa, beta, weight, ignore_index)
        z_y = logits.gather(1, safe[:, None])
        grad = torch.where(is_target, 2 * kappa * (z_y - beta), 2 * logits)
        return rows, grad * row_factor[:, None]
    p = torch.softmax(logits, dim=1)
    one_hot = is_target.to(logits.dtype)
    if loss == "cross_entropy":
        rows = cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, lse_square_scale)
        column_weight = logits.new_ones(logits.shape[1]) if weight is None else weight.to(logits.dtype)
        smoothing = label_smoothing / logits.shape[1] * (column_weight.sum() * p - column_weight)
        grad = (1 - label_smoothing) * row_factor[:, None] * (p - one_hot) + keep[:, None] * smoothing
        if lse_square_scale > 0:
            lse = torch.logsumexp(logits, dim=1)
            grad = grad + (2 * lse_square_scale * row_factor * lse)[:, None] * p
        return rows, grad
    rows = focal_rows(logits, target, gamma, alpha, weight, ignore_index)
    log_p_y = torch.log_softmax(logits, dim=1).gather(1, safe[:, None])[:, 0]
    one_minus_p = -torch.expm1(log_p_y)
    positive = one_minus_p > 0
    modulator = torch.where(positive, torch.where(positive, one_minus_p, 1.0) ** gamma, 0.0**gamma)
    log_ratio = torch.where(positive, log_p_y / torch.where(positive, one_minus_p, 1.0), -1.0)
    c = modulator * (gamma * (1 - one_minus_p) * log_ratio - 1)  # ℓ' factor: g = c (e_y − p)
    factor = row_factor if alpha is None else row_factor * alpha.to(logits.dtype)[safe]
    return rows, (factor * c)[:, None] * (one_hot - p)
