"""The unconstrained feature model (UFM): a solver and its closed-form certificate.

The last-layer features are free variables H ∈ R^{N×d} (one row per sample, n per class,
N = nK), with classifier W ∈ R^{K×d} and bias b ∈ R^K:

    F(W, H, b) = (1/N) Σ_i ℓ(W h_i + b, y_i) + λ_W/2 ‖W‖² + λ_H/2 ‖H‖² + λ_b/2 ‖b‖²

(Zhu et al., NeurIPS 2021, "A Geometric Analysis of Neural Collapse with Unconstrained
Features", eq. (4); Zhou et al., NeurIPS 2022, "Are All Losses Created Equal", eq. (7); Wang et
al. 2022, "Linear Convergence Analysis of Neural Collapse with Unconstrained Features", eq. (2));
for the squared losses ("mse", "rescaled_mse") the papers' 1/(2N) form
(1/(2N)) Σ_i ‖W h_i + b − e_{y_i}‖² (Zhou et al., ICML 2022, "On the Optimization Landscape of
Neural Collapse under MSE Loss", eq. (3); Wang et al. 2022, eq. (5)), generalised to the
rescaled MSE (κ, β) of Zhou et al. (ICML 2022) eq. (4). The loss names and their default
hyper-parameters are :mod:`ncfast.loss_choices`'. The papers store features as columns; here
they are rows, so the paper's Wᵀ H is our H Wᵀ.

The global minimum is known in closed form for the MSE (Zhou et al., ICML 2022, Thm 3.1; Wang
et al. 2022, Prop. 1) and for CE without bias (Wang et al. 2022, Prop. 3);
:func:`optimal_objective` returns it, and
:func:`solve`'s final objective minus it is a certificate of how far the solver is from the
global minimum. Everything runs in float64 through the ncfast losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .loss_choices import LOSS_CHOICES, loss_parameters
from .losses import rescaled_mse
from .ncstats import NCStats

METHODS = ("gd", "lbfgs")
HISTORY_KEYS = ("objective", "grad_norm", "nc1", "nc2", "nc3")


def balanced_labels(num_classes: int, per_class: int, device=None) -> Tensor:
    """(N,) int64 labels 0, 1, …, K−1 repeated n times (Wang et al. 2022's Y = 1_nᵀ ⊗ I_K)."""
    return torch.arange(num_classes, device=device).repeat(per_class)


def data_term(logits: Tensor, target: Tensor, loss: str, **loss_kwargs) -> Tensor:
    """The UFM's data term from logits (N, K): the mean loss, or Σ/(2N) for the squared losses."""
    params = loss_parameters(loss, **loss_kwargs)
    function = LOSS_CHOICES[loss].function
    if function is rescaled_mse:
        return function(logits, target, reduction="sum", **params) / (2 * logits.shape[0])
    return function(logits, target, **params)


def objective(W: Tensor, H: Tensor, b: Optional[Tensor], target: Tensor, loss: str, lambda_w: float,
              lambda_h: float, lambda_b: float = 0.0, **loss_kwargs) -> Tensor:
    """F(W, H, b) of the module docstring. W (K, d), H (N, d), b (K,) or None, target (N,)."""
    logits = H @ W.T if b is None else torch.addmm(b, H, W.T)
    value = data_term(logits, target, loss, **loss_kwargs)
    value = value + 0.5 * lambda_w * W.square().sum() + 0.5 * lambda_h * H.square().sum()
    if b is not None:
        value = value + 0.5 * lambda_b * b.square().sum()
    return value


def _check_problem(num_classes, per_class, dim, lambda_w, lambda_h, lambda_b):
    for name, value, low in (("num_classes", num_classes, 2), ("per_class", per_class, 1), ("dim", dim, 1)):
        if _checks.integer(name, value) < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    for name, value in (("lambda_w", lambda_w), ("lambda_h", lambda_h)):
        _checks.finite_float(name, value, lambda v: v > 0, "a finite value > 0 (without weight decay the UFM has "
                                                           "no minimum)")
    _checks.finite_float("lambda_b", lambda_b, lambda v: v >= 0, "a finite value >= 0")


def _mse_optimum(K: int, n: int, d: int, lambda_w: float, lambda_h: float, lambda_b: float, bias: bool) -> float:
    """Global minimum of the 1/(2N) MSE UFM, following the proof of Zhou et al. (ICML 2022)
    Thm 3.1.

    For a fixed b, minimising over (W, H) is a rank-≤d nuclear-norm-regularised approximation
    of Y − b1ᵀ (min over WH = X of λ_W/2‖W‖² + λ_H/2‖H‖² is μ‖X‖_*, μ = √(λ_Wλ_H)): each of
    the top-d singular values σ contributes g(σ) = min_t (σ−t)²/(2N) + μt, the others σ²/(2N).
    The optimal bias is b = β1 (Thm 3.1), for which the singular values are √n (K−1 times)
    and √n·u, u = |1 − Kβ|; what is left is a convex piecewise quadratic in u ∈ [0, 1].
    """
    N = n * K
    mu = math.sqrt(lambda_w * lambda_h)

    def fitted(sigma):  # g(σ): soft-thresholding at Nμ
        return sigma * sigma / (2 * N) if sigma <= N * mu else mu * sigma - N * mu * mu / 2

    def unfitted(sigma):
        return sigma * sigma / (2 * N)

    rooted = math.sqrt(n)
    # the K−1 equal singular values √n: the top min(d, K−1) are fitted
    common = min(d, K - 1) * fitted(rooted) + max(K - 1 - d, 0) * unfitted(rooted)
    last = fitted if d >= K else unfitted

    def along_ones(u):  # the bias direction: ‖b‖² = K β² = (1 − u)²/K
        return last(rooted * u) + (0.5 * lambda_b * (1 - u) ** 2 / K if bias else 0.0)

    if not bias:
        return common + along_ones(1.0)
    # convex in u: the minimum is a stationary point of one of the two quadratic pieces
    # (clipped to that piece) or the kink between them
    kink = min(1.0, N * mu / rooted) if last is fitted else 1.0
    small = lambda_b / (1 + lambda_b)  # stationary point of u²/(2K) + λ_b(1−u)²/(2K)
    candidates = [min(small, kink), kink]
    if last is fitted and lambda_b > 0:  # stationary point of μ√n·u + λ_b(1−u)²/(2K)
        candidates.append(max(kink, min(1.0, 1 - K * rooted * mu / lambda_b)))
    return common + min(along_ones(u) for u in candidates)


def optimal_objective(num_classes: int, per_class: int, dim: int, loss: str, lambda_w: float, lambda_h: float,
                      lambda_b: float = 0.0, bias: bool = True, **loss_kwargs) -> Optional[float]:
    """The UFM's global minimum F* in closed form, or None where the papers give none.

    * "mse" (κ = β = 1), any d, with or without bias, any λ_b ≥ 0: Zhou et al. (ICML 2022)
      Thm 3.1 (see :func:`_mse_optimum`). With bias and λ_b = 0 it reduces to Wang et al.
      (2022) Prop. 1:
      F* = (K−1)(s − K s²/2), s = √(nλ_Wλ_H), when λ_Wλ_H < 1/(nK²), else (K−1)/(2K).
    * "ce" without bias, d ≥ K−1: Wang et al. (2022) Prop. 3 (stated for d ≥ K; its minimiser spans K−1
      dimensions, so the value is the same at d = K−1): with γ = 1/s − K + 1,
      F* = log(1 + (K−1)/γ) + (K−1) s log γ when λ_Wλ_H < 1/(nK²), else log K.
    * everything else ("focal", "ls", CE with bias or d < K−1, rescaled MSE): None.
    """
    _check_problem(num_classes, per_class, dim, lambda_w, lambda_h, lambda_b)
    params = loss_parameters(loss, **loss_kwargs)
    K, n = num_classes, per_class
    if LOSS_CHOICES[loss].function is rescaled_mse and params["kappa"] == 1.0 and params["beta"] == 1.0:
        return _mse_optimum(K, n, dim, lambda_w, lambda_h, lambda_b, bias)
    if loss == "ce" and not bias and dim >= K - 1:
        s = math.sqrt(n * lambda_w * lambda_h)
        if s * K >= 1:
            return math.log(K)
        gamma = 1 / s - K + 1
        return math.log1p((K - 1) / gamma) + (K - 1) * s * math.log(gamma)
    return None


@dataclass
class UFMResult:
    """What :func:`solve` returns. W (K, d), H (N, d), b (K,) or None, y (N,), all float64
    (y int64). ``history`` maps each of ``HISTORY_KEYS`` to a per-iteration list, entry 0 being
    the initial point; NC metrics are :class:`ncfast.NCStats`'s for (H, y) and (W, b)."""

    objective: float
    W: Tensor
    H: Tensor
    b: Optional[Tensor]
    y: Tensor
    optimum: Optional[float]
    iterations: int
    converged: bool
    history: dict = field(default_factory=dict)

    @property
    def gap(self) -> Optional[float]:
        """F − F*: the certificate (None without a closed form)."""
        return None if self.optimum is None else self.objective - self.optimum

    @property
    def relative_gap(self) -> Optional[float]:
        return None if self.optimum is None else self.gap / max(abs(self.optimum), 1e-300)


def _record(history, value, params, y, track_nc):
    W, H, b = params[0], params[1], (params[2] if len(params) == 3 else None)
    history["objective"].append(float(value))
    history["grad_norm"].append(math.sqrt(sum(float(p.grad.square().sum()) for p in params)))
    if track_nc:
        metrics = NCStats(W.shape[0], W.shape[1]).update(H.detach(), y).compute(
            W.detach(), None if b is None else b.detach())
        for key in ("nc1", "nc2", "nc3"):
            history[key].append(float(getattr(metrics, key)))


def solve(num_classes: int, per_class: int, dim: int, loss: str = "mse", lambda_w: float = 5e-4,
          lambda_h: float = 5e-5, lambda_b: float = 0.0, bias: bool = True, method: str = "lbfgs",
          seed: int = 0, max_iters: Optional[int] = None, tol: float = 1e-10, init_scale: float = 0.1,
          track_nc: bool = True, progress=None, **loss_kwargs) -> UFMResult:
    """Minimise the UFM objective from a seeded Gaussian start, in float64.

    Args:
        num_classes, per_class, dim: K, n, d (N = nK samples, labels :func:`balanced_labels`).
        loss: a name of :mod:`ncfast.loss_choices`: "ce", "focal" (``gamma``, default 3), "ls"
            (``label_smoothing``, default 0.1), "mse" (κ = β = 1) or "rescaled_mse" (``kappa``,
            ``beta``, default 1 and 15), the squared losses in the papers' 1/(2N) form.
        lambda_w, lambda_h, lambda_b: weight decays (> 0, > 0, ≥ 0).
        bias: optimise a bias b (decayed by λ_b) or fix b = 0.
        method: "gd" — gradient descent with Armijo backtracking line search (Wang et al.
            2022, §3: start each step at twice the last accepted step, halve until F decreases
            by ≥ 1e-4·t‖∇F‖²);
            "lbfgs" — ``torch.optim.LBFGS`` with the strong-Wolfe line search. GD's linear rate
            is fast for CE, but for the MSE at small λ_H the feature components outside W's row
            space shrink only by (1 − tλ_H) per step (the data term does not see them): use
            "lbfgs" there for a tight certificate.
        seed: seeds the initial point, entries N(0, init_scale²).
        max_iters: iteration cap (default 50000 for "gd", 5000 for "lbfgs").
        tol: stop when ‖∇F‖ ≤ tol, or when an iteration no longer lowers F.
        track_nc: record NC1–NC3 of every iterate in ``history`` (one ``nc_metrics`` call each).
        progress: optional callable(iteration, objective, grad_norm) called each iteration.
    Returns:
        :class:`UFMResult`.
    """
    _check_problem(num_classes, per_class, dim, lambda_w, lambda_h, lambda_b)
    params_loss = loss_parameters(loss, **loss_kwargs)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if max_iters is None:
        max_iters = 50000 if method == "gd" else 5000
    if _checks.integer("max_iters", max_iters) < 0:
        raise ValueError(f"max_iters: expected an int >= 0, got {max_iters}")
    _checks.finite_float("tol", tol, lambda v: v >= 0, "a finite value >= 0")
    _checks.finite_float("init_scale", init_scale, lambda v: v > 0, "a finite value > 0")

    generator = torch.Generator().manual_seed(seed)
    y = balanced_labels(num_classes, per_class)
    shapes = [(num_classes, dim), (num_classes * per_class, dim)] + ([(num_classes,)] if bias else [])
    params = [(init_scale * torch.randn(shape, dtype=torch.float64, generator=generator)).requires_grad_(True)
              for shape in shapes]

    def evaluate():
        for p in params:
            p.grad = None
        value = objective(params[0], params[1], params[2] if bias else None, y, loss, lambda_w, lambda_h,
                          lambda_b, **params_loss)
        value.backward()
        return value.detach()

    history = {key: [] for key in HISTORY_KEYS}
    value = evaluate()
    _record(history, value, params, y, track_nc)
    iterations, converged = 0, history["grad_norm"][-1] <= tol
    step = 1.0
    optimizer = (torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=50, history_size=50, tolerance_grad=0.0,
                                   tolerance_change=0.0, line_search_fn="strong_wolfe")
                 if method == "lbfgs" else None)
    while not converged and iterations < max_iters:
        previous = float(value)
        if optimizer is not None:
            optimizer.step(evaluate)
            value = evaluate()
        else:
            grads = [p.grad.clone() for p in params]
            squared = sum(float(g.square().sum()) for g in grads)
            start = [p.detach().clone() for p in params]
            step *= 2.0
            while True:
                with torch.no_grad():
                    for p, p0, g in zip(params, start, grads):
                        p.copy_(p0 - step * g)
                value = evaluate()
                if float(value) <= previous - 1e-4 * step * squared or step < 1e-20:
                    break
                step *= 0.5
        iterations += 1
        _record(history, value, params, y, track_nc)
        if progress is not None:
            progress(iterations, float(value), history["grad_norm"][-1])
        converged = history["grad_norm"][-1] <= tol or float(value) >= previous
    W, H = params[0].detach(), params[1].detach()
    b = params[2].detach() if bias else None
    optimum = optimal_objective(num_classes, per_class, dim, loss, lambda_w, lambda_h, lambda_b, bias,
                                **params_loss)
    return UFMResult(float(value), W, H, b, y, optimum, iterations, converged, history)
