"""The options of one fused-loss call, checked once and carried as one record.

:func:`loss_options` is called by every public loss function (``ncfast.cross_entropy`` and
friends, the fused ``linear_*`` variants); the record it returns travels unchanged to the
``torch.library`` ops (flattened there with ``*options``, rebuilt with ``LossOptions(*args)``),
to the autograd formulas and to the backends, which read it by name.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, get_type_hints

import torch
from torch import Tensor

from . import _checks

LOSSES = ("cross_entropy", "focal", "rescaled_mse")


class LossOptions(NamedTuple):
    """Everything but the tensors: which loss, its hyper-parameters (the neutral value for those
    another loss uses) and torch's ``ignore_index``/``reduction``.

    ``softcap`` 0 means no cap; ``lse_square_scale`` 0 no z-loss."""

    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    gamma: float = 0.0
    kappa: float = 1.0
    beta: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"

    @property
    def kind(self) -> int:
        """The loss as the kernels number it (0 cross-entropy, 1 focal, 2 rescaled MSE)."""
        return LOSSES.index(self.loss)

    def params(self) -> dict:
        """The hyper-parameters by name (the Triton launchers' ``params``)."""
        return {"label_smoothing": self.label_smoothing, "gamma": self.gamma, "kappa": self.kappa, "beta": self.beta,
                "lse_square_scale": self.lse_square_scale, "softcap": self.softcap}


_SCHEMA_TYPES = {str: "str", float: "float", int: "int"}
#: The record's fields as ``torch.library`` schema arguments: the ops take them flattened, in order.
OPTIONS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in get_type_hints(LossOptions).items())


def alpha_vector(alpha, num_classes: int, device: torch.device) -> Optional[Tensor]:
    if isinstance(alpha, bool):
        raise TypeError("alpha: expected None, a float, a sequence of K floats or a (K,) tensor, got bool")
    if isinstance(alpha, (int, float)):
        value = _checks.finite_float("alpha", alpha, lambda a: True, "a finite value")
        return torch.full((num_classes,), value, dtype=torch.float64, device=device)
    if alpha is None or isinstance(alpha, Tensor):
        return alpha
    try:
        return torch.as_tensor(alpha, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"alpha: expected None, a float, a sequence of K floats or a (K,) tensor, got {alpha!r}"
        ) from error


def loss_options(loss: str, num_classes: int, device: torch.device, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing=0.0, gamma=0.0, alpha=None, kappa=1.0, beta=0.0,
                 lse_square_scale=0.0, softcap=None) -> tuple[LossOptions, Optional[Tensor]]:
    """Checks the arguments of ``loss`` (the hyper-parameters of the other losses keep their
    neutral values) and returns the options record and ``alpha`` as a (K,) tensor or None.

    Raises TypeError/ValueError naming the argument."""
    options = checked_options(loss, ignore_index, reduction, label_smoothing, gamma, kappa, beta, lse_square_scale,
                              softcap)
    if loss == "focal":
        alpha = alpha_vector(alpha, num_classes, device)
    return options, alpha


# Records already checked, by their arguments and the arguments' types (``True`` equals 1 and
# ``numpy.float32(0.5)`` equals 0.5, but neither passes the checks). A training loop calls a
# loss with the same arguments every step; the checks cost more than a small call's kernel.
_checked: dict[tuple, LossOptions] = {}
_CHECKED_MAX = 256  # a schedule of hyper-parameters (say label smoothing per step) never grows it past this


def checked_options(loss: str, ignore_index=-100, reduction="mean", label_smoothing=0.0, gamma=0.0, kappa=1.0,
                    beta=0.0, lse_square_scale=0.0, softcap=None) -> LossOptions:
    """The :class:`LossOptions` of ``loss`` from its arguments, checked on their first use
    (the hyper-parameters of the other losses are ignored and keep their neutral values).

    Raises TypeError/ValueError naming the argument."""
    key = (loss, ignore_index, reduction, label_smoothing, gamma, kappa, beta, lse_square_scale, softcap,
           type(ignore_index), type(reduction), type(label_smoothing), type(gamma), type(kappa), type(beta),
           type(lse_square_scale), type(softcap))
    try:
        options = _checked.get(key)
    except TypeError:  # an unhashable argument: never a valid one, and the checks name it
        options = None
    if options is None:
        options = _check_options(loss, ignore_index, reduction, label_smoothing, gamma, kappa, beta,
                                 lse_square_scale, softcap)
        if len(_checked) >= _CHECKED_MAX:
            _checked.clear()
        _checked[key] = options
    return options


def _check_options(loss, ignore_index, reduction, label_smoothing, gamma, kappa, beta, lse_square_scale,
                   softcap) -> LossOptions:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    _checks.reduction(reduction)
    _checks.int64("ignore_index", ignore_index)
    options = LossOptions(loss=loss, ignore_index=ignore_index, reduction=reduction)
    if loss == "cross_entropy":
        # torch accepts label_smoothing in [0, 1]; 1 means the uniform target alone.
        options = options._replace(
            label_smoothing=_checks.finite_float("label_smoothing", label_smoothing, lambda a: 0 <= a <= 1,
                                                 "a value in [0, 1]"),
            lse_square_scale=_checks.finite_float("lse_square_scale", lse_square_scale, lambda v: v >= 0,
                                                  "a finite value >= 0"),
        )
        if softcap is not None:
            # Below ~1e-30 the cap's 1/softcap overflows float32 (NaN gradients): refuse it.
            options = options._replace(softcap=_checks.finite_float(
                "softcap", softcap, lambda v: v >= 1e-30, "None or a finite value >= 1e-30"))
    elif loss == "focal":
        options = options._replace(gamma=_checks.finite_float("gamma", gamma, lambda g: g >= 0, "a finite value >= 0"))
    else:
        options = options._replace(
            kappa=_checks.finite_float("kappa", kappa, lambda k: k > 0, "a finite value > 0"),
            beta=_checks.finite_float("beta", beta, lambda b: True, "a finite value"),
        )
    return options
