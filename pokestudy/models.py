"""The report's two architectures, built from one registry: width, dropout and resolution are arguments."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


def cnn(num_classes: int, width: int = 16, res: int = 64, dropout: float = 0.0) -> nn.Module:
    """5 blocks of conv → BN → ReLU → max-pool, flattened into one linear layer (as in the report).

    Channels double up to 8x width; the flatten head makes the classifier grow with resolution,
    which is part of why this model can memorise.
    """
    chans = [3] + [width * m for m in (1, 2, 4, 8, 8)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans, chans[1:]):
        layers += [*conv_bn(cin, cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    side = res // 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1] * side * side, num_classes))


class Residual(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the input (projected where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(num_classes: int, width: int = 16, res: int = 64, dropout: float = 0.0) -> nn.Module:
    """A stride-2 stem, then 4 residual stages (width x 1, 2, 4, 8), global pooling, linear head."""
    chans = [width * m for m in (1, 2, 4, 8)]
    stages = [Residual(cin, cout, 1 if i == 0 else 2) for i, (cin, cout) in enumerate(zip([width] + chans, chans))]
    return nn.Sequential(*conv_bn(3, width, 2), nn.ReLU(inplace=True), *stages,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1], num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": cnn, "resnet": resnet}
MIN_RES = 32  # five 2x poolings need at least 32 px: the bound for data, specs and trials alike
