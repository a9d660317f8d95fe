"""Fused linear + loss against the unfused float64 computation: loss(H Wᵀ + b) and its
gradients in H, W and b."""

import pytest
import torch

import ncfast
from ncfast import linear
from ncfast.loss_options import LossOptions
from ncfast.reference.linear import linear_loss
from tolerances import LINEAR_LOSS

FUNCTIONS = {
    "cross_entropy": (ncfast.linear_cross_entropy, {"label_smoothing": 0.1}),
    "cross_entropy_z_softcap": (ncfast.linear_cross_entropy, {"lse_square_scale": 1e-2, "softcap": 2.5}),
    "focal": (ncfast.linear_focal_loss, {"gamma": 1.5}),
    "rescaled_mse": (ncfast.linear_rescaled_mse, {"kappa": 2.0, "beta": 0.7}),
}
# The reference loss of each FUNCTIONS entry.
REFERENCE_LOSS = {"cross_entropy_z_softcap": "cross_entropy"}


def _problem(num_rows=23, dim=7, num_classes=13, dtype=torch.float64, bias=True, ignore=False):
    features = torch.randn(num_rows, dim, dtype=dtype)
    weight = torch.randn(num_classes, dim, dtype=dtype) / dim**0.5
    bias_ = torch.randn(num_classes, dtype=dtype) if bias else None
    target = torch.randint(0, num_classes, (num_rows,))
    if ignore:
        target[::4] = -1
    return features, weight, bias_, target


def _reference_kwargs(loss, kwargs):
    out = dict(kwargs)
    if "label_smoothing" not in out and loss == "cross_entropy":
        out["label_smoothing"] = 0.0
    return out


def _losses_and_grads(fn, reference_kwargs, loss, features, weight, bias, target, reduction, **kwargs):
    """(ncfast, reference) pairs of the loss and the gradients of Σ u·loss for a random u."""
    leaves = [t.detach().requires_grad_(True) for t in (features, weight) + ((bias,) if bias is not None else ())]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    value = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, target, reduction=reduction, **kwargs)
    ref = linear_loss(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None, target, loss=REFERENCE_LOSS.get(loss, loss),
                      reduction=reduction, **reference_kwargs)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad((value.double() * upstream).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_leaves)
    return [(value, ref)] + list(zip(grads, ref_grads))


def _assert_close(pairs, tol):
    for got, want in pairs:
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("loss", list(FUNCTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_unfused_float64(loss, reduction, bias, weighted):
    features, weight, bias_, target = _problem(bias=bias, ignore=weighted)
    fn, kwargs = FUNCTIONS[loss]
    kwargs = dict(kwargs)
    if weighted:
        kwargs.update(class_weight=torch.rand(weight.shape[0], dtype=torch.float64) + 0.5, ignore_index=-1)
        if loss == "focal":
            kwargs["alpha"] = torch.rand(weight.shape[0], dtype=torch.float64)
    # 5 rows per chunk: 23 rows run as 4 full chunks and one of 3.
    chunk_memory = 5 * weight.shape[0] * 8
    assert linear.chunk_rows(23, weight.shape[0], torch.float64, chunk_memory) == 5
    pairs = _losses_and_grads(fn, _reference_kwargs(loss, kwargs), loss, features, weight, bias_, target, reduction,
                              chunk_memory=chunk_memory, **kwargs)
    _assert_close(pairs, LINEAR_LOSS[torch.float64])


@pytest.mark.parametrize("loss", list(FUNCTIONS))
def test_gradcheck(loss):
    features, weight, bias, target = _problem(num_rows=6, dim=3, num_classes=4)
    fn, kwargs = FUNCTIONS[loss]
    inputs = tuple(t.requires_grad_(True) for t in (features, weight, bias))
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fn(h, w, b, target, reduction=reduction, chunk_memory=4 * 4 * 8, **kwargs), inputs
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", list(FUNCTIONS))
def test_low_precision_against_float64(loss, dtype):
    features, weight, bias, target = _problem(num_rows=45, dim=16, num_classes=33, dtype=dtype)
    fn, kwargs = FUNCTIONS[loss]
    pairs = _losses_and_grads(fn, _reference_kwargs(loss, kwargs), loss, features, weight, bias, target, "mean",
                              chunk_memory=8 * 33 * features.element_size(), **kwargs)
    # bf16 values are compared relative to the gradient's scale.
    tol = LINEAR_LOSS[dtype]
    for got, want in pairs:
        scale = max(float(want.detach().abs().max()), 1.0) if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(got.double() / scale, want / scale, atol=tol, rtol=tol)


def test_matches_torch_cross_entropy_float32():
    features, weight, bias, target = _problem(num_rows=40, dim=12, num_classes=29, dtype=torch.float32, ignore=True)
    got = ncfast.linear_cross_entropy(features, weight, bias, target, ignore_index=-1, label_smoothing=0.05,
                                      chunk_memory=7 * 29 * 4)
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(features, weight, bias), target,
                                             ignore_index=-1, label_smoothing=0.05)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_chunk_size_does_not_change_the_result():
    features, weight, bias, target = _problem(num_rows=50, dim=9, num_classes=17)
    results = []
    for rows in (1, 7, 50):
        leaves = [t.detach().requires_grad_(True) for t in (features, weight, bias)]
        value = ncfast.linear_focal_loss(*leaves, target, chunk_memory=rows * 17 * 8)
        results.append([value] + list(torch.autograd.grad(value, leaves)))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_is_bit_identical_across_runs_and_retained_graphs(bias):
    """The fp32 CPU path (oneDNN products, in-place dW accumulation, several chunks) gives the
    same bits on every call; a second backward through a retained graph, after the first
    handed its stored gradients over, gives the first one's gradients scaled exactly."""
    features, weight, bias_, target = _problem(num_rows=300, dim=40, num_classes=97, dtype=torch.float32, bias=bias)
    leaves = [t for t in (features, weight, bias_) if t is not None]

    def run():
        params = [t.detach().requires_grad_(True) for t in leaves]
        value = ncfast.linear_cross_entropy(params[0], params[1], params[2] if bias else None, target,
                                            chunk_memory=64 * 97 * 4)
        return value, params

    value, params = run()
    value.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (value * 2).backward()
    for p, want in zip(params, first):
        assert torch.equal(p.grad, want * 2)
    again, params = run()
    again.backward()
    assert torch.equal(again, value)
    for p, want in zip(params, first):
        assert torch.equal(p.grad, want)
    ref_leaves = [t.double().requires_grad_(True) for t in leaves]
    ref = linear_loss(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, target)
    _assert_close([(value, ref)] + list(zip(first, torch.autograd.grad(ref, ref_leaves))),
                  LINEAR_LOSS[torch.float32])


@pytest.mark.parametrize("num_rows", [0, 6])
def test_no_counted_row_gives_nan_loss_and_zero_gradient(num_rows):
    features, weight, bias, target = _problem(num_rows=num_rows)
    target.fill_(-100)
    leaves = [t.requires_grad_(True) for t in (features, weight, bias)]
    value = ncfast.linear_cross_entropy(*leaves, target)
    assert value.isnan()
    value.backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_chunk_rows_from_budget(monkeypatch):
    monkeypatch.setattr(linear, "CACHED_CHUNK_BYTES", 16 * 2**20)
    # Long rows: a cache-sized chunk (16 MiB of 16384 fp32 logits) while that is GEMM_ROWS or more,
    assert linear.chunk_rows(65536, 16384, torch.float32) == 16 * 2**20 // (16384 * 4)
    # then the GEMMs' minimum (a chunk of 16 rows of 262144 logits would fill the cache).
    assert linear.chunk_rows(65536, 262144, torch.float32) == linear.GEMM_ROWS
    # Short rows: a cache-sized chunk (16 MiB of 1000 fp32 logits, in whole multiples of 32 rows).
    assert linear.chunk_rows(10**6, 1000, torch.float32) == 16 * 2**20 // 4000 // 32 * 32 == 4192
    assert linear.chunk_rows(10**6, 1000, torch.bfloat16) == 16 * 2**20 // 2000 // 32 * 32
    # Never more rows than there are, never more bytes than chunk_memory, at least one row.
    assert linear.chunk_rows(10, 16384, torch.float32) == 10
    assert linear.chunk_rows(10, 16384, torch.float32, chunk_memory=1) == 1
    assert linear.chunk_rows(1000, 100, torch.bfloat16, chunk_memory=100 * 2 * 30) == 30
    assert linear.chunk_rows(65536, 2**22, torch.float32) == linear.CHUNK_MEMORY_BYTES // (2**22 * 4)


def test_last_level_cache_size_is_read_or_defaulted():
    size = linear._last_level_cache_bytes()
    assert isinstance(size, int) and size >= 2**20
    assert linear.CACHED_CHUNK_BYTES == size // 2


def test_default_chunking_over_several_chunks_matches_float64(monkeypatch):
    """The default ``chunk_memory`` with the preferred rows lowered to 6: 23 rows run as
    three full chunks and one of 5, and the result is the unfused float64 one."""
    monkeypatch.setattr(linear, "GEMM_ROWS", 6)
    monkeypatch.setattr(linear, "CACHED_CHUNK_BYTES", 6 * 13 * 8)
    assert linear.chunk_rows(23, 13, torch.float64) == 6
    features, weight, bias, target = _problem()
    fn, kwargs = FUNCTIONS["cross_entropy"]
    pairs = _losses_and_grads(fn, _reference_kwargs("cross_entropy", kwargs), "cross_entropy", features, weight,
                              bias, target, "mean", **kwargs)
    _assert_close(pairs, LINEAR_LOSS[torch.float64])


def test_frozen_classifier_and_no_grad():
    features, weight, bias, target = _problem()
    features.requires_grad_(True)
    ncfast.linear_cross_entropy(features, weight, bias, target).backward()
    assert weight.grad is None and bias.grad is None
    expected = features.detach().requires_grad_(True)
    linear_loss(expected, weight, bias, target).backward()
    torch.testing.assert_close(features.grad, expected.grad, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        value = ncfast.linear_rescaled_mse(features, weight, bias, target)
    assert not value.requires_grad
    torch.testing.assert_close(value, linear_loss(features, weight, bias, target, loss="rescaled_mse").detach())


@pytest.mark.parametrize("trainable", ["features", "weight", "bias", "weight+bias"])
def test_subsets_of_gradients(trainable):
    """Only the asked-for gradients are computed, each through its own path (with a frozen
    classifier, db comes from a matrix-vector product instead of the dW GEMM)."""
    features, weight, bias, target = _problem()
    named = {"features": features, "weight": weight, "bias": bias}
    leaves = [named[name].requires_grad_(True) for name in trainable.split("+")]
    ncfast.linear_focal_loss(features, weight, bias, target, reduction="sum", chunk_memory=600).backward()
    expected = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    copies = {name: e for name, e in zip(trainable.split("+"), expected)}
    args = [copies.get(name, named[name].detach()) for name in ("features", "weight", "bias")]
    linear_loss(*args, target, loss="focal", reduction="sum").backward()
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, want.grad, atol=1e-12, rtol=1e-12)
    for name, tensor in named.items():
        if name not in copies:
            assert tensor.grad is None


@pytest.mark.parametrize("backend", ncfast.available_backends())
@pytest.mark.parametrize("num_classes", [5, 130, 2100])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
def test_every_backend_float32(backend, num_classes, loss):
    """fp32 loss and gradients within 1e-4 of float64 on each backend ("triton" under the
    interpreter without a GPU), rows in two chunks."""
    fn, kwargs = FUNCTIONS[loss]
    kwargs = dict(kwargs, ignore_index=-1)
    features, weight, bias, target = _problem(num_rows=6, dim=16, num_classes=num_classes, dtype=torch.float32,
                                              ignore=True)
    with ncfast.use_backend(backend):
        pairs = _losses_and_grads(fn, _reference_kwargs(loss, kwargs), loss, features, weight, bias, target, "mean",
                                  chunk_memory=3 * num_classes * 4, **kwargs)
    _assert_close(pairs, 1e-4)


def test_torch_backend_matches_cpp():
    features, weight, bias, target = _problem(ignore=True)
    got = ncfast.linear_focal_loss(features, weight, bias, target, ignore_index=-1, reduction="none", chunk_memory=400)
    with ncfast.use_backend("torch"):
        want = ncfast.linear_focal_loss(features, weight, bias, target, ignore_index=-1, reduction="none",
                                        chunk_memory=400)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_opcheck():
    features, weight, bias, target = _problem(num_rows=9, dim=4, num_classes=6)
    for reduction, flags in (("mean", (True, True, True)), ("none", (False, False, False))):
        args = (features.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), target, None,
                None, 4, None, *flags, *LossOptions(reduction=reduction))
        torch.library.opcheck(torch.ops.ncfast.fused_linear_loss, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_without_graph_breaks(reduction):
    features, weight, bias, target = _problem(num_rows=12, dim=4, num_classes=7)
    leaves = [t.requires_grad_(True) for t in (features, weight, bias)]
    compiled = torch.compile(ncfast.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    value = compiled(*leaves, target, reduction=reduction, chunk_memory=5 * 7 * 8)
    grads = torch.autograd.grad(value.sum(), leaves)
    expected = linear_loss(*leaves, target, reduction=reduction)
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def _bad_inputs():
    f, w, b, t = _problem(dtype=torch.float32)
    yield "features", TypeError, dict(features=f.double())
    yield "features", ValueError, dict(features=f[None])
    yield "features", TypeError, dict(features=f.numpy())
    yield "weight", ValueError, dict(weight=w[:, :-1])
    yield "weight", TypeError, dict(weight=w.double())
    yield "weight", ValueError, dict(weight=w.to("meta"))
    yield "weight", ValueError, dict(weight=w[:0])
    yield "bias", ValueError, dict(bias=b[:-1])
    yield "bias", TypeError, dict(bias=b.half())
    yield "bias", ValueError, dict(bias=b.to("meta"))
    yield "target", ValueError, dict(target=t[:-1])
    yield "target", TypeError, dict(target=t.float())  # probabilities, of the wrong shape
    yield "target", TypeError, dict(target=t.bool())
    yield "target", ValueError, dict(target=t.to("meta"))
    yield "target", ValueError, dict(target=torch.full_like(t, 13))
    yield "class_weight", ValueError, dict(class_weight=torch.ones(5))
    yield "class_weight", TypeError, dict(class_weight=torch.ones(13, dtype=torch.int64))
    yield "reduction", ValueError, dict(reduction="avg")
    yield "ignore_index", TypeError, dict(ignore_index=1.5)
    yield "chunk_memory", ValueError, dict(chunk_memory=0)
    yield "chunk_memory", TypeError, dict(chunk_memory=1.0)
    yield "label_smoothing", ValueError, dict(label_smoothing=1.5)
    yield "ignore_index", ValueError, dict(ignore_index=2**63)


@pytest.mark.parametrize("name,error,change", list(_bad_inputs()), ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_names_the_argument(name, error, change):
    f, w, b, t = _problem(dtype=torch.float32)
    args = dict(features=f, weight=w, bias=b, target=t)
    args.update(change)
    with pytest.raises(error, match=name):
        ncfast.linear_cross_entropy(**args)


def test_bad_hyperparameters():
    f, w, b, t = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="gamma"):
        ncfast.linear_focal_loss(f, w, b, t, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        ncfast.linear_focal_loss(f, w, b, t, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="lse_square_scale"):
        ncfast.linear_cross_entropy(f, w, b, t, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        ncfast.linear_cross_entropy(f, w, b, t, softcap=0.0)
    with pytest.raises(ValueError, match="kappa"):
        ncfast.linear_rescaled_mse(f, w, b, t, kappa=0.0)
