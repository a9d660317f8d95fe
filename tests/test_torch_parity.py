"""Drop-in parity with torch beyond the formulas: arguments torch accepts, layouts torch
refuses to write into, the gradients torch gives at the edges, and vocabulary-parallel splits."""

import math
import socket

import pytest
import torch
import torch.nn.functional as F

import ncfast

BACKENDS = ncfast.available_backends()


def grad_of(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


# ---------------------------------------------------------------------------- in-place writes
@pytest.mark.parametrize("layout", ["expand", "as_strided"])
def test_inplace_backward_refuses_overlapping_logits(layout):
    """Rows sharing memory would receive each other's gradients (a wrong b.grad, silently)."""
    base = torch.randn(1, 6)
    overlapping = base.expand(4, 6) if layout == "expand" else torch.randn(12).as_strided((4, 6), (2, 1))
    with pytest.raises(ValueError, match="logits: elements overlap in memory"):
        ncfast.cross_entropy(overlapping, torch.tensor([0, 1, 2, 3]), inplace_backward=True)


def test_inplace_backward_takes_non_overlapping_strides():
    big = torch.randn(5, 16, dtype=torch.float64)
    target = torch.tensor([0, 3, 5, 1, 2])
    expected = F.cross_entropy(big[:, ::2], target)
    view = big.clone()[:, ::2]
    assert torch.allclose(ncfast.cross_entropy(view, target, inplace_backward=True), expected)


# ---------------------------------------------------------------------------- edges of the gradient
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_zero_gradient(backend):
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.full((3,), -100)
    with ncfast.use_backend(backend):
        value, grad = grad_of(ncfast.cross_entropy, logits, target)
    torch_value, torch_grad = grad_of(F.cross_entropy, logits, target)
    assert math.isnan(value) and math.isnan(torch_value)
    assert torch.equal(grad, torch_grad) and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("loss", [ncfast.cross_entropy, ncfast.focal_loss, ncfast.rescaled_mse])
def test_ignored_row_with_non_finite_logits_gives_zero_gradient(backend, bad, loss):
    logits = torch.randn(4, 5, dtype=torch.float64)
    logits[1, 2] = bad
    target = torch.tensor([0, -100, 3, 4])
    with ncfast.use_backend(backend):
        value, grad = grad_of(loss, logits, target)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and not grad[1].any()
    kept = logits[[0, 2, 3]]
    _, expected = grad_of(loss, kept, target[[0, 2, 3]], reduction="sum")
    torch.testing.assert_close(grad[[0, 2, 3]], expected / 3, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_one_matches_torch(backend):
    logits, target = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, -100])
    with ncfast.use_backend(backend):
        value, grad = grad_of(ncfast.cross_entropy, logits, target, label_smoothing=1.0)
    torch_value, torch_grad = grad_of(F.cross_entropy, logits, target, label_smoothing=1.0)
    torch.testing.assert_close(value, torch_value, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, torch_grad, atol=1e-12, rtol=1e-12)


def test_module_takes_z_loss_and_softcap():
    logits, target = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    module = ncfast.CrossEntropyLoss(lse_square_scale=0.1, softcap=2.0)
    expected = ncfast.cross_entropy(logits, target, lse_square_scale=0.1, softcap=2.0)
    assert torch.equal(module(logits, target), expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weight_of_another_dtype_is_read_at_full_precision(backend):
    """torch requires the weight in the logits' dtype; ncfast takes any floating dtype."""
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    with ncfast.use_backend(backend):
        value, grad = grad_of(ncfast.cross_entropy, logits, target, weight=weight, label_smoothing=0.1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(logits, target, weight=weight)
    torch_value, torch_grad = grad_of(F.cross_entropy, logits.double(), target, weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(value.double(), torch_value, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(grad.double(), torch_grad, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, t: ncfast.cross_entropy(x, t, ignore_index=2**63), ValueError, "ignore_index: .*int64"),
    (lambda x, t: ncfast.cross_entropy(x, t, ignore_index=-(2**63) - 1), ValueError, "ignore_index: .*int64"),
    (lambda x, t: ncfast.focal_loss(x, t, alpha="abc"), TypeError, "alpha: expected"),
    (lambda x, t: ncfast.FocalLoss(alpha="abc")(x, t), TypeError, "alpha: expected"),
    (lambda x, t: ncfast.cross_entropy(x, t, softcap=1e-45), ValueError, "softcap"),
    (lambda x, t: ncfast.focal_loss(x, torch.rand(3, 7)), TypeError, "probability targets are defined for "
                                                                     "cross-entropy only"),
    (lambda x, t: ncfast.cross_entropy(x, torch.rand(3, 7), lse_square_scale=0.1), ValueError, "lse_square_scale"),
])
def test_argument_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(3, 7), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_softcap_stays_finite(backend):
    logits, target = torch.randn(4, 5) * 3, torch.tensor([0, 1, 2, 3])
    with ncfast.use_backend(backend):
        value, grad = grad_of(ncfast.cross_entropy, logits, target, softcap=1e-30)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, torch.tensor(math.log(5.0)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- vocabulary parallelism
def _unequal_worker(rank, world, port, backend, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        logits, target = torch.randn(7, 10, dtype=torch.float64), torch.tensor([0, 9, 4, 5, -100, 3, 6])
        columns = [slice(0, 4), slice(4, 10)][rank]
        local = logits[:, columns].clone().requires_grad_(True)
        out = {}
        with ncfast.use_backend(backend):
            value = ncfast.cross_entropy(local, target, process_group=dist.group.WORLD, label_smoothing=0.1)
            (grad,) = torch.autograd.grad(value, local)
            out["value"], out["grad"] = value.detach(), grad
            bad = target.clone()
            bad[0] = 10 if rank == 1 else 0  # only rank 1 sees an out-of-range target
            try:
                ncfast.cross_entropy(local, bad, process_group=dist.group.WORLD)
                out["error"] = None
            except ValueError as error:
                out["error"] = str(error)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_vocab_parallel_with_unequal_slices(backend):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_unequal_worker, args=(2, port, backend, results), nprocs=2, join=True)
    torch.manual_seed(0)
    logits, target = torch.randn(7, 10, dtype=torch.float64), torch.tensor([0, 9, 4, 5, -100, 3, 6])
    value, grad = grad_of(F.cross_entropy, logits, target, label_smoothing=0.1)
    for rank, columns in enumerate([slice(0, 4), slice(4, 10)]):
        torch.testing.assert_close(results[rank]["value"], value, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(results[rank]["grad"], grad[:, columns], atol=1e-12, rtol=1e-12)
        assert "target: value 10 is out of range [0, 10)" in results[rank]["error"]
