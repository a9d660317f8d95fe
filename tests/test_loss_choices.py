"""The loss vocabulary the trainer, the UFM and the demo share: each name gives the ncfast loss
with the papers' hyper-parameters, and `mse` is one thing everywhere."""

import math

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast import training, ufm
from ncfast.loss_choices import LOSS_CHOICES, LOSS_NAMES, PAPER_LOSSES, loss_function, loss_parameters


def _logits():
    return torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])


def test_names_give_the_losses_with_the_papers_values():
    z, y = _logits()
    torch.testing.assert_close(loss_function("ce")(z, y), F.cross_entropy(z, y))
    torch.testing.assert_close(loss_function("ls")(z, y), F.cross_entropy(z, y, label_smoothing=0.1))
    torch.testing.assert_close(loss_function("rescaled_mse")(z, y), ncfast.rescaled_mse(z, y, kappa=1.0, beta=15.0))
    torch.testing.assert_close(loss_function("focal")(z, y), ncfast.focal_loss(z, y, gamma=3.0))
    # mse: the plain squared error against one-hot targets, summed over classes, averaged over samples
    torch.testing.assert_close(loss_function("mse")(z, y), (z - F.one_hot(y, 4)).square().sum(1).mean())
    with pytest.raises(ValueError, match="loss"):
        loss_function("hinge")


def test_overrides_and_reductions():
    z, y = _logits()
    torch.testing.assert_close(loss_function("focal", gamma=0.0)(z, y), F.cross_entropy(z, y))  # γ = 0 is CE
    torch.testing.assert_close(loss_function("ls", label_smoothing=None)(z, y), loss_function("ls")(z, y))
    torch.testing.assert_close(loss_function("mse", reduction="sum")(z, y), (z - F.one_hot(y, 4)).square().sum())
    assert loss_parameters("rescaled_mse", beta=2) == {"kappa": 1.0, "beta": 2.0}
    assert PAPER_LOSSES == ("ce", "focal", "ls", "rescaled_mse") and set(PAPER_LOSSES) <= set(LOSS_NAMES)
    assert len({LOSS_CHOICES[name].label for name in LOSS_NAMES}) == len(LOSS_NAMES)


@pytest.mark.parametrize("name,kwargs,argument", [
    ("ce", {"gamma": 2.0}, "gamma"),
    ("mse", {"label_smoothing": 0.1}, "label_smoothing"),
    ("focal", {"gamma": -1.0}, "gamma"),
    ("focal", {"gamma": math.inf}, "gamma"),
    ("ls", {"label_smoothing": 1.0}, "label_smoothing"),
    ("rescaled_mse", {"kappa": 0.0}, "kappa"),
    ("rescaled_mse", {"beta": math.nan}, "beta"),
])
def test_bad_hyperparameters_name_themselves(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        loss_parameters(name, **kwargs)


def test_a_hyperparameter_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="gamma"):
        loss_parameters("focal", gamma="3")


def test_trainer_and_ufm_share_the_meaning_of_mse():
    z, y = _logits()
    # the UFM's data term is the same loss in the 1/(2N) form
    for name in ("mse", "rescaled_mse"):
        torch.testing.assert_close(ufm.data_term(z, y, name), loss_function(name, reduction="sum")(z, y) / 12)
    assert ufm.optimal_objective(4, 3, 5, "mse", 1e-2, 1e-2) is not None  # κ = β = 1: closed form
    assert ufm.optimal_objective(4, 3, 5, "rescaled_mse", 1e-2, 1e-2) is None
    assert ufm.optimal_objective(4, 3, 5, "rescaled_mse", 1e-2, 1e-2, beta=1.0) == \
        ufm.optimal_objective(4, 3, 5, "mse", 1e-2, 1e-2)
    training.check_config(training.TrainConfig(loss="rescaled_mse", beta=15.0))
    with pytest.raises(ValueError, match="gamma"):
        training.check_config(training.TrainConfig(loss="mse", gamma=3.0))
