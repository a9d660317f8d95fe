"""Fused loss forward + backward: ncfast against torch eager, torch.compile and a copy of the
logits (CPU), over the shapes classifiers train with.

The memory floor of a fused loss is one read and one write of the logits: ``track_over_clone``
reports a case's time as a multiple of a clone of the logits (a fresh buffer, as the fused
loss's gradient is), ``track_over_copy`` as a multiple of a copy into a preallocated buffer (a
clone without the page faults of a fresh allocation, which a warm caching allocator does not
pay either), each timed in interleaved rounds of the same process. Run:
``cd benchmarks && asv run --python=same --bench bench_losses``; the whole table as one markdown
table: ``python benchmarks/loss_acceptance.py``.

The torch formulas here are also what ``loss_acceptance.py`` compiles and runs eagerly."""

import time

import torch
import torch.nn.functional as F

import ncfast

#: Logit shapes (N, K) and (N, K, d1, ...): tiny-K vision heads, mid-K, LLM vocabularies,
#: NCHW segmentation (Cityscapes-like 19 classes, ADE20K-like 150 classes).
SHAPES = [
    "3200000x10", "1000000x2", "320000x100", "32000x1000", "4096x32000", "256x262144",
    "8x19x256x256", "4x150x128x128",
]
#: The per-call case: one small training step, timed with one thread (``LossPerCall``).
PER_CALL_SHAPE = "128x10"
DTYPES = ["float32", "bfloat16"]
LOSSES = ["cross_entropy", "focal", "rescaled_mse"]
FOCAL_GAMMA = 3.0
MSE_KAPPA, MSE_BETA = 1.0, 15.0


def parse_shape(shape):
    """``"8x19x256x256"`` → ``(8, 19, 256, 256)``; the class dimension is the second."""
    return tuple(int(size) for size in shape.split("x"))


def make_inputs(shape, dtype, seed=0):
    """Seeded logits (standard normal, in ``dtype``) and class indices for ``shape``."""
    shape = parse_shape(shape)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator).to(getattr(torch, dtype))
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=generator)
    return logits, target


def eager_focal(logits, target, gamma=FOCAL_GAMMA):
    """Focal loss −(1 − p_y)^γ log p_y, mean over samples, written in torch ops."""
    log_p = torch.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def eager_rescaled_mse(logits, target, kappa=MSE_KAPPA, beta=MSE_BETA):
    """Rescaled MSE κ(z_y − β)² + Σ_{j≠y} z_j², mean over samples, written in torch ops."""
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    scaled = 1 + (kappa - 1) * one_hot
    return (scaled * (logits - beta * one_hot) ** 2).sum(dim=1).mean()


#: The torch formula of each loss (what eager runs and torch.compile compiles).
TORCH_FORMULAS = {"cross_entropy": F.cross_entropy, "focal": eager_focal, "rescaled_mse": eager_rescaled_mse}


def ncfast_loss(loss, inplace_backward=False):
    """The ncfast function of ``loss`` with the benchmark's options (γ=3; κ=1, β=15)."""
    options = {"cross_entropy": {}, "focal": {"gamma": FOCAL_GAMMA},
               "rescaled_mse": {"kappa": MSE_KAPPA, "beta": MSE_BETA}}[loss]
    function = {"cross_entropy": ncfast.cross_entropy, "focal": ncfast.focal_loss,
                "rescaled_mse": ncfast.rescaled_mse}[loss]
    return lambda logits, target: function(logits, target, inplace_backward=inplace_backward, **options)


IMPLEMENTATIONS = ["ncfast", "ncfast_inplace", "torch_eager", "torch_compile"]


def loss_step(loss, implementation, logits, target):
    """A closure running one forward + backward of ``implementation`` on a fresh leaf.

    ``torch_compile`` is compiled for this shape alone (``dynamic=False``); the caller runs
    the closure once to compile. In-place needs a fresh leaf each call; its copy is part of
    what it costs the user."""
    if implementation.startswith("ncfast"):
        function = ncfast_loss(loss, inplace_backward=implementation == "ncfast_inplace")
    elif implementation == "torch_compile":
        function = torch.compile(TORCH_FORMULAS[loss], dynamic=False)
    else:
        function = TORCH_FORMULAS[loss]
    inplace = implementation == "ncfast_inplace"

    def step():
        leaf = (logits.clone() if inplace else logits.detach()).requires_grad_(True)
        function(leaf, target).backward()

    return step


def logits_copy(logits):
    """A closure copying ``logits`` into a buffer allocated once: the memory floor."""
    out = torch.empty_like(logits)
    return lambda: out.copy_(logits)


def interleaved_ratio(numerator, denominator, rounds=7, calls=1):
    """Median over ``rounds`` of time(numerator) / time(denominator), the two timed back to
    back in each round (``calls`` calls each), so a slow spell of the machine weighs on both."""
    ratios = []
    for _ in range(rounds):
        seconds = []
        for function in (denominator, numerator):
            start = time.perf_counter()
            for _ in range(calls):
                function()
            seconds.append(time.perf_counter() - start)
        ratios.append(seconds[1] / seconds[0])
    return sorted(ratios)[len(ratios) // 2]


class LossForwardBackward:
    """Forward + backward of each loss and implementation at the shapes of :data:`SHAPES`."""

    params = (LOSSES, IMPLEMENTATIONS, SHAPES, DTYPES)
    param_names = ["loss", "implementation", "shape", "dtype"]
    timeout = 600

    def setup(self, loss, implementation, shape, dtype):
        torch._dynamo.reset()  # a fresh compile cache: no recompile limit across shapes
        self.logits, self.target = make_inputs(shape, dtype)
        self.step = loss_step(loss, implementation, self.logits, self.target)
        self.step()  # warm-up (compilation)

    def time_forward_backward(self, *params):
        self.step()

    def peakmem_forward_backward(self, *params):
        self.step()

    def track_over_copy(self, *params):
        return interleaved_ratio(self.step, logits_copy(self.logits))

    track_over_copy.unit = "× copy"

    def track_over_clone(self, *params):
        return interleaved_ratio(self.step, self.logits.clone)

    track_over_clone.unit = "× clone"


class LossPerCall:
    """One small training step (128 × 10 logits, float32, one thread): the per-call cost of
    the Python path and the kernel launch, against ``F.cross_entropy`` and friends."""

    params = (LOSSES, ["ncfast", "torch_eager"])
    param_names = ["loss", "implementation"]

    def setup(self, loss, implementation):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.logits, self.target = make_inputs(PER_CALL_SHAPE, "float32")
        self.step = loss_step(loss, implementation, self.logits, self.target)
        self.step()

    def teardown(self, *params):
        torch.set_num_threads(self.threads)

    def time_forward_backward(self, *params):
        self.step()


class CopiedLogits:
    """The memory floor: a copy of the logits into a preallocated buffer (one read, one write)."""

    params = (SHAPES, DTYPES)
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        logits, _ = make_inputs(shape, dtype)
        self.copy = logits_copy(logits)

    def time_copy(self, shape, dtype):
        self.copy()


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the Triton kernel against torch eager / torch.compile, and the
# kernel's effective bandwidth against the HBM floor (one read + one write per logit).
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = ["16384x4096", "4096x32000", "1024x131072", "256x262144"]


def _cuda_or_skip():
    if not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA device")  # asv: skipped


class GPULossForwardBackward:
    params = (LOSSES, IMPLEMENTATIONS, GPU_SHAPES, DTYPES)
    param_names = ["loss", "implementation", "shape", "dtype"]
    timeout = 600

    def setup(self, loss, implementation, shape, dtype):
        _cuda_or_skip()
        torch._dynamo.reset()
        logits, target = make_inputs(shape, dtype)
        self.step = loss_step(loss, implementation, logits.cuda(), target.cuda())
        self.step()  # warm-up: compilation, autotuning
        torch.cuda.synchronize()

    def time_forward_backward(self, *params):
        self.step()
        torch.cuda.synchronize()

    def peakmem_forward_backward(self, *params):
        self.step()


class GPUKernelBandwidth:
    """The Triton kernel alone (no autograd), in place: effective TB/s counting the minimum
    traffic, one read and one write of the logits (H100 SXM HBM3 ≈ 3.35 TB/s). Rows longer than
    ``MAX_BLOCK`` are read twice, so their ceiling is 2/3 of the HBM rate."""

    params = (LOSSES, GPU_SHAPES, DTYPES)
    param_names = ["loss", "shape", "dtype"]
    timeout = 600

    def setup(self, loss, shape, dtype):
        _cuda_or_skip()
        from ncfast.losses import LOSSES as KERNEL_LOSSES
        from ncfast.triton_kernels import losses as kernels

        logits, target = make_inputs(shape, dtype)
        self.logits, self.target = logits.cuda(), target.cuda()
        params = {"label_smoothing": 0.0, "gamma": FOCAL_GAMMA, "kappa": MSE_KAPPA, "beta": MSE_BETA}
        self.call = lambda: kernels.loss_forward(self.logits, self.target, None, None, self.logits,
                                                 KERNEL_LOSSES.index(loss), params, -100, True)
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
