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
