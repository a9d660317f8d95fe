"""The loss vocabulary shared by the trainer, the unconstrained feature model and the demo: one
name per loss, its ncfast function and its hyper-parameters with the papers' values.

=================  ======================================  =====================================
name               loss                                    default hyper-parameters
=================  ======================================  =====================================
``ce``             cross-entropy                           none
``focal``          focal loss (Lin et al. 2017)            γ = 3
``ls``             cross-entropy with label smoothing      α = 0.1
``mse``            MSE against one-hot targets             κ = 1, β = 1
``rescaled_mse``   rescaled MSE (Hui & Belkin 2021)        κ = 1, β = 15
=================  ======================================  =====================================

``mse`` is the plain squared error ‖z − e_y‖² (κ = β = 1), the loss of the unconstrained-feature
analyses (Zhou, Li, Ding, You, Qu, Zhu, ICML 2022, "On the Optimization Landscape of Neural
Collapse under MSE Loss"; Wang, Liu, Yaras, Balzano, Qu 2022), for which the global minimum is
known in closed form. ``rescaled_mse`` is ℓ = κ(z_y − β)² + Σ_{j≠y} z_j² with the values
Zhou, You, Li, Liu, Liu, Qu, Zhu (NeurIPS 2022, "Are All Losses Created Equal: A Neural Collapse
Perspective", §4) train with; γ = 3 and α = 0.1 are that paper's too, and
:data:`PAPER_LOSSES` is its set of four losses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor

from . import _checks
from .losses import cross_entropy, focal_loss, rescaled_mse

# hyper-parameter -> (its admissible values, as a test and in words)
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "label_smoothing": (lambda a: 0 <= a < 1, "a value in [0, 1)"),
    "gamma": (lambda g: g >= 0, "a finite value >= 0"),
    "kappa": (lambda k: k > 0, "a finite value > 0"),
    "beta": (lambda b: True, "a finite value"),
}


@dataclass(frozen=True)
class LossChoice:
    """One loss of the vocabulary: ``function(logits, target, reduction=..., **defaults)``."""

    name: str
    label: str  # for tables and legends, with the default hyper-parameters
    function: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)


LOSS_CHOICES: dict[str, LossChoice] = {
    choice.name: choice for choice in (
        LossChoice("ce", "CE", cross_entropy),
        LossChoice("focal", "focal g=3", focal_loss, {"gamma": 3.0}),
        LossChoice("ls", "LS a=0.1", cross_entropy, {"label_smoothing": 0.1}),
        LossChoice("mse", "MSE", rescaled_mse, {"kappa": 1.0, "beta": 1.0}),
        LossChoice("rescaled_mse", "MSE k=1 b=15", rescaled_mse, {"kappa": 1.0, "beta": 15.0}),
    )
}
LOSS_NAMES = tuple(LOSS_CHOICES)
HYPERPARAMETERS = tuple(_RANGES)
# the four losses Zhou et al. (NeurIPS 2022) compare, with their hyper-parameters
PAPER_LOSSES = ("ce", "focal", "ls", "rescaled_mse")


def loss_choice(name: str) -> LossChoice:
    """The :class:`LossChoice` called ``name``; ValueError naming ``loss`` otherwise."""
    if name not in LOSS_CHOICES:
        raise ValueError(f"loss: expected one of {LOSS_NAMES}, got {name!r}")
    return LOSS_CHOICES[name]


def loss_parameters(name: str, **overrides) -> dict[str, float]:
    """The hyper-parameters of loss ``name``: its defaults, replaced by ``overrides`` that are not
    None. A hyper-parameter the loss does not take, or a value out of range, is a ValueError
    naming it."""
    choice = loss_choice(name)
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(choice.defaults))
    if unknown:
        raise ValueError(f"loss={name!r} takes {sorted(choice.defaults) or 'no parameters'}, got {unknown}")
    params = dict(choice.defaults)
    for key, value in given.items():
        ok, expected = _RANGES[key]
        params[key] = _checks.finite_float(key, value, ok, expected)
    return params


def loss_function(name: str, reduction: str = "mean", **overrides) -> Callable[[Tensor, Tensor], Tensor]:
    """``(logits, target) -> loss`` for loss ``name`` with :func:`loss_parameters`'s values."""
    params = loss_parameters(name, **overrides)
    return functools.partial(LOSS_CHOICES[name].function, reduction=_checks.reduction(reduction), **params)
