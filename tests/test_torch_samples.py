"""torch's own test inputs for cross-entropy — every OpInfo sample of
``nn.functional.cross_entropy`` and every ModuleInfo input of ``nn.CrossEntropyLoss`` — through
ncfast on every backend, against torch in float64 (forward and gradients), plus
gradgradcheck of the float64 samples. Needs torch's test helpers (the ``expecttest`` package)."""

import pytest
import torch
import torch.nn.functional as F

import ncfast

pytest.importorskip("expecttest", reason="torch.testing._internal needs the expecttest package")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402
from tolerances import TORCH_SAMPLES  # noqa: E402

BACKENDS = ncfast.available_backends()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OPINFO = next(op for op in op_db if op.name == "nn.functional.cross_entropy")
MODULEINFO = next(info for info in module_db if info.module_cls is torch.nn.CrossEntropyLoss)


def _double(value):
    return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _check(ours, theirs, logits, target, kwargs, dtype, backend):
    """ours(logits, target, **kwargs) on ``backend`` against theirs in float64: the value and
    the gradients of every floating input (the probability target's too)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (logits, target) if t.is_floating_point()]
    with ncfast.use_backend(backend):
        value = ours(*leaves, *([target] if not target.is_floating_point() else []), **kwargs)
    grads = torch.autograd.grad(value.sum(), leaves)
    expected_leaves = [_double(t).requires_grad_(True) for t in (logits, target) if t.is_floating_point()]
    double_kwargs = {k: _double(v) for k, v in kwargs.items()}
    expected = theirs(*expected_leaves, *([target] if not target.is_floating_point() else []), **double_kwargs)
    expected_grads = torch.autograd.grad(expected.sum(), expected_leaves)
    tol = TORCH_SAMPLES[dtype]
    assert value.dtype == dtype
    torch.testing.assert_close(value.double(), expected, atol=tol, rtol=tol, equal_nan=True)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, equal_nan=True)


def _opinfo_samples(dtype):
    return list(OPINFO.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opinfo_samples(backend, dtype):
    samples = _opinfo_samples(dtype)
    assert any(s.args[0].is_floating_point() for s in samples) and any(not s.args[0].is_floating_point()
                                                                       for s in samples)
    for sample in samples:
        _check(ncfast.cross_entropy, F.cross_entropy, sample.input, sample.args[0], sample.kwargs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opinfo_samples_gradgradcheck(backend):
    samples = _opinfo_samples(torch.float64)
    if backend == "triton":  # numerical second derivatives run the interpreted kernel hundreds of times
        samples = samples[::10]
    for sample in samples:
        target = sample.args[0]
        inputs = [sample.input.detach().clone().requires_grad_(True)]
        if target.is_floating_point():
            inputs.append(target.detach().clone().requires_grad_(True))
        with ncfast.use_backend(backend):
            assert torch.autograd.gradgradcheck(
                lambda x, *q: ncfast.cross_entropy(x, q[0] if q else target, **sample.kwargs), inputs)


def _module_inputs():
    return MODULEINFO.module_inputs_func(MODULEINFO, device="cpu", dtype=torch.float64, requires_grad=True,
                                         training=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moduleinfo_inputs(backend):
    inputs = _module_inputs()
    if backend == "triton":  # the interpreter gets every tenth input, to stay within seconds
        inputs = inputs[::10]
    for module_input in inputs:
        kwargs = module_input.constructor_input.kwargs
        ours, theirs = ncfast.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
        logits, target = module_input.forward_input.args
        _check(lambda *a: ours(*a), lambda *a: theirs(*a), logits, target, {}, torch.float64, backend)
