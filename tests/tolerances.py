"""The tolerances of the tests, per dtype, in one place: how far a result may be from the float64
reference (or from another backend). Each family that needs its own numbers has a named table
here; a test takes its bound from one of them and never defines its own.

``LOSS[dtype]`` is used as both atol and rtol: |actual − expected| ≤ tol + tol·|expected|."""

import torch

# Loss values and gradients (logits, probability targets) of every backend against the float64
# reference, by logits dtype. 16-bit logits are rounded on input and accumulated in float32.
LOSS = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

# Loss values and gradients against torch's own ops in float64 (the OpInfo / ModuleInfo samples):
# LOSS, with float32 held to the tighter bound those small samples meet.
TORCH_SAMPLES = {**LOSS, torch.float32: 1e-5}

# (atol, rtol) of the Triton kernels against the float64 reference: float32 gets more absolute
# and less relative room than LOSS.
TRITON_LOSS = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# One backend against another (the Triton kernel against the C++ kernel): same math, same
# accumulation type, so tighter than against the reference.
BACKEND_AGREEMENT = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Fused linear + loss (loss and gradients in H, W, b) against the unfused float64 computation:
# the GEMM's reduction over d adds to the loss's rounding.
LINEAR_LOSS = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 5e-2}

# Relative error of every NC metric against the float64 two-pass truth, by feature dtype, in the
# collapsed regime. 16-bit features only round the input (the reference sees the same rounded
# values), so they are held to the float32 figure.
NC = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
