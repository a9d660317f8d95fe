"""The trainer's networks: the MLP and the CIFAR ResNet18, with a learned or fixed simplex-ETF classifier."""

import pytest
import torch

import ncfast
from ncfast import training as T


@pytest.mark.parametrize("model,shape", [("mlp", (64,)), ("resnet18", (3, 8, 8))])
@pytest.mark.parametrize("bias", [True, False])
def test_fixed_etf_removes_exactly_kd_parameters(model, shape, bias):
    K, d = 10, 12
    learned = T.build_model(model, shape, K, feature_dim=d, width=0.125, bias=bias)
    fixed = T.build_model(model, shape, K, feature_dim=d, width=0.125, bias=bias, fixed_etf=True)
    assert T.trainable_parameters(learned) - T.trainable_parameters(fixed) == K * d
    x = torch.randn(5, *shape)
    assert fixed(x).shape == (5, K) and fixed.features(x).shape == (5, d)
    torch.testing.assert_close(fixed.classifier.weight, ncfast.simplex_etf(K, d))


def test_resnet18_is_the_cifar_variant():
    net = T.ResNet18(10, width=1.0)
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    assert len(net.blocks) == 8 and net.classifier.in_features == 512
    # 11.17M parameters, the published CIFAR ResNet18 size
    assert 11_150_000 < T.trainable_parameters(net) < 11_200_000
