"""The trainer's networks: ``features(x)`` gives the (N, d) penultimate features, ``classifier``
is an ``nn.Linear`` or a fixed :class:`ncfast.ETFClassifier`."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..geometry import ETFClassifier

MODELS = ("mlp", "resnet18")


def _classifier(dim: int, num_classes: int, fixed_etf: bool, bias: bool) -> nn.Module:
    return ETFClassifier(dim, num_classes, bias=bias) if fixed_etf else nn.Linear(dim, num_classes, bias=bias)


class MLP(nn.Module):
    """Flatten -> [Linear(width) -> BatchNorm -> ReLU] × depth -> Linear(d) -> ReLU -> classifier.

    ``features`` are the d-dimensional post-ReLU activations (the penultimate layer of
    Zhu et al., NeurIPS 2021)."""

    def __init__(self, in_features: int, num_classes: int, feature_dim: int = 64, width: int = 256,
                 depth: int = 2, fixed_etf: bool = False, bias: bool = True, batch_norm: bool = True):
        super().__init__()
        layers, size = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width)] + ([nn.BatchNorm1d(width)] if batch_norm else []) + [nn.ReLU()]
            size = width
        layers += [nn.Linear(size, feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.classifier = _classifier(feature_dim, num_classes, fixed_etf, bias)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18, CIFAR variant (3×3 stem, no max-pool; He et al. 2016 §4.2 layout with
    [2, 2, 2, 2] basic blocks), channels 64·w, 128·w, 256·w, 512·w for width multiplier w.
    Global average pooling gives 512·w features; with ``feature_dim`` set, a Linear + ReLU
    maps them to d (Zhu et al., NeurIPS 2021, use d = K)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 feature_dim: Optional[int] = None, fixed_etf: bool = False, bias: bool = True):
        super().__init__()
        channels = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, size = [], channels[0]
        for index, c in enumerate(channels):
            for block in range(2):
                blocks.append(_BasicBlock(size, c, 2 if (block == 0 and index > 0) else 1))
                size = c
        self.blocks = nn.Sequential(*blocks)
        self.head = (nn.Sequential(nn.Linear(size, feature_dim), nn.ReLU())
                     if feature_dim else nn.Identity())
        self.classifier = _classifier(feature_dim or size, num_classes, fixed_etf, bias)

    def features(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_model(name: str, input_shape: tuple, num_classes: int, feature_dim: Optional[int] = None,
                width: float = 1.0, depth: int = 2, fixed_etf: bool = False, bias: bool = True,
                batch_norm: bool = True) -> nn.Module:
    """"mlp" (hidden width 256·w, ``depth`` hidden layers, d default 64) or "resnet18" (inputs
    (C, H, W); MLP-shaped inputs are rejected)."""
    if name == "mlp":
        return MLP(int(np.prod(input_shape)), num_classes, feature_dim or 64, max(1, int(round(256 * width))),
                   depth, fixed_etf, bias, batch_norm)
    if name == "resnet18":
        if len(input_shape) != 3:
            raise ValueError(f"model: resnet18 needs image inputs (C, H, W), the data has shape {input_shape}")
        return ResNet18(num_classes, input_shape[0], width, feature_dim, fixed_etf, bias)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
