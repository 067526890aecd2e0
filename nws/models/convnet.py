"""A small convnet for tiny inputs (e.g. 8x8 one-channel digits), fast enough for tests and demos."""
from __future__ import annotations

import torch
from torch import nn

from nws.models.registry import register_model


class ConvNet(nn.Module):
    """Stages of 3x3 conv-BN-ReLU with a 2x2 max-pool between stages, global average pool and ``fc``.

    Our own demo model, built like the reference's networks: no conv or classifier bias, so a task's only
    float parameters are BatchNorm's; no dropout.
    """

    classifier_name = "fc"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def convnet(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> ConvNet:
    """Small convnet; with default widths it has three stages and two max-pools (8x8 -> 2x2)."""
    return ConvNet(num_classes, in_channels, tuple(widths))
