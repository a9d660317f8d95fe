"""Compiles the Triton loss kernel for a GPU without one (Triton's own compiler and ptxas), at
the specialisations of each tile kind, and prints per line the kind and how many global loads
are vector loads. The interpreter checks the kernels' numbers; this checks that they compile
for the device and that the loads of every tile kind are vectorised (coalesced).

Usage: python tools/compile_triton_losses.py [ARCH (default 90)]
Prints: ``<tile kind> vector_loads=<n> scalar_loads=<n> stores=<n>``; exits 1 if a
specialisation does not compile."""

import collections
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces the compiler

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ncfast.triton_kernels import losses  # noqa: E402

SCALARS = ("smoothing", "gamma", "kappa", "beta", "z_loss", "softcap")
# (name, logits dtype, accumulation, BLOCK, ROWS, one sweep, class-strided, kind, num_warps):
# tiles the autotuner may pick for K = 16 and 128 rows, NCHW with K = 19 and K = 150, a
# 32768-column row, fp64 rows.
KERNEL_VARIANTS = [
    ("rows_k16_bf16", "bf16", "fp32", 16, 256, True, False, 0, 4),
    ("rows_k128_fp32_focal", "fp32", "fp32", 128, 32, True, False, 1, 4),
    ("strided_k19_bf16", "bf16", "fp32", 32, 128, True, True, 0, 8),
    ("strided_two_sweep_fp32_mse", "fp32", "fp32", 128, 64, False, True, 2, 8),
    ("long_row_bf16", "bf16", "fp32", 16384, 1, False, False, 0, 16),
    ("rows_fp64", "fp64", "fp64", 8192, 1, True, False, 1, 16),
]


def compile_one(arch, dtype, acc, block, rows, one_sweep, strided, kind, num_warps):
    fn = losses._loss_kernel.fn
    names = fn.arg_names
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature = {}
    for name in names:
        if name.endswith("_ptr"):
            signature[name] = "*" + {"logits_ptr": dtype, "grad_ptr": dtype, "target_ptr": "i64"}.get(name, acc)
        elif name in SCALARS:
            signature[name] = "fp64"
        elif name in constexpr_names:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    values = dict(PHASE=0, KIND=kind, HAS_WEIGHT=True, HAS_ALPHA=kind == 1, COLUMN_WEIGHTS=False, MEAN=True,
                  CAP=False, WRITE_LSE=True, ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block,
                  ONE_SWEEP=one_sweep, STRIDED=strided, TILE_BUDGET=losses.MAX_BLOCK, ROWS=rows)
    # Triton specialises unit strides to constants and marks sizes divisible by 16: the unit
    # stride is the class stride for rows, the position stride for class-strided tiles.
    for name in ("logits_stride_s", "grad_stride_s") if strided else ("logits_stride_k", "grad_stride_k"):
        values[name] = 1
        signature[name] = "constexpr"
    constexprs = {(names.index(name),): value for name, value in values.items()}
    aligned = [n for n in names if n.endswith("_ptr") or (signature[n] == "i32" and ("stride" in n or n in "SK"))]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    return collections.Counter(re.findall(r"(ld\.global[.\w:]*|st\.global[.\w:]*)", compiled.asm["ptx"]))


def main(arch):
    for name, *spec in KERNEL_VARIANTS:
        forms = compile_one(arch, *spec)
        vector = sum(n for form, n in forms.items() if form.startswith("ld.global.v"))
        scalar = sum(n for form, n in forms.items() if form.startswith("ld.global") and ".v" not in form)
        stores = sum(n for form, n in forms.items() if form.startswith("st.global"))
        print(f"{name} vector_loads={vector} scalar_loads={scalar} stores={stores}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
