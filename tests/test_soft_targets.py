"""Cross-entropy against probability targets (mixup, CutMix, distillation) on every backend,
against torch.nn.functional.cross_entropy with the same arguments."""

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast.reference import losses as reference
from tolerances import LOSS

BACKENDS = ncfast.available_backends()


def probabilities(shape, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=generator).mul(2).softmax(1).to(dtype)


def value_and_grads(fn, logits, target, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    q = target.detach().clone().requires_grad_(True)
    value = fn(x, q, **kwargs)
    grads = torch.autograd.grad(value.sum(), (x, q))
    return (value.detach(),) + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 7), (7,), (3, 4, 2, 3), (2, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(backend, shape, reduction, weighted, label_smoothing, dtype):
    if backend == "triton" and (dtype == torch.float32 or shape == (2, 300)):
        pytest.skip("the Triton interpreter gets the float64 small shapes only")
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    target = probabilities(shape if len(shape) > 1 else (1,) + shape, dtype).reshape(shape)
    weight = torch.rand(num_classes, dtype=dtype) + 0.5 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    with ncfast.use_backend(backend):
        got = value_and_grads(ncfast.cross_entropy, logits, target, **kwargs)
    want = value_and_grads(F.cross_entropy, logits.double(), target.double(),
                           **dict(kwargs, weight=None if weight is None else weight.double()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=LOSS[dtype], rtol=LOSS[dtype])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    logits, target = torch.randn(9, 33, dtype=torch.float64) * 3, probabilities((9, 33))
    with ncfast.use_backend(backend):
        got = value_and_grads(ncfast.cross_entropy, logits.to(dtype), target.to(dtype))
    want = value_and_grads(F.cross_entropy, logits.to(dtype).double(), target.to(dtype).double())
    for a, e in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.double(), e, atol=LOSS[dtype], rtol=LOSS[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_inplace_and_second_order(backend):
    logits, target = torch.randn(4, 6, dtype=torch.float64) * 3, probabilities((4, 6))
    weight = torch.rand(6, dtype=torch.float64) + 0.5

    def expected(z, q):
        return reference.soft_cross_entropy_rows(z, q, weight, 0.1, 2.0).mean()

    with ncfast.use_backend(backend):
        got = value_and_grads(ncfast.cross_entropy, logits, target, weight=weight, label_smoothing=0.1, softcap=2.0)
        x = logits.clone().requires_grad_(True)
        inplace = ncfast.cross_entropy(x * 1, target, weight=weight, label_smoothing=0.1, softcap=2.0,
                                       inplace_backward=True)
        (inplace_grad,) = torch.autograd.grad(inplace, x)
        assert torch.autograd.gradgradcheck(
            lambda z, q: ncfast.cross_entropy(z, q, weight=weight, label_smoothing=0.1, softcap=2.0),
            (logits.clone().requires_grad_(True), target.clone().requires_grad_(True)))
    want = value_and_grads(expected, logits, target)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inplace_grad, want[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(reduction):
    generator = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(*s, dtype=torch.float64, generator=generator) for s in [(9, 4), (6, 4), (6,)])
    target = probabilities((9, 6))
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b, target)]
    value = ncfast.linear_cross_entropy(*leaves[:3], leaves[3], reduction=reduction, label_smoothing=0.1,
                                        chunk_memory=4 * 6 * 8)
    got = torch.autograd.grad(value.sum(), leaves)
    expected_leaves = [t.clone().requires_grad_(True) for t in (h, w, b, target)]
    expected = F.cross_entropy(F.linear(*expected_leaves[:3]), expected_leaves[3], reduction=reduction,
                               label_smoothing=0.1)
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-12)
    for a, e in zip(got, torch.autograd.grad(expected.sum(), expected_leaves)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
