"""A task's codes: the pool index of every grouped kernel, per layer.

:func:`encode` reads them off a model; :func:`decode` sets a model so that it searches exactly them.
Their compact storage is in :mod:`nws.packing`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from nws.convert import nws_layers


def encode(model: nn.Module) -> dict[str, Tensor]:
    """Each NWS layer's indices ``(N,)`` (int64, on the CPU), keyed by module name, in module order."""
    return {name: layer.search().cpu() for name, layer in nws_layers(model)}


def code_layout(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per NWS layer, ``(pool entries, number of indices)``: what a task's codes for ``model`` must hold."""
    return {name: (layer.pool.num_entries, layer.num_kernels) for name, layer in nws_layers(model)}


@torch.no_grad()
def decode(model: nn.Module, codes: Mapping[str, Tensor]) -> nn.Module:
    """Set every NWS layer of ``model`` so that its searched weights are the pool entries at ``codes``."""
    layers = dict(nws_layers(model))
    if set(layers) != set(codes):
        missing, extra = sorted(set(layers) - set(codes)), sorted(set(codes) - set(layers))
        raise ValueError(f"codes do not match the model's NWS layers (missing {missing}, unexpected {extra})")
    for name, layer in layers.items():
        try:
            layer.set_indices(codes[name])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return model
