"""asv benchmarks of the fused linear + loss: forward + backward of
``ncfast.linear_cross_entropy`` against its floor (the three GEMMs alone: logits H Wᵀ,
dH = G W, dW = Gᵀ H; on ``torch.mm`` as ``gemms``, and as ``gemms_onednn`` on oneDNN's fp32
inner product, :func:`ncfast._matmul.mm_t`, which ncfast's fp32 CPU path uses), torch eager
(full logits, ``F.cross_entropy``) and torch's own chunked ``F.linear_cross_entropy``
(``options=torch.nn.LinearCrossEntropyOptions()``).

CUDA cases run when a GPU is present and are skipped otherwise (``NotImplementedError`` in
``setup`` is asv's skip). Run: ``cd benchmarks && asv run --python=same --bench bench_linear``;
the acceptance table (time and peak memory in fresh processes) comes from
``python benchmarks/linear_acceptance.py``."""

import torch

import ncfast
from ncfast._matmul import mm, mm_t


def _device(device):
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA device")
    return torch.device(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class LinearCrossEntropy:
    """fp32, N = 4096 rows of d = 256 features; K classes."""

    params = (["ncfast", "gemms", "gemms_onednn", "torch", "torch_chunked"], [4096, 32768], ["cpu", "cuda"])
    param_names = ["implementation", "num_classes", "device"]
    timeout = 300

    def setup(self, implementation, num_classes, device):
        self.device = _device(device)
        gen = torch.Generator().manual_seed(0)
        rows, dim = 4096, 256
        self.features = torch.randn(rows, dim, generator=gen).to(self.device).requires_grad_(True)
        self.weight = (torch.randn(num_classes, dim, generator=gen) / dim**0.5).to(self.device).requires_grad_(True)
        self.bias = torch.zeros(num_classes, device=self.device, requires_grad=True)
        self.target = torch.randint(0, num_classes, (rows,), generator=gen).to(self.device)
        self.run = getattr(self, "_" + implementation)

    def _ncfast(self):
        ncfast.linear_cross_entropy(self.features, self.weight, self.bias, self.target).backward()

    def _torch(self):
        logits = torch.nn.functional.linear(self.features, self.weight, self.bias)
        torch.nn.functional.cross_entropy(logits, self.target).backward()

    def _torch_chunked(self):
        torch.nn.functional.linear_cross_entropy(self.features, self.weight, self.target, linear_bias=self.bias,
                                                 options=torch.nn.LinearCrossEntropyOptions()).backward()

    def _gemms(self):
        h, w = self.features.detach(), self.weight.detach()
        logits = h @ w.t()
        logits @ w
        logits.t() @ h

    def _gemms_onednn(self):
        h, w = self.features.detach(), self.weight.detach()
        logits = mm_t(h, w)
        mm(logits, w)
        mm_t(logits.t(), h.t())

    def time_forward_backward(self, implementation, num_classes, device):
        self.run()
        _sync(self.device)

    def peakmem_forward_backward(self, implementation, num_classes, device):
        self.run()


class LinearLosses:
    """Every loss of the family through the fused path (fp32, N = 4096, d = 256, K = 8192)."""

    params = (["cross_entropy", "focal_loss", "rescaled_mse"], ["cpu", "cuda"])
    param_names = ["loss", "device"]

    def setup(self, loss, device):
        self.device = _device(device)
        gen = torch.Generator().manual_seed(0)
        rows, dim, num_classes = 4096, 256, 8192
        self.features = torch.randn(rows, dim, generator=gen).to(self.device).requires_grad_(True)
        self.weight = (torch.randn(num_classes, dim, generator=gen) / dim**0.5).to(self.device).requires_grad_(True)
        self.target = torch.randint(0, num_classes, (rows,), generator=gen).to(self.device)
        self.function = getattr(ncfast, "linear_" + loss)

    def time_forward_backward(self, loss, device):
        self.function(self.features, self.weight, None, self.target).backward()
        _sync(self.device)
