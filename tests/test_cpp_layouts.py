"""The C++ losses on the shapes that go a tile of positions at a time: short rows (K up to the
tile threshold and past it) and class-strided (N, K, d1, ...) logits read in place, with
non-contiguous strides and inplace_backward; against the float64 reference, with bit-identical
results across thread counts; and a scratch allocation that fails raises MemoryError."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ncfast
from ncfast.loss_options import LossOptions
from ncfast.reference import losses as reference
from tolerances import LOSS

pytestmark = pytest.mark.skipif("cpp" not in ncfast.available_backends(), reason="needs the compiled C++ kernels")

# Every loss and option; softcap and the z-loss are cross-entropy options.
OPTIONS = [
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.1}),
    ("cross_entropy", {"lse_square_scale": 1e-2, "softcap": 5.0}),
    ("focal", {"gamma": 3.0, "alpha": "tensor"}),
    ("focal", {"gamma": 0.0}),
    ("rescaled_mse", {"kappa": 3.0, "beta": 2.0}),
]
PUBLIC = {"cross_entropy": ncfast.cross_entropy, "focal": ncfast.focal_loss, "rescaled_mse": ncfast.rescaled_mse}
DEFAULTS = {"label_smoothing": 0.0, "gamma": 2.0, "kappa": 1.0, "beta": 1.0, "lse_square_scale": 0.0, "softcap": 0.0}


def _options(options, k):
    options = dict(options)
    if options.get("alpha") == "tensor":
        options["alpha"] = torch.linspace(0.25, 1.0, k, dtype=torch.float64)
    return options


def expected_rows_and_grad(loss, logits, target, weight, options, class_dim=1):
    """float64 reference on logits with the classes at ``class_dim``: per-sample loss and the
    gradient of their sum, in the logits' shape."""
    z = logits.double().movedim(class_dim, -1)
    flat = z.reshape(-1, z.shape[-1])
    params = {**DEFAULTS, **{k: v for k, v in options.items() if k != "alpha"}}
    rows, grad, lse = reference.rows_and_grad(loss, flat, target.reshape(-1), weight, options.get("alpha"), **params)
    return rows.reshape(target.shape), grad.reshape(z.shape).movedim(-1, class_dim), lse.reshape(target.shape)


def run(loss, logits, target, weight, options, **kwargs):
    """ncfast per-sample losses and the gradient of their sum, on the C++ backend."""
    x = logits.detach().clone().requires_grad_(True)
    with ncfast.use_backend("cpp"):
        value = PUBLIC[loss](x, target, weight=weight, reduction="none", **options, **kwargs)
    value.sum().backward()
    return value.detach(), x.grad


def assert_close(actual, expected, dtype):
    tol = LOSS[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True)


def inputs(shape, dtype, ignore=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    target_shape = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, shape[1], target_shape, generator=generator)
    if ignore and target.numel() > 2:
        target.view(-1)[::5] = -100
    return logits, target


def check_against_float64(loss, logits, target, options, weight=None):
    """ncfast's per-sample losses and gradient (C++ backend) against the float64 reference, with
    the tolerance of the logits' dtype; ``weight`` float64 (K,) or None."""
    options = _options(options, logits.shape[1])
    rows, grad, _ = expected_rows_and_grad(loss, logits, target, weight, options)
    value, actual = run(loss, logits, target, None if weight is None else weight.float(), options)
    assert actual.dtype == logits.dtype
    assert_close(value, rows, logits.dtype)
    assert_close(actual, grad, logits.dtype)


# ---------------------------------------------------------------------------- short rows
@pytest.mark.parametrize("k", [2, 3, 10, 31, 64, 65, 100, 101, 128, 129, 200, 300])
@pytest.mark.parametrize("loss,options", OPTIONS)
def test_short_rows_match_float64(k, loss, options):
    # 70 rows: two full tiles of 32 and a partial one.
    logits, target = inputs((70, k), torch.float32)
    check_against_float64(loss, logits, target, options, torch.rand(k, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("k", [12, 37])  # 37: two blocks of 16 classes transposed in registers, and 5 more
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss,options", [OPTIONS[1], OPTIONS[3], OPTIONS[5]])
def test_short_rows_other_dtypes(k, dtype, loss, options):
    logits, target = inputs((45, k), dtype)
    check_against_float64(loss, logits, target, options)


def test_short_rows_lse_and_masked_classes():
    logits, target = inputs((40, 6), torch.float32)
    logits[3, :] = float("nan")
    logits[4, 2] = float("-inf")
    target[4] = 1
    with ncfast.use_backend("cpp"):
        value, lse = ncfast.cross_entropy(logits, target, reduction="none", return_lse=True)
    rows, _, expected_lse = expected_rows_and_grad("cross_entropy", logits, target, None, {})
    assert_close(value, rows, torch.float32)
    assert_close(lse, expected_lse, torch.float32)
    assert torch.isnan(value[3]) and torch.isfinite(value[4])


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("loss,options", OPTIONS)
def test_short_rows_strided_rows_and_targets(k, loss, options):
    """Rows further apart than K (a slice of wider logits) and every other target."""
    wide, _ = inputs((70, k + 5), torch.float32, seed=5)
    _, targets = inputs((140, k), torch.float32, seed=6)
    logits, target = wide[:, 2:k + 2], targets[::2]
    assert logits.stride() == (k + 5, 1) and target.stride() == (2,)
    check_against_float64(loss, logits, target, options, torch.rand(k, dtype=torch.float64) + 0.5)


def test_gradient_of_32_mib_and_more():
    """A gradient buffer of 32 MiB or more (given transparent huge pages where the system grants
    them) holds the same values: short rows, long rows and class-strided positions."""
    for shape in [(840000, 10), (65, 130000), (2, 19, 480, 480)]:
        logits, target = inputs(shape, torch.float32, seed=7)
        assert logits.numel() * 4 >= 32 << 20
        check_against_float64("cross_entropy", logits, target, {"label_smoothing": 0.1})


def _huge_pages_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _huge_page_eligible(address: int) -> bool:
    """Whether the mapping holding ``address`` may get transparent huge pages (Linux smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                low, high = (int(part, 16) for part in first.split("-"))
                inside = low <= address < high
            elif inside and first == "THPeligible:":
                return line.split()[1] == "1"
    return False


@pytest.mark.skipif(not _huge_pages_on_request(), reason="needs Linux transparent huge pages (madvise or always)")
@pytest.mark.parametrize("contiguous", [True, False])
def test_fresh_large_gradient_may_take_huge_pages(contiguous):
    """A gradient of 32 MiB or more is allocated with the request for huge pages (the workspace
    for contiguous logits, a buffer of their layout otherwise)."""
    logits, target = inputs((840000, 10), torch.float32, ignore=False)
    if not contiguous:
        logits = logits.t().contiguous().t()
    logits.requires_grad_()
    with ncfast.use_backend("cpp"):
        ncfast.cross_entropy(logits, target).backward()
    assert logits.grad.is_contiguous() == contiguous
    assert _huge_page_eligible(logits.grad.data_ptr() + (4 << 20))


@pytest.mark.parametrize("shape", [(0, 5), (1, 5), (33, 1), (0, 3, 4, 4), (1, 1, 3, 3), (2, 5, 0), (2, 3, 0, 4)])
def test_edge_shapes(shape):
    logits, target = inputs(shape, torch.float32, ignore=False)
    for loss, options in OPTIONS:
        options = _options(options, shape[1])
        rows, grad, _ = expected_rows_and_grad(loss, logits, target, None, options)
        value, actual = run(loss, logits, target, None, options)
        assert value.shape == target.shape and actual.shape == logits.shape
        assert_close(value, rows, torch.float32)
        assert_close(actual, grad, torch.float32)


# ---------------------------------------------------------------------------- class-strided
def _layouts(k):
    """(logits, target) pairs whose classes are not the last, contiguous dimension."""
    nchw, nchw_target = inputs((2, k, 9, 11), torch.float32, seed=1)
    tokens, tokens_target = inputs((3, k, 37), torch.float32, seed=2)
    wide, wide_target = inputs((2, k + 3, 8, 12), torch.float32, seed=3)
    by_class, by_class_target = inputs((k, 50), torch.float32, seed=4)
    return {
        "nchw": (nchw, nchw_target),
        "tokens": (tokens, tokens_target),
        "channels_last": (nchw.contiguous(memory_format=torch.channels_last), nchw_target),
        # Slices of the classes and of the width.
        "sliced": (wide[:, 1:k + 1, :, ::2], torch.where(wide_target >= 0, wide_target % k, wide_target)[:, :, ::2]),
        "transposed_rows": (by_class.t(), by_class_target[0]),  # (N, K) with stride (1, N)
    }


@pytest.mark.parametrize("k", [3, 19, 150])
@pytest.mark.parametrize("layout", ["nchw", "tokens", "channels_last", "sliced", "transposed_rows"])
@pytest.mark.parametrize("loss,options", OPTIONS)
def test_class_strided_match_float64(k, layout, loss, options):
    logits, target = _layouts(k)[layout]
    if layout == "transposed_rows":
        target = torch.randint(0, k, (logits.shape[0],), generator=torch.Generator().manual_seed(5))
    check_against_float64(loss, logits, target, options, torch.rand(k, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("layout", ["nchw", "tokens", "channels_last", "sliced"])
def test_class_strided_read_in_place(layout):
    """The op sees a (B, K, S) view of the caller's storage, and its gradient has the logits'
    layout: no transposed copy in or out."""
    from ncfast.losses import _as_rows

    logits, target = _layouts(19)[layout]
    view, view_target, _ = _as_rows(logits, target)
    assert view.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    options = LossOptions("cross_entropy", gamma=2.0, kappa=1.0, beta=1.0, reduction="sum")
    value, grad, lse = torch.ops.ncfast.fused_loss(view, view_target, None, None, *options)
    if view.is_contiguous() or view.is_contiguous(memory_format=torch.channels_last):
        assert grad.stride() == view.stride()
    rows, expected, expected_lse = expected_rows_and_grad("cross_entropy", logits, target, None, {})
    assert_close(value, rows.sum(), torch.float32)
    assert_close(grad, expected.reshape(view.shape), torch.float32)
    assert_close(lse, expected_lse.reshape(-1), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "tokens", "channels_last", "sliced"])
@pytest.mark.parametrize("loss,options", [OPTIONS[0], OPTIONS[3], OPTIONS[5]])
def test_class_strided_inplace_backward(layout, loss, options):
    logits, target = _layouts(19)[layout]
    options = _options(options, 19)
    expected_value, expected_grad = run(loss, logits, target, None, options)
    base = logits.detach().clone()
    x = base.requires_grad_(True) if layout != "sliced" else base
    if layout == "sliced":  # the gradient lands in the slice of a larger tensor
        wide = torch.zeros(2, 22, 8, 12)
        wide[:, 1:20, :, ::2] = logits
        x = wide[:, 1:20, :, ::2].requires_grad_(True)
    with ncfast.use_backend("cpp"):
        value = PUBLIC[loss](x, target, reduction="none", inplace_backward=True, **options)
    value.sum().backward()
    torch.testing.assert_close(value.detach(), expected_value)
    torch.testing.assert_close(x.grad, expected_grad)
    torch.testing.assert_close(x.detach(), expected_grad)  # the storage holds the gradient


# Class-strided (B, K, S) logits go a block of positions along s at a time (1024 positions for
# K = 19, 256 for K = 150, 32 for K = 2000): S at, below and above a block, a partial block in
# each b, S = 2 and 3, and a K whose block is the minimum.
BLOCK_EDGES = [(2, 19, 1024), (2, 19, 1023), (3, 19, 1025), (2, 19, 2049), (4, 3, 2), (3, 7, 3), (2, 150, 257),
               (2, 150, 255), (2, 2000, 40)]


@pytest.mark.parametrize("shape", BLOCK_EDGES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("loss,options", OPTIONS)
def test_class_strided_block_edges_match_float64(shape, loss, options):
    logits, target = inputs(shape, torch.float32, seed=shape[2])
    check_against_float64(loss, logits, target, options, torch.rand(shape[1], dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss,options", [OPTIONS[0], OPTIONS[3], OPTIONS[5]])
def test_class_strided_other_dtypes(dtype, loss, options):
    logits, target = inputs((2, 19, 1030), dtype, seed=7)
    check_against_float64(loss, logits, target, options)


@pytest.mark.parametrize("shape", [(3, 19, 1025), (2, 2000, 40)], ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("loss,options", [OPTIONS[2], OPTIONS[3], OPTIONS[5]])
def test_class_strided_block_edges_inplace_backward(shape, loss, options):
    logits, target = inputs(shape, torch.float32, seed=11)
    options = _options(options, shape[1])
    expected_value, expected_grad = run(loss, logits, target, None, options)
    x = logits.clone().requires_grad_(True)
    with ncfast.use_backend("cpp"):
        value = PUBLIC[loss](x, target, reduction="none", inplace_backward=True, **options)
    value.sum().backward()
    torch.testing.assert_close(value.detach(), expected_value)
    torch.testing.assert_close(x.grad, expected_grad)
    torch.testing.assert_close(x.detach(), expected_grad)


def test_class_strided_non_finite_and_ignored_positions():
    """A NaN or +inf logit makes its own position's loss and gradient NaN, and no other's; an
    ignored position has loss 0 and gradient 0 even with NaN logits."""
    logits, target = inputs((2, 19, 1030), torch.float32, ignore=False, seed=3)
    logits[0, 4, 7] = float("nan")
    logits[1, 0, 1029] = float("inf")
    logits[0, :, 900] = float("nan")
    target[0, 900] = -100
    value, grad = run("cross_entropy", logits, target, None, {})
    bad = torch.zeros_like(target, dtype=torch.bool)
    bad[0, 7] = bad[1, 1029] = True
    assert torch.isnan(value[bad]).all() and torch.isnan(grad[0, :, 7]).all() and torch.isnan(grad[1, :, 1029]).all()
    assert value[0, 900] == 0 and (grad[0, :, 900] == 0).all()
    finite = ~bad
    finite[0, 900] = False
    rows, expected, _ = expected_rows_and_grad("cross_entropy", logits, target, None, {})
    assert_close(value[finite], rows[finite], torch.float32)
    assert_close(grad.movedim(1, -1)[finite], expected.movedim(1, -1)[finite], torch.float32)


# ---------------------------------------------------------------------------- determinism
THREAD_CASES = {
    "short_rows": ((20000, 10), {"label_smoothing": 0.1}),
    "class_strided": ((2, 19, 64, 64), {}),
    # Blocks of 1024 positions with a partial one in each b, enough logits for two threads.
    "class_strided_partial_blocks": ((3, 40, 1100), {"label_smoothing": 0.1}),
    "channels_last": ((2, 19, 64, 64), {"lse_square_scale": 1e-3}),
}


def _thread_case(name):
    shape, options = THREAD_CASES[name]
    logits, target = inputs(shape, torch.float32)
    if name == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    return logits, target, options


def _both(name):
    logits, target, options = _thread_case(name)
    weight = torch.linspace(0.5, 2.0, logits.shape[1])
    return run("cross_entropy", logits, target, weight, options)


@pytest.mark.parametrize("name", list(THREAD_CASES))
def test_thread_count_does_not_change_bits(name):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _both(name)
        torch.set_num_threads(2)
        parallel = _both(name)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


def test_omp_num_threads_one_gives_the_same_bits(tmp_path):
    out = tmp_path / "serial.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_cpp_layouts
        torch.save({{name: test_cpp_layouts._both(name) for name in test_cpp_layouts.THREAD_CASES}}, {str(out)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    serial = torch.load(out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for name in THREAD_CASES:
            parallel = _both(name)
            assert torch.equal(serial[name][0], parallel[0]) and torch.equal(serial[name][1], parallel[1]), name
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the target check
# The targets are checked, counted and their class weights summed in chunks of 32768 positions
# in parallel: (N,) targets and class-strided (B, S) ones whose b change inside a chunk, with
# strided targets, over several chunks.
TARGET_CASES = {
    "rows": ((100003, 3), False),
    "rows_strided_targets": ((70001, 3), True),
    "class_strided": ((3, 5, 30001), False),
    "class_strided_strided_targets": ((3, 5, 30001), True),
}


def _weighted_mean(name):
    (shape, strided_targets) = TARGET_CASES[name]
    logits, target = inputs(shape, torch.float32, seed=3)
    if strided_targets:  # the same values, every other element of a larger buffer
        target = torch.stack([target, torch.zeros_like(target)], dim=-1)[..., 0]
        assert not target.is_contiguous()
    weight = torch.linspace(0.5, 2.0, shape[1])
    with ncfast.use_backend("cpp"):
        return ncfast.cross_entropy(logits, target, weight=weight), logits, target, weight


@pytest.mark.parametrize("name", list(TARGET_CASES))
def test_weighted_mean_over_chunks_of_targets(name):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, logits, target, weight = _weighted_mean(name)
        torch.set_num_threads(2)
        parallel = _weighted_mean(name)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    expected = torch.nn.functional.cross_entropy(logits.double(), target, weight=weight.double())
    assert_close(serial, expected, torch.float32)


@pytest.mark.parametrize("shape,position", [((100000, 4), 70001), ((3, 4, 30000), 2 * 30000 + 17)],
                         ids=["rows", "class_strided"])
def test_out_of_range_target_past_the_first_chunk(shape, position):
    logits, target = inputs(shape, torch.float32, ignore=False)
    target.view(-1)[position] = shape[1]
    target.view(-1)[position + 5] = -3  # a later bad value: the first one is reported
    with ncfast.use_backend("cpp"), pytest.raises(ValueError, match=f"target: value {shape[1]} at index {position} "):
        ncfast.cross_entropy(logits, target)


# ---------------------------------------------------------------------------- allocation failure
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves its shadow memory against the address-space limit")
def test_scratch_allocation_failure_raises_memory_error():
    """A per-thread scratch that cannot be allocated raises MemoryError and the process goes on
    (it used to abort inside the parallel region)."""
    script = textwrap.dedent("""
        import resource, torch, ncfast
        torch.set_num_threads(1)
        # Class-strided, 2^22 classes and 2 positions: 32 MiB of logits, ~1 GiB of tile scratch.
        logits = torch.randn(1, 1 << 22, 2)
        target = torch.zeros(1, 2, dtype=torch.int64)
        with ncfast.use_backend("cpp"):
            ncfast.cross_entropy(logits[:, :8], target)  # warm: libraries and threads in place
            with open("/proc/self/status") as status:
                vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + (384 << 20), resource.RLIM_INFINITY))
            try:
                ncfast.cross_entropy(logits, target)
            except MemoryError:
                print("MemoryError")
        print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MemoryError", "still", "running"]
