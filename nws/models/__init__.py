"""Model registry and plain-torch builders (timm style).

Every model exposes ``classifier_name``, the dotted path of its final ``nn.Linear``, so callers can
find and resize the head with ``model.get_submodule(model.classifier_name)``. By default each builder
follows the reference implementation: the only float parameters besides conv and classifier weights are
BatchNorm's (no biases), and dropout sits where the reference has it (VGG only); see ``docs/reference.md``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name so ``create_model`` can find it."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs; extra kwargs go to the builder."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


from .convnet import ConvNet, convnet  # noqa: E402
from .mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2  # noqa: E402
from .resnet import BasicBlock, ResNet, resnet18, resnet34  # noqa: E402
from .vgg import VGG, vgg16_bn  # noqa: E402

__all__ = [
    "register_model", "create_model", "list_models",
    "BasicBlock", "ResNet", "resnet18", "resnet34",
    "VGG", "vgg16_bn",
    "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "ConvNet", "convnet",
]
