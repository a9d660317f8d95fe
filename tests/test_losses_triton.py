"""The Triton loss kernel (``triton_kernels/losses.py``) against the float64 reference and the
C++ kernel.

CPU tests run the kernel under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` set
before triton is imported (``conftest.py`` does so on a machine without a GPU; this module sets
nothing). Tests marked ``gpu`` run the compiled kernel on a CUDA device. Both paths of a row
are covered: kept in registers (one read) and, with ``MAX_BLOCK`` lowered, read in two sweeps;
the tiles of several short rows and of class-strided layouts are tested in
``test_losses_triton_tiles.py``.
"""

import os

import pytest
import torch

import ncfast
from ncfast.losses import LOSSES
from ncfast.reference import losses as reference
from tolerances import BACKEND_AGREEMENT, TRITON_LOSS

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("ncfast.triton_kernels.losses")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import",
                allow_module_level=True)
interpreted = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1")
compiled = pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors only")


PUBLIC = {"cross_entropy": ncfast.cross_entropy, "focal": ncfast.focal_loss, "rescaled_mse": ncfast.rescaled_mse}
# Every option of each loss at once: class weights, label smoothing (weighted: per-column
# weights), focal α_t, a non-default κ, β.
OPTIONS = {
    "cross_entropy": {"label_smoothing": 0.1},
    "focal": {"gamma": 2.0, "alpha": "tensor"},
    "rescaled_mse": {"kappa": 3.0, "beta": 2.0},
}
PATHS = ["one_sweep", "two_sweep"]


@pytest.fixture
def path(request, monkeypatch):
    """Lowers ``MAX_BLOCK`` to a quarter of the row for the two-sweep path (3 to 5 blocks, the
    last one partial)."""

    def apply(num_classes):
        if request.param == "two_sweep":
            monkeypatch.setattr(kernels, "MAX_BLOCK", max(1, triton.next_power_of_2(num_classes) // 4))

    return apply


def make_inputs(n, k, dtype, scale=3.0, ignore=True, device="cpu"):
    logits = (torch.randn(n, k, dtype=torch.float64) * scale).to(device, dtype)
    target = torch.randint(0, k, (n,), device=device)
    if ignore and n > 2:
        target[1::3] = -100
    return logits, target


def options_for(loss, k, weighted=True, **extra):
    opts = dict(OPTIONS[loss], **extra)
    if opts.get("alpha") == "tensor":
        opts["alpha"] = torch.linspace(0.25, 1.0, k, dtype=torch.float64)
    if weighted:
        opts["weight"] = torch.rand(k, dtype=torch.float64) + 0.5
    return opts


def on(device, opts):
    return {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in opts.items()}


def loss_and_grad(loss, logits, target, backend=None, reduction="mean", inplace=False, **opts):
    x = logits.detach().clone().requires_grad_(True)
    opts = on(logits.device, opts)
    if backend is None:
        value = PUBLIC[loss](x, target, reduction=reduction, inplace_backward=inplace, **opts)
    else:
        with ncfast.use_backend(backend):
            value = PUBLIC[loss](x, target, reduction=reduction, inplace_backward=inplace, **opts)
    value.sum().backward()
    return value.detach(), x.grad


def reference_loss_and_grad(loss, logits, target, reduction="mean", weight=None, ignore_index=-100, **opts):
    """The float64 reference (``ncfast.reference.losses``), gradients by autograd."""
    x = logits.detach().double().requires_grad_(True)
    weight = None if weight is None else weight.to(x.device, torch.float64)
    if loss == "cross_entropy":
        rows = reference.cross_entropy_rows(x, target, weight, ignore_index, opts.get("label_smoothing", 0.0))
    elif loss == "focal":
        alpha = opts.get("alpha")
        alpha = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float64).to(x.device).expand(x.shape[1])
        rows = reference.focal_rows(x, target, opts.get("gamma", 2.0), alpha, weight, ignore_index)
    else:
        rows = reference.rescaled_mse_rows(x, target, opts.get("kappa", 1.0), opts.get("beta", 1.0), weight,
                                           ignore_index)
    value = reference.reduce(rows, target, weight, ignore_index, reduction)
    value.sum().backward()
    return value.detach(), x.grad


def assert_near(actual, expected, dtype):
    atol, rtol = TRITON_LOSS[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)


def assert_near_cpp(actual, expected, dtype):
    tol = BACKEND_AGREEMENT[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True)


def kernel_forward(logits, target, loss="cross_entropy", weight=None, alpha=None, grad=None, mean=False,
                   ignore_index=-100, lse=None, **params):
    """The kernel called directly, below the API's checks."""
    params = {"label_smoothing": 0.0, "gamma": 0.0, "kappa": 1.0, "beta": 0.0, **params}
    grad = torch.empty_like(logits) if grad is None else grad
    rows, total = kernels.loss_forward(logits, target, weight, alpha, grad, LOSSES.index(loss), params,
                                       ignore_index, mean, lse)
    return rows, total, grad


# ---------------------------------------------------------------------------- float64 reference, C++
# (K, path): a single column is one block whatever the cap.
SIZES_AND_PATHS = [(1, "one_sweep")] + [(k, p) for k in (2, 5, 130, 2100) for p in PATHS]


@interpreted
@pytest.mark.parametrize("num_classes, path", SIZES_AND_PATHS, indirect=["path"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_float64_reference_and_cpp(loss, num_classes, reduction, path):
    """Loss and gradient within 1e-4 of float64 at K ∈ {1, 2, 5, 130, 2100}, fp32."""
    path(num_classes)
    logits, target = make_inputs(8 if num_classes > 100 else 7, num_classes, torch.float32,
                                 scale=1.0 if loss == "rescaled_mse" else 3.0)
    opts = options_for(loss, num_classes)
    value, grad = loss_and_grad(loss, logits, target, "triton", reduction, **opts)
    expected, expected_grad = reference_loss_and_grad(loss, logits, target, reduction, **opts)
    assert_near(value, expected, torch.float32)
    assert_near(grad, expected_grad, torch.float32)
    cpp_value, cpp_grad = loss_and_grad(loss, logits, target, "cpp", reduction, **opts)
    assert_near_cpp(value, cpp_value, torch.float32)
    assert_near_cpp(grad, cpp_grad, torch.float32)


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_dtypes(loss, dtype, path):
    """fp32 accumulation for 16-bit logits (fp64 for fp64); the gradient in the logits' dtype."""
    path(130)
    logits, target = make_inputs(6, 130, dtype, scale=1.0 if loss == "rescaled_mse" else 3.0)
    opts = options_for(loss, 130)
    value, grad = loss_and_grad(loss, logits, target, "triton", "none", **opts)
    assert value.dtype == dtype and grad.dtype == dtype
    expected, expected_grad = reference_loss_and_grad(loss, logits, target, "none", **opts)
    assert_near(value, expected, dtype)
    assert_near(grad, expected_grad, dtype)
    cpp_value, cpp_grad = loss_and_grad(loss, logits, target, "cpp", "none", **opts)
    assert_near_cpp(value, cpp_value, dtype)
    assert_near_cpp(grad, cpp_grad, dtype)


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("alpha", [None, 0.25, "tensor"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gamma_alpha_and_confident_rows(gamma, alpha, path):
    """Rows with p_y -> 1 (margins up to 60, where 1 - p_y underflows fp32) stay exact."""
    path(9)
    logits, target = make_inputs(6, 9, torch.float32, ignore=False)
    for i, margin in enumerate([5.0, 20.0, 60.0]):
        logits[i, target[i]] += margin
    opts = {"gamma": gamma, "alpha": alpha}
    if alpha == "tensor":
        opts["alpha"] = torch.linspace(0.25, 1.0, 9, dtype=torch.float64)
    value, grad = loss_and_grad("focal", logits, target, "triton", "none", **opts)
    expected, expected_grad = reference_loss_and_grad("focal", logits, target, "none", **opts)
    assert_near(value, expected, torch.float32)
    assert_near(grad, expected_grad, torch.float32)
    if gamma == 0.0 and alpha is None:
        ce_value, ce_grad = loss_and_grad("cross_entropy", logits, target, "triton", "none")
        assert torch.equal(value, ce_value) and torch.equal(grad, ce_grad)


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_label_smoothing_with_weights_and_ignore_index(path):
    """torch's weighted label smoothing (per-column weights) and a non-default ignore_index."""
    path(37)
    logits, target = make_inputs(7, 37, torch.float32, ignore=False)
    target[[0, 4]] = 5
    weight = torch.rand(37, dtype=torch.float64) + 0.1
    for reduction in ["mean", "none"]:
        value, grad = loss_and_grad("cross_entropy", logits, target, "triton", reduction, weight=weight,
                                    label_smoothing=0.3, ignore_index=5)
        expected = torch.nn.functional.cross_entropy(logits.double(), target, weight, ignore_index=5,
                                                     reduction=reduction, label_smoothing=0.3)
        _, expected_grad = reference_loss_and_grad("cross_entropy", logits, target, reduction, weight=weight,
                                                   label_smoothing=0.3, ignore_index=5)
        assert_near(value, expected, torch.float32)
        assert_near(grad, expected_grad, torch.float32)
        assert (grad[[0, 4]] == 0).all()


def capped_reference(loss, logits, target, weight, lse_square_scale, softcap, gamma=2.0, ignore_index=-100):
    """Float64 rows, "mean" gradient and lse of the losses on softcap·tanh(z/softcap), with the
    z-loss w_y λ lse² for cross-entropy, by autograd."""
    x = logits.detach().double().requires_grad_(True)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    keep = target != ignore_index
    lse = torch.where(keep, torch.logsumexp(z, dim=1), 0.0)
    if loss == "cross_entropy":
        rows = reference.cross_entropy_rows(z, target, weight, ignore_index)
        w_y = weight[torch.where(keep, target, 0)] * keep
        rows = rows + lse_square_scale * w_y * lse**2
    elif loss == "focal":
        rows = reference.focal_rows(z, target, gamma, None, weight, ignore_index)
    else:
        rows = reference.rescaled_mse_rows(z, target, 1.0, 0.0, weight, ignore_index)
        lse = torch.zeros_like(lse)
    (rows.sum() / reference.total_weight(target, weight, ignore_index)).backward()
    return rows.detach(), x.grad, lse.detach()


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", LOSSES)
def test_z_loss_softcap_and_lse(loss, dtype, path):
    """z-loss (``lse_square_scale``) and logit ``softcap`` (Gemma 2), and the per-row lse output."""
    path(40)
    logits, target = make_inputs(6, 40, dtype, scale=4.0)
    logits[0, :20] = torch.linspace(-0.3, 0.3, 20, dtype=dtype)  # |z/softcap| near 0: tanh's small branch
    weight = torch.rand(40, dtype=torch.float64) + 0.5
    for z_loss, softcap in [(0.01, 0.0), (0.0, 5.0), (1e-3, 3.0)]:
        lse = torch.full((6,), float("nan"), dtype=_acc(dtype))
        rows, total, grad = kernel_forward(logits, target, loss, weight=weight.to(dtype), mean=True, gamma=2.0,
                                           lse_square_scale=z_loss, softcap=softcap, lse=lse)
        expected_rows, expected_grad, expected_lse = capped_reference(loss, logits, target, weight, z_loss, softcap)
        assert_near(rows, expected_rows, dtype)
        assert_near(grad, expected_grad, dtype)
        assert_near(lse, expected_lse, dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def combine_row_stats(pieces, loss):
    """What the all-reduces do to the per-slice statistics: max by max, the rest by sums, the
    sum-exps rescaled to the global max first."""
    stats = torch.stack(pieces)
    if loss != "rescaled_mse":
        global_max = stats[:, :, 0].amax(dim=0)
        rescale = torch.where(stats[:, :, 1] > 0, torch.exp(stats[:, :, 0] - global_max), 0.0)
        stats[:, :, 1] *= rescale
        stats[:, :, 0] = global_max
    combined = stats.sum(dim=0)
    if loss != "rescaled_mse":
        combined[:, 0] = stats[0, :, 0]
    return combined


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("loss", LOSSES)
def test_vocabulary_split_equals_whole_rows(loss, path):
    """Classes split over three "processes": statistics per slice, combined, then the loss and
    each slice's gradient from them equal the unsplit kernel's."""
    path(12)
    slices = [(0, 12), (12, 24), (24, 36)]
    logits, target = make_inputs(7, 36, torch.float32, ignore=True)
    logits[5, 12:24] = float("-inf")  # a slice with only masked classes
    logits[6, 30] = float("nan")
    weight = torch.rand(36, dtype=torch.float64) + 0.5
    alpha = torch.linspace(0.25, 1.0, 36, dtype=torch.float64) if loss == "focal" else None
    params = {"label_smoothing": 0.2, "gamma": 2.0, "kappa": 2.0, "beta": 1.0, "lse_square_scale": 1e-3,
              "softcap": 8.0}
    kind = LOSSES.index(loss)
    whole_lse = torch.empty(7)
    whole_rows, whole_total, whole_grad = kernel_forward(logits, target, loss, weight=weight, alpha=alpha,
                                                         mean=True, lse=whole_lse, **params)
    pieces = [kernels.row_stats(logits[:, a:b], target, weight, kind, params, -100, a, 36) for a, b in slices]
    stats = combine_row_stats(pieces, loss)
    grad = torch.empty_like(logits)
    for a, b in slices:
        lse = torch.empty(7)
        rows, total = kernels.loss_from_stats(logits[:, a:b], target, stats, weight, alpha, grad[:, a:b], kind,
                                              params, -100, True, a, 36, lse)
        assert_near_cpp(rows, whole_rows, torch.float32)
        assert_near_cpp(lse, whole_lse, torch.float32)
        assert torch.equal(total, whole_total)
    assert_near_cpp(grad, whole_grad, torch.float32)
    assert torch.isnan(rows[6]) and torch.isfinite(rows[:6]).all()


# ---------------------------------------------------------------------------- layout, in place
@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("loss", LOSSES)
def test_row_stride_reaches_the_kernel(loss, path):
    """A row-strided view is read where it lies (no copy) and gives the contiguous result."""
    path(21)
    storage, target = make_inputs(5, 30, torch.float32)
    logits = storage[:, 4:25]
    assert logits.stride() == (30, 1)
    strided_target = torch.stack([target, target], dim=1)[:, 0]
    rows, total, grad = kernel_forward(logits, strided_target, loss, mean=True, gamma=2.0, beta=1.0)
    rows_c, total_c, grad_c = kernel_forward(logits.contiguous(), target, loss, mean=True, gamma=2.0, beta=1.0)
    assert torch.equal(rows, rows_c) and torch.equal(total, total_c) and torch.equal(grad, grad_c)
    value, grad = loss_and_grad(loss, logits, target, "triton")
    expected, expected_grad = reference_loss_and_grad(loss, logits, target, gamma=2.0)
    assert_near(value, expected, torch.float32)
    assert_near(grad, expected_grad, torch.float32)


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", LOSSES)
def test_inplace_backward(loss, reduction, path):
    """The gradient overwrites the logits (each element read before it is written)."""
    path(33)
    logits, target = make_inputs(7, 33, torch.float32)
    opts = options_for(loss, 33)
    expected, expected_grad = loss_and_grad(loss, logits, target, "triton", reduction, **opts)
    x = logits.clone().requires_grad_(True)
    with ncfast.use_backend("triton"):
        value = PUBLIC[loss](x, target, reduction=reduction, inplace_backward=True, **opts)
    value.sum().backward()
    assert torch.equal(value.detach(), expected)
    assert torch.equal(x.grad, expected_grad)
    assert torch.equal(x.detach(), expected_grad)


# ---------------------------------------------------------------------------- NaN policy, targets
@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("loss", LOSSES)
def test_nan_rows_match_cpp(loss, path):
    """A NaN makes its row NaN, for every loss; so do +inf and all -inf for the softmax losses,
    where a -inf logit is a masked class; other rows are untouched."""
    path(6)
    logits = torch.randn(5, 6, dtype=torch.float64)
    logits[1, 2] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :3] = float("-inf")
    logits[4, :] = float("-inf")
    target = torch.tensor([0, 1, 2, 4, 0])
    value, grad = loss_and_grad(loss, logits, target, "triton", "none")
    cpp_value, cpp_grad = loss_and_grad(loss, logits, target, "cpp", "none")
    assert torch.isnan(value[1]) and torch.isnan(grad[1]).all()  # the MSE too: the row, not one column
    finite = [0, 2, 3, 4]
    assert_near_cpp(value[finite], cpp_value[finite], torch.float64)
    assert_near_cpp(grad[finite], cpp_grad[finite], torch.float64)
    if loss != "rescaled_mse":
        assert torch.isnan(value[[1, 2, 4]]).all() and torch.isnan(grad[[1, 2, 4]]).all()
        assert torch.isfinite(value[[0, 3]]).all() and (grad[3, :3] == 0).all()


@interpreted
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("loss", LOSSES)
def test_out_of_range_target_is_a_nan_row(loss, path):
    """Below the API's check (the CUDA path): an out-of-range target is never read through; its
    row is NaN, does not count in Σw, and the other rows are exact."""
    path(7)
    logits, _ = make_inputs(4, 7, torch.float64, ignore=False)
    target = torch.tensor([3, 7, -2, -100])
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    rows, total, grad = kernel_forward(logits, target, loss, weight=weight, mean=True, gamma=2.0)
    assert torch.isnan(rows[1:3]).all() and torch.isnan(grad[1:3]).all()
    assert rows[3] == 0 and (grad[3] == 0).all()
    assert total.shape == () and total.dtype == torch.float64 and float(total) == float(weight[3])
    good_rows, good_total, good_grad = kernel_forward(logits[:1], target[:1], loss, weight=weight, mean=True,
                                                      gamma=2.0)
    assert torch.equal(rows[:1], good_rows) and torch.equal(grad[:1], good_grad)


@interpreted
@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic_and_device_resident(loss):
    logits, target = make_inputs(5, 300, torch.bfloat16)
    first = kernel_forward(logits, target, loss, mean=True, label_smoothing=0.1)
    second = kernel_forward(logits, target, loss, mean=True, label_smoothing=0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    rows, total, grad = first
    assert rows.dtype == torch.float32 and total.shape == () and isinstance(total, torch.Tensor)
    assert grad.dtype == torch.bfloat16


@interpreted
def test_empty_batch():
    rows, total, grad = kernel_forward(torch.empty(0, 5), torch.empty(0, dtype=torch.int64), mean=True)
    assert rows.shape == (0,) and float(total) == 0.0 and grad.shape == (0, 5)


# ---------------------------------------------------------------------------- compiled, on a GPU
@compiled
@pytest.mark.gpu
@pytest.mark.parametrize("num_classes", [131072, 262144])
@pytest.mark.parametrize("loss", LOSSES)
def test_gpu_large_vocabulary_bf16(loss, num_classes):
    """Rows longer than MAX_BLOCK (two sweeps) in bf16, in place and not."""
    assert num_classes > kernels.MAX_BLOCK
    logits, target = make_inputs(4, num_classes, torch.bfloat16, scale=1.0 if loss == "rescaled_mse" else 3.0,
                                 device="cuda")
    opts = options_for(loss, num_classes)
    assert ncfast._backend.backend_for(logits) == "triton"
    value, grad = loss_and_grad(loss, logits, target, None, "none", **opts)
    expected, expected_grad = reference_loss_and_grad(loss, logits, target, "none", **on("cuda", opts))
    assert_near(value, expected, torch.bfloat16)
    torch.testing.assert_close(grad.double(), expected_grad, atol=5e-3, rtol=1e-2)
    value_inplace, grad_inplace = loss_and_grad(loss, logits, target, None, "none", inplace=True, **opts)
    assert torch.equal(value_inplace, value) and torch.equal(grad_inplace, grad)


@compiled
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_classes", [5, 130, 2100, 50257])
def test_gpu_cross_entropy_matches_torch(num_classes, dtype):
    logits, target = make_inputs(64, num_classes, dtype, device="cuda")
    value, grad = loss_and_grad("cross_entropy", logits, target, None, "mean", label_smoothing=0.1)
    x = logits.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(x.float(), target, label_smoothing=0.1)
    expected.backward()
    atol, rtol = TRITON_LOSS[dtype]
    torch.testing.assert_close(value.float(), expected.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), x.grad.float(), atol=atol, rtol=rtol)


@compiled
@pytest.mark.gpu
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_gpu_torch_compile_fullgraph(inplace_backward):
    torch._dynamo.reset()
    model = torch.nn.Linear(64, 1000, device="cuda")
    features = torch.randn(32, 64, device="cuda")
    target = torch.randint(0, 1000, (32,), device="cuda")
    target[::5] = -100

    def step(h, y):
        return ncfast.cross_entropy(model(h), y, label_smoothing=0.1, inplace_backward=inplace_backward)

    compiled = torch.compile(step, fullgraph=True)
    value = compiled(features, target)
    value.backward()
    compiled_grad = model.weight.grad.clone()
    model.zero_grad()
    expected = step(features, target)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(compiled_grad, model.weight.grad)
