"""simplex_etf and ETFClassifier against the definition (Zhu et al., NeurIPS 2021, §4.3, footnote 14)."""

import math

import pytest
import torch

import ncfast


def _check_etf(weight: torch.Tensor, num_classes: int):
    gram = weight.double() @ weight.double().T
    expected = num_classes / (num_classes - 1) * (torch.eye(num_classes, dtype=torch.float64) - 1 / num_classes)
    torch.testing.assert_close(gram, expected, atol=1e-12, rtol=0)
    # equal norms, pairwise cosine −1/(K−1), centred
    torch.testing.assert_close(weight.double().norm(dim=1), torch.ones(num_classes, dtype=torch.float64))
    cos = gram[~torch.eye(num_classes, dtype=torch.bool)]
    assert torch.allclose(cos, torch.full_like(cos, -1 / (num_classes - 1)), atol=1e-12)
    assert weight.double().sum(0).abs().max() < 1e-12


@pytest.mark.parametrize("num_classes,dim", [(2, 2), (3, 7), (10, 10), (10, 512), (7, 6), (2, 1)])
@pytest.mark.parametrize("random_basis", [False, True])
def test_simplex_etf_geometry(num_classes, dim, random_basis):
    gen = torch.Generator().manual_seed(3)
    weight = ncfast.simplex_etf(num_classes, dim, random_basis=random_basis, generator=gen,
                                dtype=torch.float64)
    assert weight.shape == (num_classes, dim)
    _check_etf(weight, num_classes)


def test_simplex_etf_matches_footnote_formula():
    # Zhu et al. (NeurIPS 2021) footnote 14 with P = first K columns of I_d
    K, d = 4, 6
    P = torch.eye(d, K, dtype=torch.float64)
    expected_t = math.sqrt(K / (K - 1)) * P @ (torch.eye(K, dtype=torch.float64) - torch.ones(K, K) / K)
    torch.testing.assert_close(ncfast.simplex_etf(K, d, dtype=torch.float64), expected_t.T)


def test_random_basis_is_seeded_and_differs():
    a = ncfast.simplex_etf(5, 9, random_basis=True, generator=torch.Generator().manual_seed(1))
    b = ncfast.simplex_etf(5, 9, random_basis=True, generator=torch.Generator().manual_seed(1))
    c = ncfast.simplex_etf(5, 9, random_basis=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.dtype == torch.float32


@pytest.mark.parametrize("num_classes,dim", [(1, 4), (5, 3), (2.0, 3)])
def test_simplex_etf_rejects_bad_sizes(num_classes, dim):
    with pytest.raises(ValueError, match="num_classes|dim"):
        ncfast.simplex_etf(num_classes, dim)


@pytest.mark.parametrize("bias", [True, False])
def test_etf_classifier(bias):
    K, d = 10, 16
    layer = ncfast.ETFClassifier(d, K, bias=bias)
    learned = torch.nn.Linear(d, K, bias=bias)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in learned.parameters()) - K * d
    assert "weight" in dict(layer.named_buffers()) and "weight" in layer.state_dict()
    h = torch.randn(13, d)
    expected = h @ ncfast.simplex_etf(K, d).T
    out = layer(h)
    torch.testing.assert_close(out, expected)
    if bias:
        out.sum().backward()
        torch.testing.assert_close(layer.bias.grad, torch.full((K,), 13.0))
    assert layer.to(torch.float64).weight.dtype == torch.float64
