"""The UFM solver against the papers' closed-form global minima (Zhou et al., ICML 2022, Thm 3.1;
Wang et al. 2022, Prop. 1 and 3)."""

import math

import pytest
import torch

from ncfast import ufm
from ncfast.ncstats import NCStats


def _random_orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def _prop1_point(K, n, d, lw, lh):
    """Wang et al. (2022) Prop. 1 (ii), written with rows: W = (nλ_H/λ_W)^{1/4} √γ V̄ Uᵀ,
    H_i = √(λ_W/(nλ_H)) W, b = 1/K."""
    gamma = 1 - K * math.sqrt(n * lw * lh)
    centred = torch.eye(K, dtype=torch.float64) - 1 / K
    vbar = torch.linalg.qr(centred[:, : K - 1])[0]  # V̄ V̄ᵀ = P
    W = (n * lh / lw) ** 0.25 * math.sqrt(gamma) * vbar @ _random_orthonormal(d, K - 1, 1).T
    H = math.sqrt(lw / (n * lh)) * W.repeat(n, 1)
    return W, H, torch.full((K,), 1 / K, dtype=torch.float64)


def _prop3_point(K, n, d, lw, lh):
    """Wang et al. (2022) Prop. 3 (ii): W = (nλ_H/λ_W)^{1/4} √(log γ) (U P)ᵀ, H_i = √(λ_W/(nλ_H)) W."""
    gamma = 1 / math.sqrt(n * lw * lh) - K + 1
    centred = torch.eye(K, dtype=torch.float64) - 1 / K
    W = (n * lh / lw) ** 0.25 * math.sqrt(math.log(gamma)) * (_random_orthonormal(d, K, 2) @ centred).T
    return W, math.sqrt(lw / (n * lh)) * W.repeat(n, 1)


PROBLEMS = [(10, 10, 20, 5e-4, 5e-5), (4, 5, 6, 1e-3, 1e-2), (3, 7, 3, 2e-2, 1e-3), (6, 2, 11, 1e-2, 2e-3)]


@pytest.mark.parametrize("K,n,d,lw,lh", PROBLEMS)
def test_optimal_objective_is_the_papers_closed_forms(K, n, d, lw, lh):
    assert lw * lh < 1 / (n * K * K)
    y = ufm.balanced_labels(K, n)
    W, H, b = _prop1_point(K, n, d, lw, lh)
    at_point = float(ufm.objective(W, H, b, y, "mse", lw, lh))
    s = math.sqrt(n * lw * lh)
    assert ufm.optimal_objective(K, n, d, "mse", lw, lh) == pytest.approx(at_point, rel=1e-12)
    assert ufm.optimal_objective(K, n, d, "mse", lw, lh) == pytest.approx((K - 1) * (s - K * s * s / 2), rel=1e-12)
    if d >= K:
        W, H = _prop3_point(K, n, d, lw, lh)
        at_point = float(ufm.objective(W, H, None, y, "ce", lw, lh))
        assert ufm.optimal_objective(K, n, d, "ce", lw, lh, bias=False) == pytest.approx(at_point, rel=1e-12)


def test_optimal_objective_above_threshold_is_zero_solution():
    K, n = 5, 4
    lw = lh = 1.0 / math.sqrt(n * K * K)  # λ_Wλ_H = 1/(nK²): W = H = 0
    assert ufm.optimal_objective(K, n, 8, "mse", lw, lh) == pytest.approx((K - 1) / (2 * K), rel=1e-14)
    assert ufm.optimal_objective(K, n, 8, "ce", lw, lh, bias=False) == pytest.approx(math.log(K), rel=1e-14)
    for loss, bias in (("mse", True), ("ce", False)):  # the solver finds the collapse to zero
        result = ufm.solve(K, n, 8, loss, 2 * lw, 2 * lh, bias=bias, method="lbfgs", max_iters=300, track_nc=False)
        assert 0 <= result.relative_gap < 1e-8 and float(result.W.norm()) < 1e-3


def test_optimal_objective_none_without_closed_form():
    assert ufm.optimal_objective(10, 10, 20, "focal", 5e-4, 5e-5) is None
    assert ufm.optimal_objective(10, 10, 20, "ls", 5e-4, 5e-5, bias=False) is None
    assert ufm.optimal_objective(10, 10, 20, "ce", 5e-4, 5e-5, bias=True) is None
    assert ufm.optimal_objective(10, 10, 20, "mse", 5e-4, 5e-5, kappa=1.0, beta=15.0) is None


def test_closed_form_is_a_lower_bound():
    K, n, d, lw, lh, lb = 4, 3, 5, 1e-2, 1e-2, 1e-1
    y = ufm.balanced_labels(K, n)
    gen = torch.Generator().manual_seed(0)
    for loss, bias in (("mse", True), ("mse", False), ("ce", False)):
        optimum = ufm.optimal_objective(K, n, d, loss, lw, lh, lb, bias)
        for _ in range(20):
            W = torch.randn(K, d, dtype=torch.float64, generator=gen)
            H = torch.randn(K * n, d, dtype=torch.float64, generator=gen)
            b = torch.randn(K, dtype=torch.float64, generator=gen) if bias else None
            assert float(ufm.objective(W, H, b, y, loss, lw, lh, lb)) >= optimum


def _final_nc1(result):
    return NCStats(result.W.shape[0], result.W.shape[1]).update(result.H, result.y).compute().nc1


# (K, n, d, λ_W, λ_H, loss, bias, λ_b): the acceptance problem, others under the threshold, and
# Zhou et al. (ICML 2022) Thm 3.1's bias decay / no bias / d < K−1
SOLVES = [
    (10, 10, 20, 5e-4, 5e-5, "mse", True, 0.0),
    (10, 10, 20, 5e-4, 5e-5, "ce", False, 0.0),
    (4, 5, 6, 1e-3, 1e-2, "mse", True, 0.0),
    (4, 5, 6, 1e-3, 1e-2, "ce", False, 0.0),
    (6, 2, 5, 1e-2, 2e-3, "ce", False, 0.0),
    (5, 3, 8, 2e-3, 2e-3, "mse", True, 5e-2),
    (5, 3, 8, 2e-3, 2e-3, "mse", False, 0.0),
    (6, 3, 3, 2e-3, 2e-3, "mse", True, 1e-2),
]


@pytest.mark.parametrize("K,n,d,lw,lh,loss,bias,lb", SOLVES)
def test_lbfgs_reaches_the_global_minimum(K, n, d, lw, lh, loss, bias, lb):
    result = ufm.solve(K, n, d, loss, lw, lh, lb, bias, method="lbfgs", max_iters=600, track_nc=False)
    assert result.optimum is not None
    assert -1e-12 <= result.relative_gap < 1e-6
    if d >= K - 1:  # below K−1 dimensions the class means cannot separate all classes' variation
        assert _final_nc1(result) < 1e-8


def test_gradient_descent_converges_linearly_on_ce():
    result = ufm.solve(10, 10, 20, "ce", 5e-4, 5e-5, bias=False, method="gd", max_iters=2000)
    assert result.converged and result.relative_gap < 1e-6
    history = result.history
    assert all(len(history[k]) == result.iterations + 1 for k in ufm.HISTORY_KEYS)
    assert history["nc1"][-1] < 1e-8 and history["nc2"][-1] < 1e-6 and history["nc3"][-1] < 1e-6
    # monotone (Armijo) decrease, and a linear rate: the gap shrinks by ≥ 10× every 100 steps late on
    assert all(b <= a for a, b in zip(history["objective"], history["objective"][1:]))
    gaps = [f - result.optimum for f in history["objective"]]
    assert gaps[300] < 0.1 * gaps[200]


def test_other_losses_solve_and_track_nc():
    result = ufm.solve(4, 3, 6, "focal", 1e-3, 1e-3, method="lbfgs", max_iters=300, gamma=3.0)
    assert result.optimum is None and result.gap is None
    assert result.history["grad_norm"][-1] < 1e-6
    assert result.history["nc1"][-1] < 1e-6


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="hinge"), "loss"), (dict(method="sgd"), "method"), (dict(lambda_w=0.0), "lambda_w"),
    (dict(num_classes=1), "num_classes"), (dict(loss="ce", gamma=2.0), "gamma"), (dict(max_iters=-1), "max_iters"),
])
def test_solve_rejects_bad_arguments(kwargs, match):
    args = dict(num_classes=3, per_class=2, dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ufm.solve(**args)
