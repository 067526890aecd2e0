"""Sparsification (the paper's appendix application): pools with an all-zero entry make a searched network
sparse, since every grouped kernel searched to that entry is pruned.

``nws.convert(model, zero_entry=True)`` (or ``pools_from_model(..., zero_entry=True)``) puts the zero entry
at index 0 of every pool; :func:`sparsity_loss` is a group-lasso pull of grouped kernels towards zero that
encourages its use during training. The search itself is unchanged: exact L2 nearest entry.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nws.convert import nws_layers


def sparsity_loss(model: nn.Module) -> Tensor:
    """Group lasso over grouped kernels: the mean, over every grouped kernel of every NWS layer, of its L2 norm
    (temporary weights).

    One mean over the whole network, so every kernel feels the same pull whatever the size of its layer (a
    per-layer mean would pull the few kernels of a small classifier hundreds of times harder). The norm is
    smoothed at zero (``sqrt(|w|^2 + 1e-12)``) so kernels already at zero get a zero gradient, not NaN.
    """
    norms = [layer.kernels().pow(2).sum(1).add(1e-12).sqrt() for _, layer in nws_layers(model)]
    if not norms:
        raise ValueError("the model has no NWS layers; call nws.convert first")
    return torch.cat(norms).mean()


@torch.no_grad()
def zero_entries(codebook: Tensor) -> Tensor:
    """Boolean mask ``(K,)`` of the pool entries that are all zero."""
    return (codebook == 0).all(dim=1)


@torch.no_grad()
def kernel_sparsity(model: nn.Module) -> dict[str, object]:
    """Fraction of grouped kernels searched to an all-zero pool entry: ``{"total": f, "layers": {name: f}}``.

    ``total`` weighs layers by their number of weights (kernels x kernel length), so it is the fraction of
    the searched network's weights that are pruned. Layers whose pool has no zero entry count as dense.
    """
    layers: dict[str, float] = {}
    zero_weights = all_weights = 0
    for name, layer in nws_layers(model):
        mask = zero_entries(layer.pool.codebook)
        pruned = int(mask[layer.search()].sum()) if bool(mask.any()) else 0
        layers[name] = pruned / max(layer.num_kernels, 1)
        zero_weights += pruned * layer.pool.dim
        all_weights += layer.num_kernels * layer.pool.dim
    return {"total": zero_weights / max(all_weights, 1), "layers": layers}


@torch.no_grad()
def has_zero_entry(model: nn.Module) -> bool:
    """Whether any pool of ``model`` has an all-zero entry (so its kernel sparsity is worth reporting)."""
    return any(bool(zero_entries(layer.pool.codebook).any()) for _, layer in nws_layers(model))
