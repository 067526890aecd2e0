"""VGG-16 with BatchNorm (configuration D) and a single linear head on globally pooled features.

The NWS paper replaces VGG's fully connected head by one 1x1 conv classifier, which equals a Linear
on pooled features; ``features.N`` names match torchvision's ``vgg16_bn``. As in the reference, the only
float parameters besides the searched weights are BatchNorm's (no conv or classifier bias) and dropout
(p = 0.2) sits between the pooled features and the classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from nws.models.registry import register_model

CFG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def make_layers(cfg: tuple[int | str, ...], in_channels: int = 3, bias: bool = False) -> nn.Sequential:
    """Conv3x3-BN-ReLU for each int, 2x2 max-pool for each ``"M"`` (torchvision layout; its convs have a
    ``bias``, the reference's do not)."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), 3, padding=1, bias=bias), nn.BatchNorm2d(int(v)),
                       nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG feature extractor, global average pool, ``dropout`` and a single ``classifier`` Linear.

    ``bias=True`` gives every conv and the classifier a bias, as torchvision's ``vgg16_bn`` has, so its
    ``features`` load strictly (its three-layer head never does; see ``new_head`` in
    :func:`nws.pool_sources.model_from_state_dict`).
    """

    classifier_name = "classifier"

    def __init__(self, cfg: tuple[int | str, ...] = CFG_D, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2, bias: bool = False) -> None:
        super().__init__()
        self.features = make_layers(cfg, in_channels, bias)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        width = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Linear(int(width), num_classes, bias=bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.avgpool(self.features(x)), 1)))


@register_model
def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2, bias: bool = False) -> VGG:
    """VGG-16 with BatchNorm: 13 convs, pooled features, dropout (0.2, the reference's) and one
    Linear(512, num_classes); ``bias`` adds torchvision's conv and classifier biases."""
    return VGG(CFG_D, num_classes, in_channels, dropout, bias)
