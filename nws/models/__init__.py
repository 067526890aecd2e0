"""Model registry and plain-torch builders (timm style).

Every model exposes ``classifier_name``, the dotted path of its final ``nn.Linear``, so callers can
find and resize the head with ``model.get_submodule(model.classifier_name)``. By default each builder
follows the reference implementation: the only float parameters besides conv and classifier weights are
BatchNorm's (no biases), and dropout sits where the reference has it (VGG only); see ``docs/reference.md``.
"""
from __future__ import annotations

from nws.models.registry import create_model, list_models, register_model
from nws.models.convnet import ConvNet, convnet
from nws.models.mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2
from nws.models.resnet import BasicBlock, ResNet, resnet18, resnet34
from nws.models.vgg import VGG, vgg16_bn

__all__ = [
    "register_model", "create_model", "list_models",
    "BasicBlock", "ResNet", "resnet18", "resnet34",
    "VGG", "vgg16_bn",
    "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "ConvNet", "convnet",
]
