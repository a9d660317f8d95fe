"""torch's autograd contract for the fused losses: second derivatives (gradient penalties,
gradgradcheck), torch.func transforms, and the modes that cannot give them raising."""

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast.reference import linear as reference_linear
from ncfast.reference import losses as reference

BACKENDS = ncfast.available_backends()
LOSSES = {
    "cross_entropy": (ncfast.cross_entropy, dict(label_smoothing=0.1)),
    "cross_entropy_z_softcap": (ncfast.cross_entropy, dict(lse_square_scale=0.01, softcap=3.0)),
    "focal": (ncfast.focal_loss, dict(gamma=2.0, alpha=0.75)),
    "rescaled_mse": (ncfast.rescaled_mse, dict(kappa=2.0, beta=3.0)),
}


def reference_loss(name, logits, target, weight=None, reduction="mean", **kwargs):
    """The float64 formula written in torch ops: its autograd gives the true derivatives."""
    if name.startswith("cross_entropy"):
        rows = reference.cross_entropy_rows(logits, target, weight, -100, kwargs.get("label_smoothing", 0.0),
                                            kwargs.get("lse_square_scale", 0.0), kwargs.get("softcap") or 0.0)
    elif name == "focal":
        alpha = torch.full((logits.shape[1],), kwargs["alpha"], dtype=logits.dtype)
        rows = reference.focal_rows(logits, target, kwargs["gamma"], alpha, weight, -100)
    else:
        rows = reference.rescaled_mse_rows(logits, target, kwargs["kappa"], kwargs["beta"], weight, -100)
    return reference.reduce(rows, target, weight, -100, reduction)


def problem(n=6, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, dtype=torch.float64, generator=generator) * 2
    target = torch.randint(0, k, (n,), generator=generator)
    target[1] = -100
    weight = torch.rand(k, dtype=torch.float64, generator=generator) + 0.5
    return logits, target, weight


def penalised_grad(fn, logits, v, **kwargs):
    """x.grad of loss + ⟨∂loss/∂x, v⟩: needs the Hessian of the loss (gradient penalty)."""
    x = logits.clone().requires_grad_(True)
    loss = fn(x, **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    (loss.sum() + (g * v).sum()).backward()
    return x.grad


# ---------------------------------------------------------------------------- second derivatives
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_penalty_matches_torch(backend, name, reduction):
    fn, kwargs = LOSSES[name]
    logits, target, weight = problem()
    v = torch.randn_like(logits)
    with ncfast.use_backend(backend):
        got = penalised_grad(lambda x: fn(x, target, weight=weight, reduction=reduction, **kwargs), logits, v)
    want = penalised_grad(lambda x: reference_loss(name, x, target, weight, reduction, **kwargs), logits, v)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradgradcheck(backend, name):
    fn, kwargs = LOSSES[name]
    logits, target, weight = problem(n=4, k=3)
    x = logits.requires_grad_(True)
    with ncfast.use_backend(backend):
        for reduction in ["mean", "none"]:
            assert torch.autograd.gradgradcheck(lambda z: fn(z, target, weight=weight, reduction=reduction, **kwargs),
                                                (x,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
def test_linear_gradient_penalty_matches_torch(loss, reduction):
    fn = {"cross_entropy": ncfast.linear_cross_entropy, "focal": ncfast.linear_focal_loss,
          "rescaled_mse": ncfast.linear_rescaled_mse}[loss]
    generator = torch.Generator().manual_seed(1)
    h, w, b = (torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in [(7, 4), (5, 4), (5,)])
    target = torch.randint(0, 5, (7,), generator=generator)
    v = [torch.randn_like(t) for t in (h, w, b)]

    def penalised(f):
        leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
        loss_value = f(*leaves).sum()
        grads = torch.autograd.grad(loss_value, leaves, create_graph=True)
        (loss_value + sum((g * u).sum() for g, u in zip(grads, v))).backward()
        return [leaf.grad for leaf in leaves]

    got = penalised(lambda *p: fn(*p, target, reduction=reduction, chunk_memory=3 * 5 * 8))
    want = penalised(lambda *p: reference_linear.linear_loss(*p, target, loss=loss, reduction=reduction))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    assert torch.autograd.gradgradcheck(lambda *p: fn(*p, target, reduction=reduction), leaves)


def test_first_order_keeps_the_stored_gradient():
    """Without create_graph the backward returns the forward's gradient buffer itself."""
    logits, target, _ = problem()
    x = logits.clone().requires_grad_(True)
    ncfast.cross_entropy(x, target).backward()
    expected = torch.func.grad(lambda z: reference_loss("cross_entropy", z, target))(logits)
    torch.testing.assert_close(x.grad, expected, atol=1e-12, rtol=1e-12)


def test_inplace_backward_refuses_create_graph():
    logits, target, _ = problem()
    x = logits.clone().requires_grad_(True)
    loss = ncfast.cross_entropy(x * 1, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True.*second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_create_graph_does_not_warn(recwarn):
    logits, target, _ = problem()
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ncfast.cross_entropy(x, target), x, create_graph=True)
    g.sum().backward()
    assert not [w for w in recwarn if "ncfast" in str(w.filename) or "autograd" in str(w.message)]


# ---------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_transforms(backend, name):
    fn, kwargs = LOSSES[name]
    logits, target, weight = problem(n=4, k=3)
    ours = lambda z: fn(z, target, weight=weight, **kwargs)  # noqa: E731
    theirs = lambda z: reference_loss(name, z, target, weight, **kwargs)  # noqa: E731
    tangent = torch.randn_like(logits)
    with ncfast.use_backend(backend):
        results = [torch.func.grad(ours)(logits), torch.func.jacrev(ours)(logits), torch.func.hessian(ours)(logits),
                   torch.func.jvp(ours, (logits,), (tangent,))[1],
                   torch.func.vmap(lambda z: ours(z))(torch.stack([logits, logits * 0.5]))]
    expected = [torch.func.grad(theirs)(logits), torch.func.jacrev(theirs)(logits), torch.func.hessian(theirs)(logits),
                torch.func.jvp(theirs, (logits,), (tangent,))[1],
                torch.func.vmap(theirs)(torch.stack([logits, logits * 0.5]))]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_vmap_of_grad_per_sample():
    """Per-sample gradients, the common vmap(grad) idiom."""
    logits, target, _ = problem(n=5, k=4)
    target[1] = 2
    per_sample = torch.func.vmap(torch.func.grad(lambda z, t: ncfast.cross_entropy(z, t)))(logits, target)
    expected = torch.func.vmap(torch.func.grad(lambda z, t: F.cross_entropy(z, t)))(logits, target)
    torch.testing.assert_close(per_sample, expected, atol=1e-12, rtol=1e-12)


def test_linear_torch_func_grad():
    generator = torch.Generator().manual_seed(2)
    h, w = torch.randn(6, 3, dtype=torch.float64, generator=generator), torch.randn(4, 3, dtype=torch.float64)
    target = torch.randint(0, 4, (6,), generator=generator)
    got = torch.func.grad(lambda weight: ncfast.linear_cross_entropy(h, weight, None, target))(w)
    want = torch.func.grad(lambda weight: F.cross_entropy(h @ weight.T, target))(w)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    hessian = torch.func.hessian(lambda weight: ncfast.linear_cross_entropy(h, weight, None, target))(w)
    torch.testing.assert_close(hessian, torch.func.hessian(lambda weight: F.cross_entropy(h @ weight.T, target))(w),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_fast_path_equals_the_op(backend, reduction):
    """Eager calls skip the custom-op dispatcher (and write the lse only when it is asked for);
    the op (torch.compile's route) and the torch.func route give the same bits: loss, lse and
    gradient."""
    logits, target, weight = problem(n=9, k=7)
    logits = logits.float()
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction=reduction)
    options, _ = ncfast.loss_options.loss_options("cross_entropy", 7, logits.device, label_smoothing=0.1,
                                                  reduction=reduction)
    with ncfast.use_backend(backend):
        eager = ncfast.cross_entropy(logits, target, **kwargs)
        eager_with_lse, eager_lse = ncfast.cross_entropy(logits, target, return_lse=True, **kwargs)
        x = logits.clone().requires_grad_(True)
        ncfast.cross_entropy(x, target, **kwargs).sum().backward()
        value, grad, lse = torch.ops.ncfast.fused_loss(logits, target, weight, None, *options)
        func_grad = torch.func.grad(lambda z: ncfast.cross_entropy(z, target, **kwargs).sum())(logits)
    assert torch.equal(eager, value) and torch.equal(eager_with_lse, value) and torch.equal(eager_lse, lse)
    assert torch.equal(x.grad, grad)
    torch.testing.assert_close(func_grad, grad, atol=1e-6, rtol=1e-6)  # recomputed in torch ops
