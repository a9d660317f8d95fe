"""The Triton loss kernel's tiles of several short rows (small K) and of class-strided
(B, K, S) layouts (dense predictions: NCHW segmentation, (B, V, T) token classification)
against the float64 reference and the C++ kernel, under the interpreter like
``test_losses_triton.py`` (whose helpers these tests share); one test compiles every tile
kind for sm_90 without a GPU; the ``gpu`` test times them on a CUDA device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ncfast
from ncfast.losses import LOSSES
from ncfast.reference import losses as reference
from test_losses_triton import (PUBLIC, _acc, assert_near, assert_near_cpp, compiled, interpreted,
                                kernel_forward, kernels, loss_and_grad, make_inputs, options_for,
                                reference_loss_and_grad, triton)
from tolerances import TRITON_LOSS


# Every option of each loss at once, as the kernel's parameters: class weights (and, with label
# smoothing, per-column weights), z-loss and softcap; focal γ and α_t; a non-default κ, β.
ALL_OPTIONS = {
    "cross_entropy": {"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 8.0},
    "focal": {"gamma": 3.0},
    "rescaled_mse": {"kappa": 3.0, "beta": 2.0},
}
NEUTRAL = {"label_smoothing": 0.0, "gamma": 0.0, "kappa": 1.0, "beta": 0.0, "lse_square_scale": 0.0, "softcap": 0.0}


def every_option(loss, k):
    """(params, weight, alpha) of ``loss`` with every option it takes switched on."""
    weight = torch.rand(k, dtype=torch.float64) + 0.5
    alpha = torch.linspace(0.25, 1.0, k, dtype=torch.float64) if loss == "focal" else None
    return dict(NEUTRAL, **ALL_OPTIONS[loss]), weight, alpha


def as_rows(logits, target):
    """(B, K, S) logits and (B, S) target as (B·S, K) rows and (B·S,) targets, row b·S + s."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)


def check_against_reference_and_cpp(loss, logits, target, params, weight, alpha, grad, rows, lse,
                                    ignore_index=-100):
    """Kernel outputs (rows w_y·ℓ in b-major order, the gradient of their sum in the logits'
    layout, lse) against the float64 reference and the C++ backend (through the public API)."""
    dtype = logits.dtype
    z, y = as_rows(logits, target) if logits.dim() == 3 else (logits, target)
    expected_rows, expected_grad, expected_lse = reference.rows_and_grad(loss, z.double(), y, weight, alpha,
                                                                         ignore_index, **params)
    as_layout = (lambda g: g.reshape(logits.shape[0], logits.shape[2], -1).movedim(-1, 1)) if logits.dim() == 3 \
        else (lambda g: g)
    assert_near(rows, expected_rows, dtype)
    assert_near(grad, as_layout(expected_grad), dtype)
    assert_near(lse, expected_lse, dtype)
    opts = {name: params[name] for name in ALL_OPTIONS[loss]}
    if loss == "focal":
        opts["alpha"] = alpha
    if loss == "cross_entropy":
        opts["return_lse"] = True
    x = logits.detach().clone().requires_grad_(True)
    with ncfast.use_backend("cpp"):
        out = PUBLIC[loss](x, target, weight=weight, ignore_index=ignore_index, reduction="none", **opts)
    value, cpp_lse = out if loss == "cross_entropy" else (out, None)
    value.sum().backward()
    assert_near_cpp(rows.to(dtype), value.reshape(-1), dtype)
    assert_near_cpp(grad, x.grad, dtype)
    if cpp_lse is not None:
        assert_near_cpp(lse, cpp_lse.reshape(-1), dtype)


def run_kernel(loss, logits, target, params, weight, alpha, grad=None, ignore_index=-100):
    """The kernel on ``logits`` (any layout), "sum" scaling: (rows, total, grad, lse)."""
    lse = torch.full((target.numel(),), float("nan"), dtype=_acc(logits.dtype))
    rows, total, grad = kernel_forward(logits, target, loss, weight=weight, alpha=alpha, grad=grad, lse=lse,
                                       ignore_index=ignore_index, **params)
    return rows, total, grad, lse


@interpreted
@pytest.mark.parametrize("num_classes", [2, 3, 10, 17, 64, 300])
@pytest.mark.parametrize("loss", LOSSES)
def test_small_classes_every_option(loss, num_classes):
    """Several short rows per program (the last tile partial: 37 rows), every option on, against
    the float64 reference and the C++ kernel; 300 classes are past the multi-row threshold."""
    logits, target = make_inputs(37, num_classes, torch.float32, scale=1.0 if loss == "rescaled_mse" else 3.0)
    target[target == -100] = 1  # a non-default ignore_index
    params, weight, alpha = every_option(loss, num_classes)
    rows, total, grad, lse = run_kernel(loss, logits, target, params, weight, alpha, ignore_index=1)
    check_against_reference_and_cpp(loss, logits, target, params, weight, alpha, grad, rows, lse, ignore_index=1)
    kept = target != 1
    assert torch.isclose(total, weight[target[kept]].sum().float()) and (grad[~kept] == 0).all()
    inplace = logits.clone()
    inplace_rows, _, _, inplace_lse = run_kernel(loss, inplace, target, params, weight, alpha, grad=inplace,
                                                 ignore_index=1)
    assert torch.equal(inplace, grad) and torch.equal(inplace_rows, rows) and torch.equal(inplace_lse, lse)


@interpreted
@pytest.mark.parametrize("num_rows", [0, 1])
def test_small_classes_tiny_batches(num_rows):
    logits, target = make_inputs(num_rows, 10, torch.float32, ignore=False)
    params, weight, alpha = every_option("cross_entropy", 10)
    rows, total, grad, lse = run_kernel("cross_entropy", logits, target, params, weight, alpha)
    assert rows.shape == lse.shape == (num_rows,) and grad.shape == (num_rows, 10)
    check_against_reference_and_cpp("cross_entropy", logits, target, params, weight, alpha, grad, rows, lse)
    assert float(total) == float(weight[target].sum().float())


def strided_logits(layout, loss, dtype=torch.float32):
    """(B, K, S) logits laid out as ``layout``, the (B, S) target and a gradient buffer in the
    same layout (a view of a NaN-filled storage where the logits are a view)."""
    scale = 1.0 if loss == "rescaled_mse" else 3.0
    if layout == "rows_transposed":  # (N, K) with class stride N: one batch, positions contiguous
        storage = (torch.randn(19, 23, dtype=torch.float64) * scale).to(dtype)
        logits, grad_storage = storage.t(), torch.full_like(storage, float("nan"))
        grad = grad_storage.t()
        target = torch.randint(0, 19, (23,))
        target[::4] = -100
        return logits, target, grad, grad_storage
    if layout == "sliced":  # classes 1..K of K + 2, every second position
        storage = (torch.randn(3, 21, 30, dtype=torch.float64) * scale).to(dtype)
        index = (slice(None), slice(1, 20), slice(None, None, 2))
    elif layout == "channels_last":  # (B, S, K) storage: unit class stride, B batches of S rows
        storage = (torch.randn(3, 13, 19, dtype=torch.float64) * scale).to(dtype)
        index = (slice(None), slice(None), slice(None))
        storage = storage.permute(0, 2, 1)
    else:  # "nchw": (B, K, H·W) contiguous
        storage = (torch.randn(3, 19, 4 * 5, dtype=torch.float64) * scale).to(dtype)
        index = (slice(None), slice(None), slice(None))
    logits = storage[index]
    grad_storage = torch.full_like(storage, float("nan"))
    target = torch.randint(0, 19, (logits.shape[0], logits.shape[2]))
    target[:, 1::3] = -100
    return logits, target, grad_storage[index], grad_storage


STRIDED_LAYOUTS = ["nchw", "sliced", "channels_last", "rows_transposed"]


@interpreted
@pytest.mark.parametrize("two_sweep", [False, True])
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_class_strided_layouts(loss, layout, two_sweep, monkeypatch):
    """(B, K, S) logits read where they lie — NCHW, a non-contiguous slice, channels-last, an
    (N, K) transpose — with the gradient written in the caller's layout and nowhere else; the
    two-sweep path with blocks of 8 of the 19 classes (the last one partial) where the class
    stride is not 1 (unit-stride rows take it one row per program, as the tests above run it)."""
    if two_sweep:
        monkeypatch.setattr(kernels, "STRIDED_BLOCK", 8)
    logits, target, grad, grad_storage = strided_logits(layout, loss)
    params, weight, alpha = every_option(loss, 19)
    rows, total, grad, lse = run_kernel(loss, logits, target, params, weight, alpha, grad=grad)
    check_against_reference_and_cpp(loss, logits, target, params, weight, alpha, grad, rows, lse)
    # The storage was NaN: the view's elements (all finite, as compared above) and nothing else written.
    assert int((~torch.isnan(grad_storage)).sum()) == grad.numel()
    inplace = logits.clone()
    inplace_rows, _, _, _ = run_kernel(loss, inplace, target, params, weight, alpha, grad=inplace)
    assert torch.equal(inplace, grad) and torch.equal(inplace_rows, rows)
    contiguous_grad = torch.empty(logits.shape, dtype=logits.dtype)  # a layout of its own
    run_kernel(loss, logits, target, params, weight, alpha, grad=contiguous_grad)
    assert torch.equal(contiguous_grad, grad)


@interpreted
@pytest.mark.parametrize("layout", ["rows", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_new_tiles_dtypes(loss, dtype, layout):
    """fp32 accumulation for 16-bit logits (fp64 for fp64), gradient in the logits' dtype, on
    multi-row tiles (K = 10) and class-strided ones."""
    if layout == "rows":
        logits, target = make_inputs(37, 10, dtype, scale=1.0 if loss == "rescaled_mse" else 3.0)
        grad = None
    else:
        logits, target, grad, _ = strided_logits("nchw", loss, dtype)
    params, weight, alpha = every_option(loss, logits.shape[1])
    rows, _, grad, lse = run_kernel(loss, logits, target, params, weight, alpha, grad=grad)
    assert grad.dtype == dtype and rows.dtype == lse.dtype == _acc(dtype)
    check_against_reference_and_cpp(loss, logits, target, params, weight, alpha, grad, rows, lse)


@interpreted
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_dense_predictions_end_to_end(loss, inplace, monkeypatch):
    """(N, K, H, W) logits through the public API reach the kernel as the (N, K, H·W) view of
    their own storage (class stride H·W: no transposed copy), in place too; loss and gradient
    match the float64 reference and the C++ backend."""
    logits, target = make_inputs(2 * 4 * 5, 7, torch.float32, scale=1.0 if loss == "rescaled_mse" else 3.0)
    logits = logits.reshape(2, 4, 5, 7).permute(0, 3, 1, 2).contiguous()
    target = target.reshape(2, 4, 5)
    opts = options_for(loss, 7)
    strides = []
    launch = kernels.loss_forward

    def spy(z, *args):
        strides.append(z.stride())
        return launch(z, *args)

    monkeypatch.setattr(kernels, "loss_forward", spy)
    value, grad = loss_and_grad(loss, logits, target, "triton", "mean", inplace=inplace, **opts)
    assert strides == [(7 * 20, 20, 1)]
    rows_logits, rows_target = as_rows(logits.flatten(2), target.flatten(1))
    expected, expected_grad = reference_loss_and_grad(loss, rows_logits, rows_target, "mean", **opts)
    assert_near(value, expected, torch.float32)
    assert_near(grad, expected_grad.reshape(2, 20, 7).movedim(-1, 1).reshape(logits.shape), torch.float32)
    cpp_value, cpp_grad = loss_and_grad(loss, logits, target, "cpp", "mean", inplace=inplace, **opts)
    assert_near_cpp(value, cpp_value, torch.float32)
    assert_near_cpp(grad, cpp_grad, torch.float32)


def test_tile_choice():
    """Autotuning's candidates: several rows per program only for rows of at most
    MULTI_ROW_CLASSES (padded) columns, wide position tiles when the class stride is not 1,
    every tile within the register budget; under the interpreter exactly one."""
    budget = kernels.MAX_BLOCK
    gpu_configs = [triton.Config({"ROWS": r}, num_warps=w) for r in kernels.ROW_CHOICES for w in (1, 2, 4, 8, 16, 32)]
    for block, strided in [(2, False), (16, False), (256, False), (512, False), (16384, False), (32, True),
                           (128, True)]:
        for interpreted_now in (False, True):
            kernels.INTERPRETED, saved = interpreted_now, kernels.INTERPRETED
            try:
                kept = kernels._prune_configs(gpu_configs, {}, BLOCK=block, TILE_BUDGET=budget, STRIDED=strided)
            finally:
                kernels.INTERPRETED = saved
            rows = {c.kwargs["ROWS"] for c in kept}
            assert kept and all(r * block <= budget for r in rows)
            if interpreted_now:
                assert len(kept) == 1
            elif strided:
                assert min(rows) >= kernels.STRIDED_MIN_ROWS
            elif block > kernels.MULTI_ROW_CLASSES:
                assert rows == {1}
            else:
                assert min(rows) > 1


def test_compiles_for_the_gpu_with_vector_loads():
    """Every tile kind compiles for sm_90 (no GPU needed: Triton's compiler and ptxas) and its
    logits are read with vector loads — the interpreter checks the numbers, not this."""
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[1] / "tools" / "compile_triton_losses.py"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 6
    for name, vector, *_ in lines:
        assert int(vector.removeprefix("vector_loads=")) > 0, name


# The classifier and segmentation shapes of the multi-row and class-strided tiles.
TILE_SHAPES = [(1_000_000, 2), (3_200_000, 10), (320_000, 100), (32_000, 1000), (8, 19, 256, 256),
               (4, 150, 128, 128)]
SEED_OPTIONS = {"cross_entropy": {}, "focal": {"gamma": 3.0}, "rescaled_mse": {"kappa": 1.0, "beta": 15.0}}


@compiled
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LOSSES)
def test_gpu_tile_throughput(loss, shape, dtype):
    """The new tiles at the shapes classifiers and segmentation train with (the seeds' γ = 3,
    κ = 1, β = 15): correct against the float64 reference, and their time printed next to a
    clone of the logits (one read and one write: the memory floor). Asserts no timing."""
    logits = (torch.randn(shape, device="cuda") * (1.0 if loss == "rescaled_mse" else 3.0)).to(dtype)
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:], device="cuda")
    target[::7] = -100
    view, view_target = (logits.flatten(2), target.flatten(1)) if logits.dim() > 2 else (logits, target)
    params = dict(NEUTRAL, **SEED_OPTIONS[loss])
    grad = torch.empty_like(view)

    def fused():
        return kernels.loss_forward(view, view_target, None, None, grad, LOSSES.index(loss), params, -100, False)

    rows, _ = fused()
    z, y = as_rows(view, view_target) if view.dim() == 3 else (view, view_target)
    expected_rows, expected_grad, _ = reference.rows_and_grad(loss, z.double(), y, **params)
    # Rows accumulate in fp32 whatever the logits' dtype (sums of up to 1000 terms: rtol 1e-4).
    torch.testing.assert_close(rows.double(), expected_rows, atol=1e-4, rtol=1e-4)
    atol, rtol = TRITON_LOSS[dtype]
    grad_rows = as_rows(grad, view_target)[0] if view.dim() == 3 else grad
    torch.testing.assert_close(grad_rows.double(), expected_grad, atol=atol, rtol=rtol)
    del expected_rows, expected_grad, z
    fused_ms = triton.testing.do_bench(fused)
    clone_ms = triton.testing.do_bench(lambda: logits.clone())
    moved = 2 * logits.numel() * logits.element_size()
    print(f"\n{loss} {tuple(shape)} {dtype}: {fused_ms * 1e3:.0f} µs, {moved / fused_ms / 1e9:.2f} TB/s, "
          f"{fused_ms / clone_ms:.2f}× a clone ({clone_ms * 1e3:.0f} µs)")
