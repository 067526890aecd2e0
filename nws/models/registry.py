"""The model registry (timm style): builders registered by name, built by :func:`create_model`."""

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
