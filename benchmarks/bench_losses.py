"""Fused loss forward + backward: ncfast against torch eager and torch.compile (CPU).

Run: ``cd benchmarks && asv run --python=same --bench bench_losses``. The memory floor is
one copy of the logits (``CopyFloor``)."""

import torch
import torch.nn.functional as F

import ncfast

SHAPES = ["4096x32000", "1024x8192", "256x131072"]
DTYPES = ["float32", "bfloat16"]


def _eager_focal(logits, target, gamma=3.0):
    log_p = torch.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def _eager_rescaled_mse(logits, target, kappa=1.0, beta=15.0):
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    scaled = 1 + (kappa - 1) * one_hot
    return (scaled * (logits - beta * one_hot) ** 2).sum(dim=1).mean()


def _ncfast(fn, **kwargs):
    return lambda logits, target: fn(logits, target, **kwargs)


IMPLEMENTATIONS = {
    "cross_entropy": {
        "ncfast": _ncfast(ncfast.cross_entropy),
        "ncfast_inplace": _ncfast(ncfast.cross_entropy, inplace_backward=True),
        "torch_eager": F.cross_entropy,
        "torch_compile": F.cross_entropy,
    },
    "focal": {
        "ncfast": _ncfast(ncfast.focal_loss, gamma=3.0),
        "ncfast_inplace": _ncfast(ncfast.focal_loss, gamma=3.0, inplace_backward=True),
        "torch_eager": _eager_focal,
        "torch_compile": _eager_focal,
    },
    "rescaled_mse": {
        "ncfast": _ncfast(ncfast.rescaled_mse, kappa=1.0, beta=15.0),
        "ncfast_inplace": _ncfast(ncfast.rescaled_mse, kappa=1.0, beta=15.0, inplace_backward=True),
        "torch_eager": _eager_rescaled_mse,
        "torch_compile": _eager_rescaled_mse,
    },
}


class LossForwardBackward:
    params = (list(IMPLEMENTATIONS), list(IMPLEMENTATIONS["focal"]), SHAPES, DTYPES)
    param_names = ["loss", "implementation", "shape", "dtype"]
    timeout = 300

    def setup(self, loss, implementation, shape, dtype):
        n, k = map(int, shape.split("x"))
        generator = torch.Generator().manual_seed(0)
        self.logits = torch.randn(n, k, generator=generator).to(getattr(torch, dtype))
        self.target = torch.randint(0, k, (n,), generator=generator)
        fn = IMPLEMENTATIONS[loss][implementation]
        if implementation == "torch_compile":
            fn = torch.compile(fn)
        self.fn = fn
        self.inplace = implementation == "ncfast_inplace"
        self.step()  # warm-up (compilation)

    def step(self):
        # In-place needs a fresh leaf each call; its copy is part of what it costs the user.
        logits = (self.logits.clone() if self.inplace else self.logits).requires_grad_(True)
        self.fn(logits, self.target).backward()

    def time_forward_backward(self, *params):
        self.step()

    def peakmem_forward_backward(self, *params):
        self.step()


class CopyFloor:
    """One read and one write of the logits: the memory floor of a fused loss."""

    params = (SHAPES, DTYPES)
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        n, k = map(int, shape.split("x"))
        self.logits = torch.randn(n, k).to(getattr(torch, dtype))
        self.out = torch.empty_like(self.logits)

    def time_copy(self, shape, dtype):
        self.out.copy_(self.logits)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the Triton kernel against torch eager / torch.compile, and the
# kernel's effective bandwidth against the HBM floor (SPEC §7: one read + one write per logit).
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = ["16384x4096", "4096x32000", "1024x131072", "256x262144"]


def _cuda_or_skip():
    if not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA device")  # asv: skipped


class GPULossForwardBackward:
    params = (list(IMPLEMENTATIONS), list(IMPLEMENTATIONS["focal"]), GPU_SHAPES, DTYPES)
    param_names = ["loss", "implementation", "shape", "dtype"]
    timeout = 600

    def setup(self, loss, implementation, shape, dtype):
        _cuda_or_skip()
        n, k = map(int, shape.split("x"))
        generator = torch.Generator(device="cuda").manual_seed(0)
        self.logits = torch.randn(n, k, generator=generator, device="cuda").to(getattr(torch, dtype))
        self.target = torch.randint(0, k, (n,), generator=generator, device="cuda")
        fn = IMPLEMENTATIONS[loss][implementation]
        self.fn = torch.compile(fn) if implementation == "torch_compile" else fn
        self.inplace = implementation == "ncfast_inplace"
        self.step()  # warm-up: compilation, autotuning
        torch.cuda.synchronize()

    def step(self):
        logits = (self.logits.clone() if self.inplace else self.logits).requires_grad_(True)
        self.fn(logits, self.target).backward()

    def time_forward_backward(self, *params):
        self.step()
        torch.cuda.synchronize()

    def peakmem_forward_backward(self, *params):
        self.step()


class GPUKernelBandwidth:
    """The Triton kernel alone (no autograd), in place: effective TB/s counting the minimum
    traffic, one read and one write of the logits (H100 SXM HBM3 ≈ 3.35 TB/s). Rows longer than
    ``MAX_BLOCK`` are read twice, so their ceiling is 2/3 of the HBM rate."""

    params = (["cross_entropy", "focal", "rescaled_mse"], GPU_SHAPES, DTYPES)
    param_names = ["loss", "shape", "dtype"]
    timeout = 600

    def setup(self, loss, shape, dtype):
        _cuda_or_skip()
        from ncfast.losses import LOSSES
        from ncfast.triton_kernels import losses as kernels

        n, k = map(int, shape.split("x"))
        self.logits = torch.randn(n, k, device="cuda").to(getattr(torch, dtype))
        self.target = torch.randint(0, k, (n,), device="cuda")
        params = {"label_smoothing": 0.0, "gamma": 3.0, "kappa": 1.0, "beta": 15.0}
        self.call = lambda: kernels.loss_forward(self.logits, self.target, None, None, self.logits,
                                                 LOSSES.index(loss), params, -100, True)
        self.bytes = 2 * self.logits.numel() * self.logits.element_size()
        self.call()  # autotuning
        torch.cuda.synchronize()

    def time_kernel(self, *params):
        self.call()
        torch.cuda.synchronize()

    def track_effective_bandwidth(self, *params):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        repeats = 50
        start.record()
        for _ in range(repeats):
            self.call()
        end.record()
        torch.cuda.synchronize()
        return self.bytes * repeats / (start.elapsed_time(end) * 1e-3) / 1e12

    track_effective_bandwidth.unit = "TB/s"
