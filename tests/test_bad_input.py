"""The bad-input matrix: every public function, module and CLI subcommand fed wrong
ranks, shapes, dtypes, devices, out-of-range targets, empty or one-class problems, non-finite
data and out-of-range hyper-parameters. Each case must raise ValueError/TypeError naming the
argument (CLI: exit code 2 and one line on stderr) — never crash, hang or return a number.

The documented NaN policy is checked separately: the losses propagate NaN/+inf per row as torch
does (−inf is a masked class); NCStats and nc_metrics raise on non-finite features."""

import math

import numpy as np
import pytest
import torch

import ncfast
from ncfast import cli, ufm
from ncfast.reference import linear as linear_ref
from ncfast.reference import losses as ref

META = torch.device("meta")
N, K, D = 4, 5, 3


def _logits(n=N, k=K, dtype=torch.float32):
    return torch.randn(n, k, dtype=dtype)


def _target(n=N, k=K):
    return torch.arange(n) % k


# --------------------------------------------------------------------------------------------
# the losses: one row per (bad argument, expected exception, argument named); run for each of
# the three functions and their modules
# --------------------------------------------------------------------------------------------
COMMON_LOSS_CASES = {
    "logits-not-tensor": (lambda: dict(logits=[[0.0, 1.0]], target=torch.tensor([0])), TypeError, "logits"),
    "logits-scalar": (lambda: dict(logits=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "logits"),
    "logits-int": (lambda: dict(logits=torch.ones(N, K, dtype=torch.int64), target=_target()), TypeError, "logits"),
    "logits-bool": (lambda: dict(logits=torch.ones(N, K, dtype=torch.bool), target=_target()), TypeError, "logits"),
    "logits-complex": (lambda: dict(logits=torch.ones(N, K, dtype=torch.complex64), target=_target()), TypeError,
                       "logits"),
    "logits-K0": (lambda: dict(logits=torch.ones(N, 0), target=torch.zeros(N, dtype=torch.int64)), ValueError,
                  "logits"),
    "target-not-tensor": (lambda: dict(logits=_logits(), target=[0, 1, 2, 3]), TypeError, "target"),
    "target-float": (lambda: dict(logits=_logits(), target=_target().float()), TypeError, "target"),
    "target-bool": (lambda: dict(logits=_logits(), target=_target() > 0), TypeError, "target"),
    "target-rank2": (lambda: dict(logits=_logits(), target=_target()[:, None]), ValueError, "target"),
    "target-short": (lambda: dict(logits=_logits(), target=_target(N - 1)), ValueError, "target"),
    "target-spatial-mismatch": (lambda: dict(logits=torch.randn(2, K, 3), target=torch.zeros(2, 4, dtype=torch.int64)),
                                ValueError, "target"),
    "target-meta": (lambda: dict(logits=_logits(), target=_target().to(META)), ValueError, "target"),
    "logits-meta": (lambda: dict(logits=_logits().to(META), target=_target()), ValueError, "target"),
    "target-eq-K": (lambda: dict(logits=_logits(), target=torch.tensor([0, 1, K, 2])), ValueError, "target"),
    "target-huge": (lambda: dict(logits=_logits(), target=torch.tensor([0, 1, 2**40, 2])), ValueError, "target"),
    "target-negative": (lambda: dict(logits=_logits(), target=torch.tensor([0, -1, 2, 3])), ValueError, "target"),
    "target-int32-out-of-range": (lambda: dict(logits=_logits(), target=torch.tensor([0, 7, 1, 2], dtype=torch.int32)),
                                  ValueError, "target"),
    "target-vs-ignore-index": (lambda: dict(logits=_logits(), target=torch.tensor([0, -100, 2, 3]), ignore_index=-1),
                               ValueError, "target"),
    "weight-not-tensor": (lambda: dict(logits=_logits(), target=_target(), weight=[1.0] * K), TypeError, "weight"),
    "weight-int": (lambda: dict(logits=_logits(), target=_target(), weight=torch.ones(K, dtype=torch.int64)),
                   TypeError, "weight"),
    "weight-short": (lambda: dict(logits=_logits(), target=_target(), weight=torch.ones(K - 1)), ValueError, "weight"),
    "weight-rank2": (lambda: dict(logits=_logits(), target=_target(), weight=torch.ones(1, K)), ValueError, "weight"),
    "weight-meta": (lambda: dict(logits=_logits(), target=_target(), weight=torch.ones(K, device=META)), ValueError,
                    "weight"),
    "reduction": (lambda: dict(logits=_logits(), target=_target(), reduction="avg"), ValueError, "reduction"),
    "ignore-index-float": (lambda: dict(logits=_logits(), target=_target(), ignore_index=-1.0), TypeError,
                           "ignore_index"),
    "ignore-index-bool": (lambda: dict(logits=_logits(), target=_target(), ignore_index=True), TypeError,
                          "ignore_index"),
    # Trailing dims that cannot be merged without a copy: the gradient could not land in place.
    "inplace-spatial": (lambda: dict(logits=torch.randn(2, K, 3, 4).transpose(2, 3),
                                     target=torch.zeros(2, 4, 3, dtype=torch.int64), inplace_backward=True),
                        ValueError, "inplace_backward"),
}

HYPER_CASES = {
    "cross_entropy": {
        "label_smoothing-negative": (dict(label_smoothing=-0.1), ValueError),
        "label_smoothing-above-one": (dict(label_smoothing=1.5), ValueError),
        "label_smoothing-nan": (dict(label_smoothing=math.nan), ValueError),
        "label_smoothing-str": (dict(label_smoothing="0.1"), TypeError),
        "label_smoothing-tensor": (dict(label_smoothing=torch.tensor(0.1)), TypeError),
        "lse_square_scale-negative": (dict(lse_square_scale=-1e-4), ValueError),
        "lse_square_scale-inf": (dict(lse_square_scale=math.inf), ValueError),
        "softcap-zero": (dict(softcap=0.0), ValueError),
        "softcap-negative": (dict(softcap=-30.0), ValueError),
        "softcap-nan": (dict(softcap=math.nan), ValueError),
        "softcap-inf": (dict(softcap=math.inf), ValueError),
    },
    "focal_loss": {
        "gamma-negative": (dict(gamma=-0.5), ValueError),
        "gamma-nan": (dict(gamma=math.nan), ValueError),
        "gamma-inf": (dict(gamma=math.inf), ValueError),
        "gamma-none": (dict(gamma=None), TypeError),
        "alpha-nan": (dict(alpha=math.nan), ValueError),
        "alpha-short": (dict(alpha=[0.25] * (K - 1)), ValueError),
        "alpha-int-tensor": (dict(alpha=torch.ones(K, dtype=torch.int64)), TypeError),
        "alpha-meta": (dict(alpha=torch.ones(K, device=META)), ValueError),
    },
    "rescaled_mse": {
        "kappa-zero": (dict(kappa=0.0), ValueError),
        "kappa-negative": (dict(kappa=-1.0), ValueError),
        "kappa-nan": (dict(kappa=math.nan), ValueError),
        "kappa-inf": (dict(kappa=math.inf), ValueError),
        "beta-nan": (dict(beta=math.nan), ValueError),
        "beta-inf": (dict(beta=-math.inf), ValueError),
        "beta-str": (dict(beta="1"), TypeError),
    },
}

LOSS_FUNCTIONS = {"cross_entropy": ncfast.cross_entropy, "focal_loss": ncfast.focal_loss,
                  "rescaled_mse": ncfast.rescaled_mse}
MODULES = {"cross_entropy": ncfast.CrossEntropyLoss, "focal_loss": ncfast.FocalLoss,
           "rescaled_mse": ncfast.RescaledMSELoss}


def _call_loss(name, kwargs):
    return LOSS_FUNCTIONS[name](**kwargs)


def _call_module(name, kwargs):
    logits, target = kwargs.pop("logits"), kwargs.pop("target")
    return MODULES[name](**kwargs)(logits, target)


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("case", sorted(COMMON_LOSS_CASES))
@pytest.mark.parametrize("name", sorted(LOSS_FUNCTIONS))
def test_loss_bad_input(name, case, backend):
    make, error, argument = COMMON_LOSS_CASES[case]
    with ncfast.use_backend(backend), pytest.raises(error, match=argument):
        _call_loss(name, make())


@pytest.mark.parametrize("case", ["target-float", "target-eq-K", "target-negative", "weight-short", "reduction",
                                  "logits-int", "target-meta"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_loss_module_bad_input(name, case):
    make, error, argument = COMMON_LOSS_CASES[case]
    with pytest.raises(error, match=argument):
        _call_module(name, make())


HYPER_MATRIX = [(name, case) for name, cases in HYPER_CASES.items() for case in cases]


@pytest.mark.parametrize("name,case", HYPER_MATRIX)
def test_loss_bad_hyper_parameter(name, case):
    kwargs, error = HYPER_CASES[name][case]
    argument = case.split("-")[0]
    with pytest.raises(error, match=argument):
        _call_loss(name, dict(logits=_logits(), target=_target(), **kwargs))
    # the modules take these too (FocalLoss converts a sequence or tensor alpha to float64 itself)
    if (name != "cross_entropy" or argument == "label_smoothing") and case != "alpha-int-tensor":
        with pytest.raises(error, match=argument):
            _call_module(name, dict(logits=_logits(), target=_target(), **kwargs))


# Checked options are remembered by value and type (the checks run once per distinct set of
# arguments): an argument equal to one that passed (True == 1, numpy.float32(0.5) == 0.5) is
# still refused, and an unhashable one is named.
REMEMBERED_CASES = {
    "ignore_index-bool": ("cross_entropy", dict(ignore_index=1), dict(ignore_index=True), TypeError),
    "label_smoothing-bool": ("cross_entropy", dict(label_smoothing=1), dict(label_smoothing=True), TypeError),
    "label_smoothing-float32": ("cross_entropy", dict(label_smoothing=0.5), dict(label_smoothing=np.float32(0.5)),
                                TypeError),
    "gamma-float32": ("focal_loss", dict(gamma=1.0), dict(gamma=np.float32(1.0)), TypeError),
    "kappa-bool": ("rescaled_mse", dict(kappa=1), dict(kappa=True), TypeError),
    "reduction-list": ("cross_entropy", dict(reduction="sum"), dict(reduction=["sum"]), ValueError),
}


@pytest.mark.parametrize("case", sorted(REMEMBERED_CASES))
def test_remembered_options_still_refuse_their_look_alikes(case):
    name, good, bad, error = REMEMBERED_CASES[case]
    _call_loss(name, dict(logits=_logits(), target=_target(), **good))
    with pytest.raises(error, match=case.split("-")[0]):
        _call_loss(name, dict(logits=_logits(), target=_target(), **bad))


def test_remembered_options_stay_bounded():
    from ncfast import loss_options

    logits, target = _logits(dtype=torch.float64), _target()
    for step in range(loss_options._CHECKED_MAX + 10):  # a schedule: a new value every step
        smoothing = step / (loss_options._CHECKED_MAX + 10)
        expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)
        torch.testing.assert_close(ncfast.cross_entropy(logits, target, label_smoothing=smoothing), expected)
    assert len(loss_options._checked) <= loss_options._CHECKED_MAX


# --------------------------------------------------------------------------------------------
# the losses' documented policies: empty batches, NaN/±inf, huge values
# --------------------------------------------------------------------------------------------
LOSS_REFS = {"cross_entropy": ("cross_entropy", {}), "focal_loss": ("focal", {"gamma": 2.0}),
             "rescaled_mse": ("rescaled_mse", {"kappa": 1.0, "beta": 1.0})}


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("name", sorted(LOSS_FUNCTIONS))
def test_loss_empty_batch(name, backend):
    """N = 0: "sum" is 0, "mean" is NaN (0/0, as torch), "none" is empty; the gradient is empty."""
    logits = torch.zeros(0, K, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64)
    with ncfast.use_backend(backend):
        total = LOSS_FUNCTIONS[name](logits, target, reduction="sum")
        mean = LOSS_FUNCTIONS[name](logits, target)
        rows = LOSS_FUNCTIONS[name](logits, target, reduction="none")
    assert total.item() == 0.0 and math.isnan(mean.item()) and rows.shape == (0,)
    total.backward()
    assert logits.grad.shape == (0, K)
    if name == "cross_entropy":
        assert math.isnan(torch.nn.functional.cross_entropy(logits.detach(), target).item())


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", sorted(LOSS_FUNCTIONS))
def test_loss_nonfinite_rows_propagate(name, bad, backend):
    """A NaN or +inf logit makes that row's loss and gradient NaN (as torch) and leaves the
    other rows exact; for the MSE +inf gives an infinite loss (z² of an infinite z)."""
    logits = torch.randn(N, K, dtype=torch.float64)
    logits[1, 2] = bad
    target = _target()
    x = logits.clone().requires_grad_(True)
    with ncfast.use_backend(backend):
        rows = LOSS_FUNCTIONS[name](x, target, reduction="none")
    rows.sum().backward()
    loss, params = LOSS_REFS[name]
    expected = getattr(ref, f"{loss}_rows")(logits, target, **params)
    good = torch.tensor([0, 2, 3])
    torch.testing.assert_close(rows[good], expected[good], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(x.grad[good]).all()
    if name == "rescaled_mse":  # no normaliser couples the classes: the bad entry's gradient is NaN/inf
        assert not math.isfinite(rows[1].item()) and not math.isfinite(x.grad[1, 2].item())
    else:
        assert math.isnan(rows[1].item())
        assert torch.isnan(x.grad[1]).all()
    if name == "cross_entropy":
        torch_rows = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        assert math.isnan(torch_rows[1].item())


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss"])
def test_loss_minus_inf_is_a_masked_class(name, backend):
    logits = torch.randn(N, K, dtype=torch.float64)
    logits[:, 4] = -math.inf
    target = torch.tensor([0, 1, 2, 3])
    x = logits.clone().requires_grad_(True)
    with ncfast.use_backend(backend):
        rows = LOSS_FUNCTIONS[name](x, target, reduction="none")
    rows.sum().backward()
    loss, params = LOSS_REFS[name]
    expected = getattr(ref, f"{loss}_rows")(logits[:, :4], target, **params)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    assert (x.grad[:, 4] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss"])
def test_loss_huge_logits_stay_finite(name, backend):
    """Logits near float32's limit (the loss 2e38 still fits): the max-subtracted lse keeps it
    finite and exact."""
    logits = torch.tensor([[1e38, -1e38, 0.0], [1e30, 1e30, -1e30]], dtype=torch.float32)
    target = torch.tensor([1, 0])
    with ncfast.use_backend(backend):
        rows = LOSS_FUNCTIONS[name](logits, target, reduction="none")
    loss, params = LOSS_REFS[name]
    expected = getattr(ref, f"{loss}_rows")(logits.double(), target, **params)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# linear + loss
# --------------------------------------------------------------------------------------------
def _linear_args(**changes):
    args = dict(features=torch.randn(N, D), weight=torch.randn(K, D), bias=torch.randn(K), target=_target())
    args.update(changes)
    return args


LINEAR_CASES = {
    "features-not-tensor": (dict(features=[[0.0] * D] * N), TypeError, "features"),
    "features-rank1": (dict(features=torch.randn(D)), ValueError, "features"),
    "features-rank3": (dict(features=torch.randn(1, N, D)), ValueError, "features"),
    "features-int": (dict(features=torch.ones(N, D, dtype=torch.int32)), TypeError, "features"),
    "weight-rank1": (dict(weight=torch.randn(D)), ValueError, "weight"),
    "weight-wrong-d": (dict(weight=torch.randn(K, D + 1)), ValueError, "weight"),
    "weight-K0": (dict(weight=torch.randn(0, D), bias=None, target=torch.zeros(N, dtype=torch.int64)), ValueError,
                  "weight"),
    "weight-dtype": (dict(weight=torch.randn(K, D, dtype=torch.float64)), TypeError, "weight"),
    "weight-meta": (dict(weight=torch.randn(K, D, device=META)), ValueError, "weight"),
    "bias-short": (dict(bias=torch.randn(K - 1)), ValueError, "bias"),
    "bias-list": (dict(bias=[0.0] * K), TypeError, "bias"),
    "bias-dtype": (dict(bias=torch.randn(K, dtype=torch.float16)), TypeError, "bias"),
    "target-float": (dict(target=_target().float()), TypeError, "target"),
    "target-short": (dict(target=_target(N - 1)), ValueError, "target"),
    "target-meta": (dict(target=_target().to(META)), ValueError, "target"),
    "target-eq-K": (dict(target=torch.tensor([0, 1, K, 2])), ValueError, "target"),
    "target-negative": (dict(target=torch.tensor([0, -3, 1, 2])), ValueError, "target"),
    "class_weight-short": (dict(class_weight=torch.ones(K + 1)), ValueError, "class_weight"),
    "class_weight-int": (dict(class_weight=torch.ones(K, dtype=torch.int64)), TypeError, "class_weight"),
    "reduction": (dict(reduction="batchmean"), ValueError, "reduction"),
    "ignore_index-float": (dict(ignore_index=0.5), TypeError, "ignore_index"),
    "chunk_memory-zero": (dict(chunk_memory=0), ValueError, "chunk_memory"),
    "chunk_memory-negative": (dict(chunk_memory=-1024), ValueError, "chunk_memory"),
    "chunk_memory-float": (dict(chunk_memory=1e6), TypeError, "chunk_memory"),
}
LINEAR_HYPER = {
    "linear_cross_entropy": {"label_smoothing": [(-0.2, ValueError), (1.5, ValueError), (math.inf, ValueError)],
                             "lse_square_scale": [(-1.0, ValueError), (math.nan, ValueError)],
                             "softcap": [(0.0, ValueError), (-1.0, ValueError)]},
    "linear_focal_loss": {"gamma": [(-1.0, ValueError), (math.nan, ValueError), ("2", TypeError)],
                          "alpha": [(math.inf, ValueError), (torch.ones(K + 1), ValueError)]},
    "linear_rescaled_mse": {"kappa": [(0.0, ValueError), (-2.0, ValueError), (math.nan, ValueError)],
                            "beta": [(math.inf, ValueError)]},
}
LINEAR_FUNCTIONS = {name: getattr(ncfast, name) for name in LINEAR_HYPER}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("name", sorted(LINEAR_FUNCTIONS))
def test_linear_bad_input(name, case):
    changes, error, argument = LINEAR_CASES[case]
    with pytest.raises(error, match=argument):
        LINEAR_FUNCTIONS[name](**_linear_args(**changes))


LINEAR_HYPER_MATRIX = [(name, argument, i) for name, table in LINEAR_HYPER.items()
                       for argument, values in table.items() for i in range(len(values))]


@pytest.mark.parametrize("name,argument,i", LINEAR_HYPER_MATRIX)
def test_linear_bad_hyper_parameter(name, argument, i):
    value, error = LINEAR_HYPER[name][argument][i]
    with pytest.raises(error, match=argument):
        LINEAR_FUNCTIONS[name](**_linear_args(), **{argument: value})


@pytest.mark.parametrize("name", sorted(LINEAR_FUNCTIONS))
def test_linear_nan_feature_row_propagates(name):
    """Same policy as the losses: a NaN feature row gives a NaN loss row, the others exact."""
    args = _linear_args(features=torch.randn(N, D, dtype=torch.float64), weight=torch.randn(K, D, dtype=torch.float64),
                        bias=torch.randn(K, dtype=torch.float64))
    args["features"][2, 0] = math.nan
    rows = LINEAR_FUNCTIONS[name](**args, reduction="none")
    logits = args["features"] @ args["weight"].T + args["bias"]
    loss = {"linear_cross_entropy": "cross_entropy", "linear_focal_loss": "focal_loss",
            "linear_rescaled_mse": "rescaled_mse"}[name]
    expected = LOSS_FUNCTIONS[loss](logits, args["target"], reduction="none")
    good = torch.tensor([0, 1, 3])
    torch.testing.assert_close(rows[good], expected[good], rtol=1e-12, atol=1e-12)
    assert math.isnan(rows[2].item())


@pytest.mark.parametrize("name", sorted(LINEAR_FUNCTIONS))
def test_linear_empty_batch(name):
    args = _linear_args(features=torch.randn(0, D), target=torch.zeros(0, dtype=torch.int64))
    assert LINEAR_FUNCTIONS[name](**args, reduction="sum").item() == 0.0
    assert LINEAR_FUNCTIONS[name](**args, reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(LINEAR_FUNCTIONS))
def test_linear_one_class_with_bias(name, dtype):
    """K = 1 with a bias used to return dW and db as views of one buffer, which the custom op
    rejects as aliased outputs (found by the property tests)."""
    args = _linear_args(features=torch.randn(N, D, dtype=dtype, requires_grad=True),
                        weight=torch.randn(1, D, dtype=dtype, requires_grad=True),
                        bias=torch.randn(1, dtype=dtype, requires_grad=True), target=torch.zeros(N, dtype=torch.int64))
    value = LINEAR_FUNCTIONS[name](**args)
    grads = torch.autograd.grad(value, [args["features"], args["weight"], args["bias"]])
    refs = [args[key].detach().double().requires_grad_(True) for key in ("features", "weight", "bias")]
    loss = {"linear_cross_entropy": "cross_entropy", "linear_focal_loss": "focal",
            "linear_rescaled_mse": "rescaled_mse"}[name]
    kwargs = {"linear_focal_loss": dict(gamma=2.0), "linear_rescaled_mse": dict(kappa=1.0, beta=1.0)}.get(name, {})
    expected = linear_ref.linear_loss(*refs, args["target"], loss, **kwargs)
    for got, want in zip(grads, torch.autograd.grad(expected, refs)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# NCStats, nc_metrics
# --------------------------------------------------------------------------------------------
def _stats():
    return ncfast.NCStats(3, D)


def _full_stats():
    return ncfast.NCStats(3, D).update(torch.randn(6, D, dtype=torch.float64), torch.arange(6) % 3)


def _nan_features():
    features = torch.randn(6, D)
    features[4, 1] = math.nan
    return features


def _inf_features():
    features = torch.randn(6, D)
    features[0, 0] = -math.inf
    return features


NCSTATS_CASES = {
    "init-num_classes-1": (lambda: ncfast.NCStats(1, D), ValueError, "num_classes"),
    "init-num_classes-0": (lambda: ncfast.NCStats(0, D), ValueError, "num_classes"),
    "init-num_classes-float": (lambda: ncfast.NCStats(3.0, D), TypeError, "num_classes"),
    "init-num_classes-bool": (lambda: ncfast.NCStats(True, D), TypeError, "num_classes"),
    "init-dim-0": (lambda: ncfast.NCStats(3, 0), ValueError, "dim"),
    "init-dim-none": (lambda: ncfast.NCStats(3, None), TypeError, "dim"),
    "update-features-list": (lambda: _stats().update([[0.0] * D], torch.tensor([0])), TypeError, "features"),
    "update-target-list": (lambda: _stats().update(torch.randn(1, D), [0]), TypeError, "target"),
    "update-features-rank1": (lambda: _stats().update(torch.randn(D), torch.tensor(0)), ValueError, "features"),
    "update-features-wrong-d": (lambda: _stats().update(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.int64)),
                                ValueError, "features"),
    "update-features-int": (lambda: _stats().update(torch.ones(4, D, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)),
                            TypeError, "features"),
    "update-target-float": (lambda: _stats().update(torch.randn(4, D), torch.zeros(4)), TypeError, "target"),
    "update-target-short": (lambda: _stats().update(torch.randn(4, D), torch.zeros(3, dtype=torch.int64)), ValueError,
                            "target"),
    "update-target-rank2": (lambda: _stats().update(torch.randn(4, D), torch.zeros(4, 1, dtype=torch.int64)),
                            ValueError, "target"),
    "update-features-meta": (lambda: _stats().update(torch.randn(4, D, device=META), torch.zeros(4, dtype=torch.int64)),
                             ValueError, "features"),
    "update-target-meta": (lambda: _stats().update(torch.randn(4, D), torch.zeros(4, dtype=torch.int64, device=META)),
                           ValueError, "target"),
    "update-target-eq-K": (lambda: _stats().update(torch.randn(4, D), torch.tensor([0, 1, 3, 2])), ValueError, "target"),
    "update-target-negative": (lambda: _stats().update(torch.randn(4, D), torch.tensor([0, 1, -1, 2])), ValueError,
                               "target"),
    "update-features-nan": (lambda: _stats().update(_nan_features(), torch.arange(6) % 3), ValueError, "features"),
    "update-features-inf": (lambda: _stats().update(_inf_features(), torch.arange(6) % 3), ValueError, "features"),
    "merge-not-stats": (lambda: _stats().merge({"counts": torch.zeros(3)}), TypeError, "other"),
    "merge-other-K": (lambda: _stats().merge(ncfast.NCStats(4, D)), ValueError, "other"),
    "merge-other-d": (lambda: _stats().merge(ncfast.NCStats(3, D + 1)), ValueError, "other"),
    "compute-empty": (lambda: _stats().compute(), ValueError, "compute"),
    "compute-missing-class": (lambda: _stats().update(torch.randn(4, D), torch.tensor([0, 1, 0, 1])).compute(),
                              ValueError, "compute"),
    "compute-weight-shape": (lambda: _full_stats().compute(torch.randn(3, D + 1)), ValueError, "weight"),
    "compute-weight-int": (lambda: _full_stats().compute(torch.ones(3, D, dtype=torch.int64)), TypeError, "weight"),
    "compute-weight-nan": (lambda: _full_stats().compute(torch.full((3, D), math.nan)), ValueError, "weight"),
    "compute-bias-without-weight": (lambda: _full_stats().compute(bias=torch.zeros(3)), ValueError, "bias"),
    "compute-bias-shape": (lambda: _full_stats().compute(torch.randn(3, D), torch.zeros(4)), ValueError, "bias"),
    "compute-bias-inf": (lambda: _full_stats().compute(torch.randn(3, D), torch.tensor([0.0, math.inf, 0.0])),
                         ValueError, "bias"),
    "compute-global_mean": (lambda: _full_stats().compute(global_mean="median"), ValueError, "global_mean"),
    "compute-second_pass": (lambda: _full_stats().compute(second_pass=object()), TypeError, "second_pass"),
    "nc_metrics-features-rank1": (lambda: ncfast.nc_metrics(torch.randn(D), torch.tensor(0)), ValueError, "features"),
    "nc_metrics-features-list": (lambda: ncfast.nc_metrics([[0.0] * D], torch.tensor([0])), ValueError, "features"),
    "nc_metrics-features-int": (lambda: ncfast.nc_metrics(torch.ones(6, D, dtype=torch.int64), torch.arange(6) % 3),
                                TypeError, "features"),
    "nc_metrics-target-float": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.zeros(6)), TypeError, "target"),
    "nc_metrics-target-empty": (lambda: ncfast.nc_metrics(torch.randn(0, D), torch.zeros(0, dtype=torch.int64)),
                                ValueError, "target"),
    "nc_metrics-one-class": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.zeros(6, dtype=torch.int64)),
                             ValueError, "num_classes"),
    "nc_metrics-num_classes-1": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.zeros(6, dtype=torch.int64),
                                                           num_classes=1), ValueError, "num_classes"),
    "nc_metrics-target-negative": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.tensor([0, 1, 2, -1, 1, 2])),
                                   ValueError, "target"),
    "nc_metrics-target-out-of-range": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.arange(6) % 3,
                                                                 num_classes=2), ValueError, "target"),
    "nc_metrics-features-nan": (lambda: ncfast.nc_metrics(_nan_features(), torch.arange(6) % 3), ValueError,
                                "features"),
    "nc_metrics-features-inf": (lambda: ncfast.nc_metrics(_inf_features(), torch.arange(6) % 3), ValueError,
                                "features"),
    "nc_metrics-weight-shape": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.arange(6) % 3, torch.randn(2, D)),
                                ValueError, "weight"),
    "nc_metrics-bins": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.arange(6) % 3, torch.randn(3, D), bins=0),
                        ValueError, "bins"),
    "nc_metrics-flag": (lambda: ncfast.nc_metrics(torch.randn(6, D), torch.arange(6) % 3, global_mean="mode"),
                        ValueError, "global_mean"),
}


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("case", sorted(NCSTATS_CASES))
def test_ncstats_bad_input(case, backend):
    make, error, argument = NCSTATS_CASES[case]
    with ncfast.use_backend(backend), pytest.raises(error, match=argument):
        make()


@pytest.mark.parametrize("backend", ncfast.available_backends())
def test_ncstats_bad_batch_leaves_state_unchanged(backend):
    with ncfast.use_backend(backend):
        stats = _full_stats()
        before = [t.clone() for t in (stats.counts, stats.means, stats.within_scatter, stats.class_sq)]
        for features, target in ((_nan_features(), torch.arange(6) % 3), (torch.randn(6, D), torch.arange(6) - 1)):
            with pytest.raises(ValueError):
                stats.update(features, target)
        stats.update(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))  # an empty batch is a no-op
    after = (stats.counts, stats.means, stats.within_scatter, stats.class_sq)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# geometry, ufm.solve
# --------------------------------------------------------------------------------------------
OTHER_CASES = {
    "simplex_etf-num_classes-1": (lambda: ncfast.simplex_etf(1, 4), ValueError, "num_classes"),
    "simplex_etf-num_classes-0": (lambda: ncfast.simplex_etf(0, 4), ValueError, "num_classes"),
    "simplex_etf-num_classes-float": (lambda: ncfast.simplex_etf(3.0, 4), (TypeError, ValueError), "num_classes"),
    "simplex_etf-dim-small": (lambda: ncfast.simplex_etf(5, 3), ValueError, "dim"),
    "simplex_etf-dim-none": (lambda: ncfast.simplex_etf(5, None), (TypeError, ValueError), "dim"),
    "simplex_etf-dtype-int": (lambda: ncfast.simplex_etf(3, 4, dtype=torch.int64), TypeError, "dtype"),
    "ETFClassifier-num_classes-1": (lambda: ncfast.ETFClassifier(4, 1), ValueError, "num_classes"),
    "ETFClassifier-dim-small": (lambda: ncfast.ETFClassifier(2, 5), ValueError, "dim"),
    "ETFClassifier-features-wrong-d": (lambda: ncfast.ETFClassifier(4, 3)(torch.randn(2, 5)), ValueError, "features"),
    "ETFClassifier-features-int": (lambda: ncfast.ETFClassifier(4, 3)(torch.ones(2, 4, dtype=torch.int64)), TypeError,
                                   "features"),
    "ETFClassifier-features-scalar": (lambda: ncfast.ETFClassifier(4, 3)(torch.tensor(1.0)), ValueError, "features"),
    "ufm-num_classes-1": (lambda: ufm.solve(1, 2, 3), ValueError, "num_classes"),
    "ufm-per_class-0": (lambda: ufm.solve(3, 0, 3), ValueError, "per_class"),
    "ufm-dim-0": (lambda: ufm.solve(3, 2, 0), ValueError, "dim"),
    "ufm-lambda_w-0": (lambda: ufm.solve(3, 2, 3, lambda_w=0.0), ValueError, "lambda_w"),
    "ufm-lambda_h-nan": (lambda: ufm.solve(3, 2, 3, lambda_h=math.nan), ValueError, "lambda_h"),
    "ufm-lambda_b-negative": (lambda: ufm.solve(3, 2, 3, lambda_b=-1.0), ValueError, "lambda_b"),
    "ufm-loss": (lambda: ufm.solve(3, 2, 3, loss="hinge"), ValueError, "loss"),
    "ufm-loss-kwarg": (lambda: ufm.solve(3, 2, 3, loss="ce", gamma=2.0), ValueError, "loss"),
    "ufm-gamma-negative": (lambda: ufm.solve(3, 2, 3, loss="focal", gamma=-1.0), ValueError, "gamma"),
    "ufm-label_smoothing-one": (lambda: ufm.solve(3, 2, 3, loss="ls", label_smoothing=1.5), ValueError,
                                "label_smoothing"),
    "ufm-kappa-zero": (lambda: ufm.solve(3, 2, 3, loss="mse", kappa=0.0), ValueError, "kappa"),
    "ufm-beta-nan": (lambda: ufm.solve(3, 2, 3, loss="mse", beta=math.nan), ValueError, "beta"),
    "ufm-method": (lambda: ufm.solve(3, 2, 3, method="adam"), ValueError, "method"),
    "ufm-max_iters": (lambda: ufm.solve(3, 2, 3, max_iters=-1), ValueError, "max_iters"),
    "ufm-tol-negative": (lambda: ufm.solve(3, 2, 3, tol=-1.0), ValueError, "tol"),
    "ufm-tol-nan": (lambda: ufm.solve(3, 2, 3, tol=math.nan), ValueError, "tol"),
    "ufm-init_scale": (lambda: ufm.solve(3, 2, 3, init_scale=math.inf), ValueError, "init_scale"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_geometry_and_ufm_bad_input(case):
    make, error, argument = OTHER_CASES[case]
    with pytest.raises(error, match=argument):
        make()


# --------------------------------------------------------------------------------------------
# the command line: exit code 2, one line on stderr naming the argument, nothing on stdout
# --------------------------------------------------------------------------------------------
def _npy(folder, name, array):
    path = folder / name
    np.save(path, array)
    return str(path)


def _metrics_files(folder, features=None, labels=None):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, D)) if features is None else features
    labels = np.arange(6) % 3 if labels is None else labels
    return [_npy(folder, "features.npy", features), _npy(folder, "labels.npy", labels)]


def _nan_array():
    array = np.random.default_rng(0).standard_normal((6, D))
    array[3, 1] = np.nan
    return array


CLI_CASES = {
    "ufm-classes-1": (lambda p: ["ufm", "--classes", "1"], "classes"),
    "ufm-per-class-0": (lambda p: ["ufm", "--per-class", "0"], "per_class"),
    "ufm-lambda-w-0": (lambda p: ["ufm", "--lambda-w", "0"], "lambda_w"),
    "ufm-lambda-h-nan": (lambda p: ["ufm", "--lambda-h", "nan"], "lambda_h"),
    "ufm-gamma-wrong-loss": (lambda p: ["ufm", "--loss", "mse", "--gamma", "2"], "gamma"),
    "ufm-gamma-negative": (lambda p: ["ufm", "--loss", "focal", "--gamma", "-1"], "gamma"),
    "ufm-kappa-zero": (lambda p: ["ufm", "--loss", "mse", "--kappa", "0"], "kappa"),
    "ufm-max-iters": (lambda p: ["ufm", "--max-iters", "-3"], "max_iters"),
    "ufm-tol": (lambda p: ["ufm", "--tol", "-1"], "tol"),
    "metrics-missing-file": (lambda p: ["metrics", str(p / "nothing.npy"), str(p / "labels.npy")], "features"),
    "metrics-not-npy": (lambda p: ["metrics", str(_write_text(p)), _metrics_files(p)[1]], "features"),
    "metrics-features-1d": (lambda p: ["metrics", *_metrics_files(p, features=np.zeros(6))], "features"),
    "metrics-features-int": (lambda p: ["metrics", *_metrics_files(p, features=np.ones((6, D), np.int64))],
                             "features"),
    "metrics-features-nan": (lambda p: ["metrics", *_metrics_files(p, features=_nan_array())], "features"),
    "metrics-features-empty": (lambda p: ["metrics", *_metrics_files(p, features=np.zeros((0, D)),
                                                                     labels=np.zeros(0, np.int64))], "features"),
    "metrics-labels-float": (lambda p: ["metrics", *_metrics_files(p, labels=np.zeros(6))], "labels"),
    "metrics-labels-short": (lambda p: ["metrics", *_metrics_files(p, labels=np.arange(5) % 3)], "labels"),
    "metrics-labels-negative": (lambda p: ["metrics", *_metrics_files(p, labels=np.array([0, 1, 2, -1, 1, 2]))],
                                "labels"),
    "metrics-one-class": (lambda p: ["metrics", *_metrics_files(p, labels=np.zeros(6, np.int64))], "classes"),
    "metrics-num-classes-small": (lambda p: ["metrics", *_metrics_files(p), "--num-classes", "2"], "labels"),
    "metrics-batch-size-0": (lambda p: ["metrics", *_metrics_files(p), "--batch-size", "0"], "batch-size"),
    "metrics-weight-shape": (lambda p: ["metrics", *_metrics_files(p), "--weight",
                                        _npy(p, "w.npy", np.zeros((3, D + 1)))], "weight"),
    "metrics-bias-without-weight": (lambda p: ["metrics", *_metrics_files(p), "--bias", _npy(p, "b.npy", np.zeros(3))],
                                    "bias"),
    "train-epochs-0": (lambda p: ["train", "--epochs", "0", "--out", str(p)], "epochs"),
    "train-batch-size-0": (lambda p: ["train", "--batch-size", "0", "--out", str(p)], "batch_size"),
    "train-lr-0": (lambda p: ["train", "--lr", "0", "--out", str(p)], "lr"),
    "train-lr-nan": (lambda p: ["train", "--lr", "nan", "--out", str(p)], "lr"),
    "train-gamma-negative": (lambda p: ["train", "--loss", "focal", "--gamma", "-1", "--out", str(p)], "gamma"),
    "train-label-smoothing-above-one": (lambda p: ["train", "--loss", "ls", "--label-smoothing", "1.5", "--out", str(p)],
                                  "label_smoothing"),
    "train-kappa-zero": (lambda p: ["train", "--loss", "mse", "--kappa", "0", "--out", str(p)], "kappa"),
    "train-missing-data-dir": (lambda p: ["train", "--dataset", "mnist", "--data-dir", str(p / "none"),
                                          "--out", str(p)], "data_dir"),
    "train-threads-0": (lambda p: ["train", "--threads", "0", "--out", str(p)], "threads"),
    "demo-epochs-0": (lambda p: ["demo", "--epochs", "0", "--out", str(p)], "epochs"),
    "demo-threads-negative": (lambda p: ["demo", "--threads", "-2", "--out", str(p)], "threads"),
}


def _write_text(folder):
    path = folder / "features.txt"
    path.write_text("not an array\n")
    return path


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, tmp_path, capsys):
    argv, argument = CLI_CASES[case]
    code = cli.main(argv(tmp_path))
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ncfast {argv(tmp_path)[0]}: error: ")
    assert argument in lines[0]
    assert out == ""
