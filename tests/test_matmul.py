import pytest
import torch

from ncfast._matmul import mm, mm_t


def _layouts(x):
    yield x
    yield x.T.contiguous().T  # column-major
    yield torch.cat([x, x], 1)[:, : x.shape[1]]  # row stride larger than the width
    spread = x.new_zeros(x.shape[0], 2 * x.shape[1])
    spread[:, ::2] = x
    yield spread[:, ::2]  # no unit stride


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 300), (300, 77, 50), (0, 8, 3), (4, 0, 3), (5, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mm_t_matches_float64(shape, dtype):
    m, d, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, d, generator=g).to(dtype)
    b = torch.randn(n, d, generator=g).to(dtype)
    exact = a.double() @ b.double().T
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype] * max(d, 1) ** 0.5
    for x in _layouts(a):
        for y in _layouts(b):
            out = mm_t(x, y)
            assert out.shape == (m, n) and out.dtype == dtype
            torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(mm(a, b.T).double(), exact, rtol=tol, atol=tol)


def test_mm_t_keeps_autograd():
    a = torch.randn(6, 4, dtype=torch.float32, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float32)
    mm_t(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(0).expand(6, 4))


def test_mm_t_is_deterministic_across_threads():
    a, b = torch.randn(513, 257), torch.randn(129, 257)
    threads = torch.get_num_threads()
    first = mm_t(a, b)
    try:
        torch.set_num_threads(1)
        assert torch.equal(mm_t(a, b), first)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(mm_t(a, b), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mm_t_adds_the_bias(dtype):
    g = torch.Generator().manual_seed(1)
    a, b, bias = (torch.randn(*shape, generator=g).to(dtype) for shape in ((37, 19), (41, 19), (41,)))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    exact = a.double() @ b.double().T + bias.double()
    for x in _layouts(a):
        out = mm_t(x, b, bias)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    # A bias that needs autograd keeps it (torch's product).
    leaf = bias.clone().requires_grad_(True)
    mm_t(a, b, leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full_like(bias, 37.0))
