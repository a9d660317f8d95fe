"""Property tests: hypothesis draws the problem — N, K, dtype, memory layout, ignored
rows, class weights and the loss's hyper-parameters — and every backend's fused result must
equal the float64 reference within the dtype's tolerance; NCStats fed the same data in any batch
split and order must give the same metrics. Derandomized, so CI sees the same examples each run.

Examples per test (``max_examples``): losses 100 per (loss, backend) on "cpp" and "torch", 10
per loss with K > 65536 on "cpp", 20 per loss on "triton" (interpreted: tiny shapes); linear +
loss 40 per loss; NCStats splits 40 per backend."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ncfast
from ncfast.reference import linear as linear_ref
from ncfast.reference import losses as ref
from tolerances import LINEAR_LOSS, LOSS

# |actual − expected| ≤ tol + tol·|expected| against float64 math on the same (rounded) inputs:
# fp32/fp64 accumulate in their own type, the 16-bit types in fp32 and round loss and gradient
# to their own 8 (bf16) or 11 (fp16) bits.
DTYPES = list(LOSS)
LOSSES = {"cross_entropy": ncfast.cross_entropy, "focal": ncfast.focal_loss, "rescaled_mse": ncfast.rescaled_mse}
FAST_BACKENDS = [b for b in ("cpp", "torch") if b in ncfast.available_backends()]
HAS_TRITON = "triton" in ncfast.available_backends()
HAS_CPP = "cpp" in ncfast.available_backends()

PROPERTY = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _layout(data, n, k, dtype, values):
    """The (N, K) logits as a contiguous tensor, a row-strided slice of a wider one, or a view
    with column stride 2."""
    layout = data.draw(st.sampled_from(["contiguous", "wide-rows", "column-step"]), label="layout")
    if layout == "contiguous":
        return values.to(dtype)
    if layout == "wide-rows":
        pad = data.draw(st.integers(1, 9), label="row padding")
        wide = torch.full((n, k + pad), float("nan"), dtype=dtype)
        wide[:, :k] = values.to(dtype)
        return wide[:, :k]
    wide = torch.full((n, 2 * k), float("nan"), dtype=dtype)
    wide[:, ::2] = values.to(dtype)
    return wide[:, ::2]


def _draw_problem(data, loss, n, k, dtypes=DTYPES):
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    scale = data.draw(st.sampled_from([0.1, 1.0, 4.0] if loss != "rescaled_mse" else [0.1, 1.0]), label="scale")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, dtype=torch.float64, generator=generator) * scale
    logits = _layout(data, n, k, dtype, values)
    ignore_index = data.draw(st.sampled_from([-100, -1, 0]), label="ignore_index")
    target = torch.randint(0, k, (n,), generator=generator)
    pattern = data.draw(st.sampled_from(["none", "every-third", "random", "all"]), label="ignored rows")
    if pattern == "every-third":
        target[::3] = ignore_index
    elif pattern == "random":
        target[torch.rand(n, generator=generator) < 0.3] = ignore_index
    elif pattern == "all":
        target[:] = ignore_index
    kwargs = dict(ignore_index=ignore_index, reduction=data.draw(st.sampled_from(["mean", "sum", "none"]),
                                                                   label="reduction"))
    if data.draw(st.booleans(), label="class weights"):
        kwargs["weight"] = torch.rand(k, dtype=torch.float32, generator=generator) + 0.1
    if loss == "cross_entropy":
        kwargs["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.99]), label="label_smoothing")
        kwargs["lse_square_scale"] = data.draw(st.sampled_from([0.0, 1e-4, 0.1]), label="lse_square_scale")
        kwargs["softcap"] = data.draw(st.sampled_from([None, 2.0, 30.0]), label="softcap")
    elif loss == "focal":
        kwargs["gamma"] = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), label="gamma")
        if data.draw(st.booleans(), label="alpha"):
            kwargs["alpha"] = torch.rand(k, dtype=torch.float64, generator=generator) + 0.05
    else:
        kwargs["kappa"] = data.draw(st.sampled_from([0.1, 1.0, 7.5]), label="kappa")
        kwargs["beta"] = data.draw(st.sampled_from([-2.0, 0.0, 1.0, 15.0]), label="beta")
    return logits, target, kwargs


def _reference(loss, logits, target, kwargs):
    """The float64 loss and its autograd gradient ∂(Σ loss)/∂logits."""
    z = logits.detach().double().requires_grad_(True)
    kw = dict(kwargs)
    reduction, ignore_index = kw.pop("reduction"), kw["ignore_index"]
    weight = kw.pop("weight", None)
    weight = None if weight is None else weight.double()
    if loss == "cross_entropy":
        rows = ref.cross_entropy_rows(z, target, weight, ignore_index, kw["label_smoothing"], kw["lse_square_scale"],
                                      kw["softcap"] or 0.0)
    elif loss == "focal":
        rows = ref.focal_rows(z, target, kw["gamma"], kw.get("alpha"), weight, ignore_index)
    else:
        rows = ref.rescaled_mse_rows(z, target, kw["kappa"], kw["beta"], weight, ignore_index)
    value = ref.reduce(rows, target, weight, ignore_index, reduction)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


def _check_loss(loss, backend, logits, target, kwargs):
    x = logits.detach().clone().requires_grad_(True)
    with ncfast.use_backend(backend):
        value = LOSSES[loss](x, target, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert value.dtype == logits.dtype and grad.dtype == logits.dtype and grad.shape == logits.shape
    expected, expected_grad = _reference(loss, logits, target, kwargs)
    tol = LOSS[logits.dtype]
    torch.testing.assert_close(value.double(), expected, atol=tol, rtol=tol, equal_nan=True)
    if kwargs["reduction"] == "mean" and not (target != kwargs["ignore_index"]).any():
        return  # 0/0: the loss is NaN like torch's, and so is every gradient entry
    torch.testing.assert_close(grad.double(), expected_grad, atol=tol, rtol=tol)


# Regimes of the loss property test: backend, examples, rows, classes, dtypes (None: all).
_K_SMALL = st.one_of(st.integers(1, 12), st.sampled_from([31, 64, 97, 128, 257, 300]))
LOSS_REGIMES = {
    **{backend: (backend, 100, st.integers(0, 40), _K_SMALL, None) for backend in FAST_BACKENDS},
    # K past 2^16: the blocked row passes and any 16-bit index arithmetic would show here.
    "cpp_many_classes": ("cpp", 10, st.integers(1, 2), st.sampled_from([65537, 70001, 131101]),
                         [torch.float32, torch.bfloat16]),
    "triton": ("triton", 20, st.integers(0, 5), st.integers(1, 40), None),
}
_SKIP = {"cpp_many_classes": not HAS_CPP, "triton": not HAS_TRITON}


@pytest.mark.parametrize("regime", [
    pytest.param(name, marks=pytest.mark.skipif(_SKIP.get(name, False), reason=f"{name}: backend not available"))
    for name in LOSS_REGIMES
])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_matches_reference(loss, regime):
    backend, examples, rows, classes, dtypes = LOSS_REGIMES[regime]

    @settings(max_examples=examples, **PROPERTY)
    @given(data=st.data())
    def check(data):
        n, k = data.draw(rows, label="N"), data.draw(classes, label="K")
        _check_loss(loss, backend, *_draw_problem(data, loss, n, k, dtypes=dtypes or DTYPES))

    check()


# --------------------------------------------------------------------------------------------
# linear + loss against the unfused reference
# --------------------------------------------------------------------------------------------
LINEAR = {"cross_entropy": ncfast.linear_cross_entropy, "focal": ncfast.linear_focal_loss,
          "rescaled_mse": ncfast.linear_rescaled_mse}


@pytest.mark.parametrize("loss", sorted(LINEAR))
@settings(max_examples=40, **PROPERTY)
@given(data=st.data())
def test_linear_loss_matches_reference(loss, data):
    n = data.draw(st.integers(0, 30), label="N")
    d = data.draw(st.integers(1, 17), label="d")
    k = data.draw(st.integers(1, 70), label="K")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, dtype=torch.float64, generator=g).to(dtype)
    weight = (torch.randn(k, d, dtype=torch.float64, generator=g) / math.sqrt(d)).to(dtype)
    bias = torch.randn(k, dtype=torch.float64, generator=g).to(dtype) if data.draw(st.booleans(), label="bias") \
        else None
    target = torch.randint(0, k, (n,), generator=g)
    if n and data.draw(st.booleans(), label="ignored rows"):
        target[::2] = -100
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    # a small chunk budget forces several row chunks, even one row per chunk
    chunk_memory = data.draw(st.sampled_from([1, 256, 4096, 1 << 26]), label="chunk_memory")
    params = {"cross_entropy": dict(label_smoothing=data.draw(st.sampled_from([0.0, 0.2]), label="ls")),
              "focal": dict(gamma=data.draw(st.sampled_from([0.0, 1.0, 2.5]), label="gamma")),
              "rescaled_mse": dict(kappa=2.0, beta=data.draw(st.sampled_from([1.0, 5.0]), label="beta"))}[loss]
    inputs = [t.clone().requires_grad_(True) for t in (features, weight) + ((bias,) if bias is not None else ())]
    value = LINEAR[loss](inputs[0], inputs[1], inputs[2] if bias is not None else None, target, reduction=reduction,
                         chunk_memory=chunk_memory, **params)
    grads = torch.autograd.grad(value.sum(), inputs)
    refs = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = linear_ref.linear_loss(refs[0], refs[1], refs[2] if bias is not None else None, target, loss,
                                      reduction=reduction, **params)
    expected_grads = torch.autograd.grad(expected.sum(), refs, allow_unused=True)
    tol = LINEAR_LOSS[dtype]
    torch.testing.assert_close(value.double(), expected.detach(), atol=tol, rtol=tol, equal_nan=True)
    if reduction == "mean" and not (target != -100).any():
        return
    for got, want in zip(grads, expected_grads):
        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# NCStats: batch splits and orders do not change the metrics
# --------------------------------------------------------------------------------------------
NC_BACKENDS = [b for b in ncfast.available_backends() if b != "triton"] + (["triton"] if HAS_TRITON else [])
METRIC_KEYS = ("nc1", "nc2", "nc3", "nc4", "equinorm_means", "equiangularity_means", "max_angle_means", "cdnv",
               "equinorm_classifier", "equiangularity_classifier", "max_angle_classifier")


def _metrics(stats, weight, bias):
    values = stats.compute(weight, bias).as_dict()
    return {key: values[key] for key in METRIC_KEYS}


def _assert_same_metrics(a, b):
    for key in METRIC_KEYS:
        assert math.isclose(a[key], b[key], rel_tol=1e-8, abs_tol=1e-12), (key, a[key], b[key])


@pytest.mark.parametrize("backend", NC_BACKENDS)
@settings(max_examples=40, **PROPERTY)
@given(data=st.data())
def test_ncstats_split_and_order_invariant(backend, data):
    """One update of everything = random batch splits in a random order = the same splits fed
    to separate states and merged; all float64, so the metrics agree to 1e-8 relative."""
    small = backend == "triton"
    k = data.draw(st.integers(2, 4 if small else 9), label="K")
    d = data.draw(st.integers(1, 5 if small else 13), label="d")
    n = data.draw(st.integers(k, 12 if small else 60), label="N")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    offset = data.draw(st.sampled_from([0.0, 10.0, 1e3]), label="feature offset")
    features = torch.randn(n, d, dtype=torch.float64, generator=g) + offset
    target = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])  # every class present
    target = target[torch.randperm(n, generator=g)]
    weight = torch.randn(k, d, dtype=torch.float64, generator=g)
    bias = torch.randn(k, dtype=torch.float64, generator=g)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts"))
    bounds = [0] + cuts + [n]
    pieces = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]  # empty pieces included
    order = data.draw(st.permutations(range(len(pieces))), label="order")
    with ncfast.use_backend(backend):
        whole = ncfast.NCStats(k, d).update(features, target)
        streamed = ncfast.NCStats(k, d)
        merged = ncfast.NCStats(k, d)
        for i in order:
            a, b = pieces[i]
            streamed.update(features[a:b], target[a:b])
            merged.merge(ncfast.NCStats(k, d).update(features[a:b], target[a:b]))
    expected = _metrics(whole, weight, bias)
    _assert_same_metrics(_metrics(streamed, weight, bias), expected)
    _assert_same_metrics(_metrics(merged, weight, bias), expected)
    assert streamed.num_samples == n
