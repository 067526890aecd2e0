"""ResNet-18/34 with torchvision-compatible module names, so torchvision state dicts load strictly.

The stem is configurable: ``"imagenet"`` (7x7/2 conv, optional 3x3/2 max-pool) or ``"cifar"`` (3x3/1 conv,
no pool). The NWS paper's reference runs the imagenet stem without the max-pool on 32x32 images.
"""
from __future__ import annotations

import torch
from torch import nn

from nws.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of ``BasicBlock`` stages; ``fc`` is the classifier.

    As in the reference, the only float parameters besides the searched weights are BatchNorm's: no conv
    and, unless ``bias``, no classifier has a bias (the reference's classifier is a bias-free 1x1 conv, which
    equals a bias-free Linear on pooled features). ``bias=True`` gives ``fc`` a bias as torchvision's has, so
    torchvision checkpoints load strictly. No dropout (the reference has none).
    """

    classifier_name = "fc"

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        maxpool: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" and maxpool else nn.Identity()
        self.in_planes = 64
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes, bias=bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.in_planes, planes, stride)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(
    num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet", maxpool: bool = True, bias: bool = False
) -> ResNet:
    """ResNet-18 (11,689,512 parameters with the imagenet stem and 1000 classes, less the classifier's 1000
    biases unless ``bias``, which loads torchvision checkpoints)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, stem, maxpool, bias)


@register_model
def resnet34(
    num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet", maxpool: bool = True, bias: bool = False
) -> ResNet:
    """ResNet-34 (21,797,672 parameters with the imagenet stem and 1000 classes, less the classifier's 1000
    biases unless ``bias``)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, stem, maxpool, bias)
