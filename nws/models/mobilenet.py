"""MobileNetV2 with torchvision's layout (``features`` then ``classifier``) and depthwise convs.

``stem_stride=1`` keeps resolution for small inputs such as 32x32; dropout is a separate module so
``classifier`` is the bare Linear. As in the reference, the only float parameters besides the searched
weights are BatchNorm's (no bias anywhere), and there is no dropout by default.
"""
from __future__ import annotations

import torch
from torch import nn

from nws.models.registry import register_model

# (expand_ratio t, output channels c, repeats n, first stride s)
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` without dropping more than 10% (as torchvision)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu6(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias), BN and ReLU6, named ``0``, ``1``, ``2`` like torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, linear 1x1 projection; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = [conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: ``features``, global average pool, ``dropout`` and a bias-free ``classifier`` Linear.

    The reference's classifier is a bias-free 1x1 conv on pooled features (the same map) and it has no
    dropout (torchvision's 0.2 is commented out there); ``dropout > 0`` restores torchvision's.
    """

    classifier_name = "classifier"

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem_stride: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(in_channels, input_channel, 3, stem_stride)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, out, s if i == 0 else 1, t))
                input_channel = out
        features.append(conv_bn_relu6(input_channel, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channel, num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


@register_model
def mobilenet_v2(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, stem_stride: int = 2,
    dropout: float = 0.0,
) -> MobileNetV2:
    """MobileNetV2 (3,503,872 parameters at width 1.0 and 1000 classes); ``stem_stride=1`` for 32x32 inputs;
    ``dropout`` before the classifier (0 as in the reference, torchvision uses 0.2)."""
    return MobileNetV2(num_classes, in_channels, width_mult, stem_stride, dropout)
