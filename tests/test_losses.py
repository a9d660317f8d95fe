"""The fused loss family against torch and the float64 reference, on every backend here
("triton" joins under TRITON_INTERPRET=1)."""

import math

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast.loss_options import LossOptions
from ncfast.reference import losses as reference
from tolerances import LOSS

BACKENDS = ncfast.available_backends()
# The Triton interpreter is slow: it gets the small shapes only.
BIG_K_BACKENDS = [b for b in BACKENDS if b != "triton"]

SHAPES = [(1, 1), (3, 2), (5, 7), (17, 131), (4, 1000)]


def close(actual, expected, dtype):
    tol = LOSS[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True)


def loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def make_inputs(n, k, dtype, scale=3.0, ignore=False):
    logits = (torch.randn(n, k, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, k, (n,))
    if ignore and n > 1:
        target[::3] = -100
    return logits, target


def reference_fn(loss):
    """The float64 reference of a public loss, reduced as torch does."""

    def fn(logits, target, weight=None, ignore_index=-100, reduction="mean", **params):
        if loss == "cross_entropy":
            rows = reference.cross_entropy_rows(logits, target, weight, ignore_index, params.get("label_smoothing", 0.0))
        elif loss == "focal":
            alpha = params.get("alpha")
            rows = reference.focal_rows(logits, target, params.get("gamma", 2.0), alpha, weight, ignore_index)
        else:
            rows = reference.rescaled_mse_rows(logits, target, params.get("kappa", 1.0), params.get("beta", 1.0),
                                               weight, ignore_index)
        return reference.reduce(rows, target, weight, ignore_index, reduction)

    return fn


PUBLIC = {"cross_entropy": ncfast.cross_entropy, "focal": ncfast.focal_loss, "rescaled_mse": ncfast.rescaled_mse}
PARAMS = {
    "cross_entropy": [{}, {"label_smoothing": 0.1}],
    "focal": [{"gamma": 0.0}, {"gamma": 0.5}, {"gamma": 2.0}, {"gamma": 3.0, "alpha": "tensor"}],
    "rescaled_mse": [{}, {"kappa": 1.0, "beta": 15.0}, {"kappa": 3.0, "beta": 2.0}],
}


def with_alpha(params, k):
    params = dict(params)
    if params.get("alpha") == "tensor":
        params["alpha"] = torch.linspace(0.25, 1.0, k, dtype=torch.float64)
    return params


# ---------------------------------------------------------------------------- drop-in for torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_torch(backend, shape, reduction, label_smoothing, weighted, dtype):
    n, k = shape
    logits, target = make_inputs(n, k, dtype, ignore=True)
    weight = torch.rand(k, dtype=dtype) + 0.1 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    with ncfast.use_backend(backend):
        loss, grad = loss_and_grad(ncfast.cross_entropy, logits, target, **kwargs)
    weight64 = None if weight is None else weight.double()
    expected, expected_grad = loss_and_grad(F.cross_entropy, logits.double(), target,
                                            **dict(kwargs, weight=weight64))
    assert loss.dtype == dtype and grad.dtype == dtype
    close(loss, expected, dtype)
    close(grad, expected_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
def test_low_precision_against_float64(backend, dtype, loss):
    logits, target = make_inputs(9, 130, dtype, ignore=True)
    for params in PARAMS[loss]:
        params = with_alpha(params, 130)
        with ncfast.use_backend(backend):
            value, grad = loss_and_grad(PUBLIC[loss], logits, target, **params)
        expected, expected_grad = loss_and_grad(reference_fn(loss), logits.double(), target, **params)
        assert value.dtype == dtype and grad.dtype == dtype
        tol = LOSS[dtype]
        torch.testing.assert_close(value.double(), expected, atol=tol * max(1.0, expected.abs().item()), rtol=tol)
        torch.testing.assert_close(grad.double(), expected_grad, atol=tol * expected_grad.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["focal", "rescaled_mse"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_float64_reference(backend, loss, shape, reduction, weighted, dtype):
    n, k = shape
    logits, target = make_inputs(n, k, dtype, ignore=True)
    weight = torch.rand(k, dtype=torch.float64) + 0.1 if weighted else None
    for params in PARAMS[loss]:
        params = with_alpha(params, k)
        with ncfast.use_backend(backend):
            value, grad = loss_and_grad(PUBLIC[loss], logits, target, weight=weight, reduction=reduction, **params)
        expected, expected_grad = loss_and_grad(reference_fn(loss), logits.double(), target, weight=weight,
                                                reduction=reduction, **params)
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        tol = LOSS[dtype]
        torch.testing.assert_close(value.double(), expected, atol=tol * scale, rtol=tol)
        torch.testing.assert_close(grad.double(), expected_grad, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(loss, reduction):
    logits, target = make_inputs(6, 5, torch.float64, ignore=True)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    for backend in BACKENDS:
        for params in PARAMS[loss]:
            params = with_alpha(params, 5)
            with ncfast.use_backend(backend):
                assert torch.autograd.gradcheck(
                    lambda z: PUBLIC[loss](z, target, weight=weight, reduction=reduction, **params),
                    (logits.clone().requires_grad_(True),),
                )


# ---------------------------------------------------------------------------- awkward shapes
@pytest.mark.parametrize("backend", BIG_K_BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
def test_many_classes(backend, loss):
    logits, target = make_inputs(3, 131072, torch.float32)
    with ncfast.use_backend(backend):
        value, grad = loss_and_grad(PUBLIC[loss], logits, target, reduction="none")
    expected, expected_grad = loss_and_grad(reference_fn(loss), logits.double(), target, reduction="none")
    # fp32 sums of 131072 terms: relative rounding of a few 1e-5 depending on the summation order.
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 7, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64)
    with ncfast.use_backend(backend):
        for reduction in ["mean", "sum", "none"]:
            value = ncfast.cross_entropy(logits, target, reduction=reduction)
            expected = F.cross_entropy(logits, target, reduction=reduction)
            torch.testing.assert_close(value, expected, equal_nan=True)
            (grad,) = torch.autograd.grad(value.sum(), logits)
            assert grad.shape == (0, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_spatial_shapes(backend):
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 3, 4))
    target[0, 1, 2] = -100
    with ncfast.use_backend(backend):
        for reduction in ["mean", "none"]:
            value, grad = loss_and_grad(ncfast.cross_entropy, logits, target, reduction=reduction, label_smoothing=0.2)
            expected, expected_grad = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction,
                                                    label_smoothing=0.2)
            assert value.shape == expected.shape
            close(value, expected, torch.float64)
            close(grad, expected_grad, torch.float64)
        single = logits[0, :, 0, 0]
        close(ncfast.cross_entropy(single, target[0, 0, 0]), F.cross_entropy(single, target[0, 0, 0]), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "column_strided", "transposed"])
def test_non_contiguous(backend, layout):
    base = torch.randn(40, 60)
    logits = {"row_strided": base[:7, 3:50], "column_strided": base[:7, ::2], "transposed": base[:47, :7].t()}[layout]
    target = torch.randint(0, logits.shape[1], (logits.shape[0],))
    with ncfast.use_backend(backend):
        value, grad = loss_and_grad(ncfast.focal_loss, logits, target, gamma=2.0)
    expected, expected_grad = loss_and_grad(reference_fn("focal"), logits.double(), target, gamma=2.0)
    close(value, expected, torch.float32)
    close(grad, expected_grad, torch.float32)


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_logits_stay_finite(backend, dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, 0.0]], dtype=torch.float64)
    target = torch.tensor([3, 1])
    for loss in ["cross_entropy", "focal"]:
        with ncfast.use_backend(backend):
            value, grad = loss_and_grad(PUBLIC[loss], logits.to(dtype), target, reduction="none")
        expected, expected_grad = loss_and_grad(reference_fn(loss), logits.to(dtype).double(), target, reduction="none")
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), expected, rtol=LOSS[dtype], atol=0)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=LOSS[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("margin", [5.0, 20.0, 60.0, 1000.0])
def test_focal_confident_rows(backend, gamma, margin):
    """p_y -> 1: finite for every γ, matching the float64 reference (and 0 in the limit)."""
    logits = torch.zeros(3, 10, dtype=torch.float64)
    target = torch.tensor([0, 4, 9])
    logits[torch.arange(3), target] = margin
    for dtype in [torch.float32, torch.float64]:
        with ncfast.use_backend(backend):
            value, grad = loss_and_grad(ncfast.focal_loss, logits.to(dtype), target, gamma=gamma, reduction="none")
        expected, expected_grad = loss_and_grad(reference_fn("focal"), logits, target, gamma=gamma, reduction="none")
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        tol = LOSS[dtype]
        torch.testing.assert_close(value.double(), expected, rtol=tol, atol=tol * 1e-3)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_gamma_zero_is_cross_entropy(backend):
    logits, target = make_inputs(11, 37, torch.float32, ignore=True)
    with ncfast.use_backend(backend):
        focal, focal_grad = loss_and_grad(ncfast.focal_loss, logits, target, gamma=0.0)
        ce, ce_grad = loss_and_grad(ncfast.cross_entropy, logits, target)
    torch.testing.assert_close(focal, ce, rtol=1e-7, atol=0)
    torch.testing.assert_close(focal_grad, ce_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_masked_logits(backend):
    """NaN/+inf in a row makes that row NaN (as torch); -inf logits are masked classes."""
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, :3] = float("-inf")
    target = torch.tensor([0, 1, 2, 4])
    with ncfast.use_backend(backend):
        value, grad = loss_and_grad(ncfast.cross_entropy, logits, target, reduction="none")
    expected, expected_grad = loss_and_grad(F.cross_entropy, logits, target, reduction="none")
    assert torch.isnan(value[1:3]).all() and torch.isnan(grad[1:3]).all()
    torch.testing.assert_close(value[[0, 3]], expected[[0, 3]])
    torch.testing.assert_close(grad[[0, 3]], expected_grad[[0, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
def test_deterministic(backend, loss):
    logits, target = make_inputs(64, 3001, torch.float32) if backend != "triton" else make_inputs(8, 300, torch.float32)
    with ncfast.use_backend(backend):
        first = loss_and_grad(PUBLIC[loss], logits, target)
        second = loss_and_grad(PUBLIC[loss], logits, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_thread_count_does_not_change_bits():
    logits, target = make_inputs(256, 2049, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = loss_and_grad(ncfast.cross_entropy, logits, target, label_smoothing=0.1)
        torch.set_num_threads(2)
        parallel = loss_and_grad(ncfast.cross_entropy, logits, target, label_smoothing=0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


# ---------------------------------------------------------------------------- in-place gradient
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "rescaled_mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(backend, loss, reduction):
    logits, target = make_inputs(9, 33, torch.float32, ignore=True)
    with ncfast.use_backend(backend):
        expected, expected_grad = loss_and_grad(PUBLIC[loss], logits, target, reduction=reduction)
        x = logits.clone().requires_grad_(True)
        value = PUBLIC[loss](x, target, reduction=reduction, inplace_backward=True)
        value.sum().backward()
    torch.testing.assert_close(value.detach(), expected)
    torch.testing.assert_close(x.grad, expected_grad)
    torch.testing.assert_close(x.detach(), expected_grad)  # the storage holds the gradient
    assert x.grad.data_ptr() == x.data_ptr()  # and .grad is that storage, not a copy of it


def test_inplace_backward_refuses_to_corrupt_saved_tensors():
    """Liger #272: logits that another op saved for its backward must not be silently reused."""
    logits, target = make_inputs(4, 9, torch.float32)
    x = logits.clone().requires_grad_(True)
    probs_like = torch.sigmoid(x)  # sigmoid saves its output for backward
    loss = ncfast.cross_entropy(probs_like, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_can_run_twice():
    logits, target = make_inputs(5, 8, torch.float64)
    x = logits.clone().requires_grad_(True)
    loss = ncfast.cross_entropy(x, target, reduction="none")
    (first,) = torch.autograd.grad(loss, x, torch.ones(5, dtype=torch.float64) * 2, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.ones(5, dtype=torch.float64) * 2)
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------- torch integration
def test_modules_match_torch_and_functional():
    logits, target = make_inputs(12, 10, torch.float64, ignore=True)
    weight = torch.rand(10, dtype=torch.float64) + 0.1
    ours = ncfast.CrossEntropyLoss(weight=weight, label_smoothing=0.05, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.05, reduction="sum")
    close(ours(logits, target), theirs(logits, target), torch.float64)
    assert "weight" in ours.state_dict()
    focal = ncfast.FocalLoss(gamma=3.0, alpha=[0.5] * 10)
    close(focal(logits, target), ncfast.focal_loss(logits, target, gamma=3.0, alpha=0.5), torch.float64)
    mse = ncfast.RescaledMSELoss(kappa=1.0, beta=15.0, reduction="none")
    close(mse(logits, target), ncfast.rescaled_mse(logits, target, kappa=1.0, beta=15.0, reduction="none"),
          torch.float64)


def test_opcheck():
    # The ops take (B, K, S) logits and (B, S) targets: rows (S = 1) and a class-strided layout.
    logits, target = make_inputs(6, 11, torch.float64, ignore=True)
    strided = (logits.reshape(2, 3, 11).transpose(1, 2), target.reshape(2, 3))
    weight = torch.rand(11, dtype=torch.float64)
    for z, t in [(logits[:, :, None], target[:, None]), strided]:
        for op in [torch.ops.ncfast.fused_loss.default, torch.ops.ncfast.fused_loss_.default]:
            for loss in ["cross_entropy", "focal", "rescaled_mse"]:
                for reduction in ["mean", "none"]:
                    options = LossOptions(loss, label_smoothing=0.1 if loss == "cross_entropy" else 0.0, gamma=2.0,
                                          kappa=1.0, beta=15.0, reduction=reduction)
                    torch.library.opcheck(op, (z.clone(), t, weight, None, *options))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_torch_compile_fullgraph(inplace_backward):
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 13).double()
    criterion = ncfast.FocalLoss(gamma=2.0, inplace_backward=inplace_backward)
    features = torch.randn(10, 6, dtype=torch.float64)
    target = torch.randint(0, 13, (10,))

    def step(h, y):
        return criterion(model(h), y)

    compiled = torch.compile(step, fullgraph=True)
    compiled(features, target).backward()
    compiled_grad = model.weight.grad.clone()
    model.zero_grad()
    step(features, target).backward()
    torch.testing.assert_close(compiled_grad, model.weight.grad)


# ---------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    ("target", dict(target=torch.tensor([0, 7, 1])), ValueError, "target: value 7 at index 1"),
    ("target", dict(target=torch.tensor([0, -1, 1])), ValueError, "target: value -1"),
    ("target", dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target: expected integer class indices of shape"),
    ("target", dict(target=torch.tensor([True, False, True])), TypeError, "target: expected integer"),
    ("target", dict(target=torch.tensor([0, 1])), ValueError, "target: expected shape"),
    ("target", dict(target=torch.tensor([0, 1, 2], device="meta")), ValueError, "target: is on meta"),
    ("logits", dict(logits=torch.ones(3, 7, dtype=torch.int64)), TypeError, "logits: expected float32"),
    ("logits", dict(logits=torch.ones(3, 0)), ValueError, "logits: the class dimension is empty"),
    ("weight", dict(weight=torch.ones(6)), ValueError, "weight: expected shape"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction: expected one of"),
    ("ignore_index", dict(ignore_index=1.5), TypeError, "ignore_index: expected an int"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("argument, change, error, message", BAD_INPUTS, ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(backend, argument, change, error, message):
    kwargs = dict(logits=torch.randn(3, 7), target=torch.tensor([0, 1, 2]))
    kwargs.update(change)
    with ncfast.use_backend(backend), pytest.raises(error, match=message):
        ncfast.cross_entropy(**kwargs)


@pytest.mark.parametrize(
    "fn, kwargs, message",
    [
        (ncfast.cross_entropy, dict(label_smoothing=1.01), "label_smoothing"),
        (ncfast.cross_entropy, dict(label_smoothing=-0.1), "label_smoothing"),
        (ncfast.cross_entropy, dict(label_smoothing=math.nan), "label_smoothing"),
        (ncfast.focal_loss, dict(gamma=-1.0), "gamma"),
        (ncfast.focal_loss, dict(gamma=math.inf), "gamma"),
        (ncfast.focal_loss, dict(alpha=torch.ones(3)), "alpha: expected shape"),
        (ncfast.rescaled_mse, dict(kappa=0.0), "kappa"),
        (ncfast.rescaled_mse, dict(beta=math.nan), "beta"),
    ],
)
def test_bad_hyperparameters(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(torch.randn(3, 7), torch.tensor([0, 1, 2]), **kwargs)


def test_cpp_kernel_checks_targets_itself():
    """The C++ entry points never read through an out-of-range target, even if called directly."""
    from ncfast import _C

    logits, target = torch.randn(2, 4), torch.tensor([0, 4])
    grad, rows = torch.empty(2, 4), torch.empty(2)
    with pytest.raises(ValueError, match="target: value 4 at index 1"):
        _C.loss_forward(logits.data_ptr(), 2, 4, 1, 4, 1, 0, target.data_ptr(), 1, 0, grad.data_ptr(), 4, 1, 0,
                        rows.data_ptr(), 0, 0, "float32", 0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0, 0, -100, True, 1)
    # (B, K, S) = (2, 4, 3) class-strided: the position is reported as b·S + s.
    strided, strided_target = torch.randn(2, 4, 3), torch.tensor([[0, 1, 2], [3, -100, -7]])
    grad, rows = torch.empty(2, 4, 3), torch.empty(6)
    with pytest.raises(ValueError, match="target: value -7 at index 5"):
        _C.loss_forward(strided.data_ptr(), 2, 4, 3, 12, 3, 1, strided_target.data_ptr(), 3, 1, grad.data_ptr(), 12, 3,
                        1, rows.data_ptr(), 0, 0, "float32", 0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0, 0, -100, True, 1)
    target = target.numpy()
    common = dict(dtype="float32", kind=0, label_smoothing=0.0, class_weight=None, ignore_index=-100)
    with pytest.raises(ValueError, match="target: value 4 at index 1"):
        _C.loss_row_stats(logits.numpy(), target, torch.empty(2, 5).numpy(), softcap=0.0, vocab_start=0,
                          total_classes=4, num_threads=1, **common)
    with pytest.raises(ValueError, match="vocab_start"):
        _C.loss_row_stats(logits.numpy(), torch.tensor([0, 1]).numpy(), torch.empty(2, 5).numpy(), softcap=0.0,
                          vocab_start=2, total_classes=5, num_threads=1, **common)


# ---------------------------------------------------------------------------- cross-entropy extras


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("extras", [dict(lse_square_scale=1e-2), dict(softcap=2.5),
                                    dict(lse_square_scale=1e-3, softcap=4.0, label_smoothing=0.1)])
def test_z_loss_and_softcap(backend, dtype, reduction, extras):
    logits, target = make_inputs(13, 67, dtype, scale=4.0, ignore=True)
    weight = torch.rand(67, dtype=torch.float64) + 0.2
    with ncfast.use_backend(backend):
        value, grad = loss_and_grad(ncfast.cross_entropy, logits, target, weight=weight, reduction=reduction, **extras)
        for inplace in [True]:
            inplace_value, inplace_grad = loss_and_grad(
                lambda z, *a, **k: ncfast.cross_entropy(z.clone(), *a, inplace_backward=inplace, **k),
                logits, target, weight=weight, reduction=reduction, **extras)
    reference_params = {"lse_square_scale": 0.0, "softcap": 0.0, "label_smoothing": 0.0, **extras}

    def expected_fn(z, t, weight, reduction):
        rows = reference.cross_entropy_rows(z, t, weight, -100, **reference_params)
        return reference.reduce(rows, t, weight, -100, reduction)

    expected, expected_grad = loss_and_grad(expected_fn, logits.double(), target, weight=weight, reduction=reduction)
    close(value, expected, dtype)
    close(grad, expected_grad, dtype)
    close(inplace_value, expected, dtype)
    close(inplace_grad, expected_grad, dtype)


@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss", "rescaled_mse"])
def test_every_integer_target_dtype_gives_the_same_bits(name):
    # (N, K) logits with int64 targets take a shorter path than other integer dtypes and other
    # ranks; the dtypes must agree bit for bit (the kernel reads int64 either way), the
    # (N, K, 1) layout to rounding, and cross-entropy with torch.
    logits, target = make_inputs(11, 9, torch.float32, ignore=True)
    fn = getattr(ncfast, name)
    results = {}
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        x = logits.clone().requires_grad_(True)
        y = target.clamp(min=0).to(dtype) if dtype == torch.uint8 else target.to(dtype)  # uint8 has no -100
        fn(x, y).backward()
        results[dtype] = (fn(logits, y), x.grad)
        # the same rows as (N, K, 1) logits and (N, 1) targets: the general path
        x3 = logits[:, :, None].clone().requires_grad_(True)
        fn(x3, y[:, None]).backward()
        torch.testing.assert_close(fn(logits[:, :, None], y[:, None]), results[dtype][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x3.grad[:, :, 0], results[dtype][1], rtol=1e-6, atol=1e-7)
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(results[dtype][0], results[torch.int64][0])
        assert torch.equal(results[dtype][1], results[torch.int64][1])
    if name == "cross_entropy":
        close(results[torch.uint8][0], F.cross_entropy(logits.double(), target.clamp(min=0)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse(backend):
    logits, target = make_inputs(7, 50, torch.float32, ignore=True)
    with ncfast.use_backend(backend):
        value, lse = ncfast.cross_entropy(logits, target, return_lse=True, softcap=3.0)
    expected = torch.logsumexp(reference.capped(logits.double(), 3.0), dim=1)
    keep = target != -100
    torch.testing.assert_close(lse[keep].double(), expected[keep], rtol=1e-6, atol=1e-6)
    assert (lse[~keep] == 0).all() and not lse.requires_grad


def _vocab_parallel_worker(rank, world, port, backend, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        logits, target = make_inputs(9, 12 * world, torch.float32, ignore=True)
        weight = torch.rand(12 * world, dtype=torch.float64) + 0.2
        local = logits[:, rank * 12:(rank + 1) * 12].clone().requires_grad_(True)
        out = {}
        with ncfast.use_backend(backend):
            for name, kwargs in {"plain": {}, "extras": dict(label_smoothing=0.1, weight=weight, lse_square_scale=1e-2,
                                                             softcap=3.0)}.items():
                value, lse = ncfast.cross_entropy(local, target, process_group=dist.group.WORLD, return_lse=True,
                                                  reduction="none", **kwargs)
                (grad,) = torch.autograd.grad(value.sum(), local)
                out[name] = (value.detach(), lse, grad)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_matches_single_process(backend):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_vocab_parallel_worker, args=(world, port, backend, results), nprocs=world, join=True)
    torch.manual_seed(0)
    logits, target = make_inputs(9, 12 * world, torch.float32, ignore=True)
    weight = torch.rand(12 * world, dtype=torch.float64) + 0.2
    for name, kwargs in {"plain": {}, "extras": dict(label_smoothing=0.1, weight=weight, lse_square_scale=1e-2,
                                                     softcap=3.0)}.items():
        with ncfast.use_backend(backend):
            x = logits.clone().requires_grad_(True)
            value, lse = ncfast.cross_entropy(x, target, return_lse=True, reduction="none", **kwargs)
            (grad,) = torch.autograd.grad(value.sum(), x)
        for rank in range(world):
            rank_value, rank_lse, rank_grad = results[rank][name]
            torch.testing.assert_close(rank_value, value.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(rank_lse, lse, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(rank_grad, grad[:, rank * 12:(rank + 1) * 12], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["fused_loss", "fused_loss_"])
def test_ops_called_directly_check_every_size(op):
    # The kernels read by address: a direct op call with a short target or class vector must
    # raise, not read past the end.
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    fn = getattr(torch.ops.ncfast, op)
    cases = [(target, torch.ones(2), None, "weight"), (target[:2], None, None, "target"),
             (target, None, torch.ones(1), "alpha")]
    for t, weight, alpha, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(logits.clone(), t, weight, alpha, *LossOptions())
