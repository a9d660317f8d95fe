"""Triton GPU kernels of ncfast, installed as ``ncfast.triton_kernels``.

Kernels take tensors, sizes and strides only: no autograd, no argument checking (the
``ncfast`` API layer does both). Under ``TRITON_INTERPRET=1`` they run on CPU tensors."""
