"""Model-level NWS: make any model searchable, and the operations the training loop needs."""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from nws.layers import NWSConv2d, NWSLayer, NWSLinear

Exclude = Iterable[str] | Callable[[str, nn.Module], bool]


def _excluded(exclude: Exclude, name: str, module: nn.Module) -> bool:
    if callable(exclude):
        return bool(exclude(name, module))
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def layer_group_size(weight_shape: Sequence[int], group_size: int, group_1x1: bool = False) -> int:
    """The group size a layer with weight ``(out, in/groups, *kernel)`` gets under the reference's layer policy.

    ``group_size`` (g) applies to convs with a spatial kernel (k x k, k > 1); 1x1 convs and Linear layers
    (the reference's shortcuts and its 1x1-conv classifier) stay at g = 1 unless ``group_1x1``. A g that
    does not divide the input channels per conv group falls back to the largest that does (``gcd``), so a
    depthwise conv (one input channel per group, as in MobileNetV2) always has g = 1, as in the reference.
    """
    spatial = math.prod(weight_shape[2:])
    wanted = group_size if spatial > 1 or group_1x1 else 1
    return math.gcd(wanted, int(weight_shape[1]))


def _searchable(module: nn.Module, **nws) -> NWSLayer:
    """The NWS counterpart of a Conv2d/Linear, sharing its weight and bias Parameters."""
    if isinstance(module, nn.Conv2d):
        new = NWSConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups,
                        bias=module.bias is not None, padding_mode=module.padding_mode, device="meta", **nws)
    else:
        new = NWSLinear(module.in_features, module.out_features, bias=module.bias is not None,
                        device="meta", **nws)
    new.weight = module.weight
    new.bias = module.bias
    new.pool.to(module.weight.device)
    new.train(module.training)
    return new


def convert(model: nn.Module, pool_size: int = 512, group_size: int = 1, exclude: Exclude = (),
            decay: float = 0.99, eps: float = 1e-5, seed: int = 0, init: str = "normal",
            zero_entry: bool = False, group_1x1: bool = False) -> nn.Module:
    """Replace every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` by its NWS counterpart, in place.

    The current weights become the temporary weights. Each layer's group size follows
    :func:`layer_group_size`: ``group_size`` for k x k convs, 1 for 1x1 convs and Linear layers unless
    ``group_1x1``; ``layer.group_size`` reports what a layer uses. ``exclude`` takes module-name patterns
    (``fnmatch``, e.g. ``["fc", "layer1.*"]``) or a ``(name, module) -> bool`` predicate. Layer ``i`` (in
    module order) gets a pool seeded with ``seed + i``. ``init="normal"`` draws pool entries from a standard
    normal (the reference); ``init="kernels"`` samples them from the layer's own kernels, which starts the
    EMA pretraining with every entry in use. ``zero_entry`` makes entry 0 of every pool all zero, fixed
    (sparsification: a kernel searched to it is pruned). Returns ``model``.
    """
    if init not in ("normal", "kernels"):
        raise ValueError(f"init must be 'normal' or 'kernels', got {init!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Conv2d, nn.Linear) and not _excluded(exclude, name, m)]
    for i, (name, module) in enumerate(targets):
        g = layer_group_size(module.weight.shape, group_size, group_1x1)
        new = _searchable(module, pool_size=pool_size, group_size=g, decay=decay, eps=eps, seed=seed + i)
        if zero_entry:
            new.pool.add_zero_entry()
        if init == "kernels":
            new.pool.init_from(new.kernels(), seed=seed + i)
        if name:
            model.set_submodule(name, new)
        else:
            model = new
    return model


def nws_layers(model: nn.Module) -> Iterator[tuple[str, NWSLayer]]:
    """``(name, layer)`` for every NWS layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, NWSLayer):
            yield name, module


def commitment_loss(model: nn.Module) -> Tensor:
    """``sum_l mean((sg(q_l) - w_l)^2)``: pulls temporary weights towards their searched pool entries
    (those of the layer's most recent forward, so the search is not repeated)."""
    terms = [layer.commitment() for _, layer in nws_layers(model)]
    if not terms:
        raise ValueError("the model has no NWS layers; call nws.convert first")
    return torch.stack(terms).sum()


def update_pools(model: nn.Module) -> None:
    """One EMA step for every trainable pool, from the assignments accumulated since the last step."""
    for _, layer in nws_layers(model):
        if layer.pool.trainable:
            layer.pool.ema_update()


def freeze_pools(model: nn.Module) -> nn.Module:
    """Freeze every pool: from now on tasks only search them."""
    for _, layer in nws_layers(model):
        layer.pool.freeze()
    return model


@torch.no_grad()
def materialize(model: nn.Module, inplace: bool = False, codes: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A plain torch copy of ``model``: each NWS layer becomes an ordinary Conv2d/Linear with its searched weights
    (the same outputs, without a search in every forward). ``inplace``: ``model`` itself is changed (no copy of
    it, nor of its pools, is made) and returned. ``codes``: the layers' pool indices where they are known (a
    network rebuilt from them, :func:`nws.decode`): those layers take the entries at them, without a search."""
    plain = model if inplace else copy.deepcopy(model)
    codes = codes or {}
    for name, layer in list(nws_layers(plain)):
        if isinstance(layer, NWSConv2d):
            new: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                       padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                       bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if name in codes:
            book = layer.pool.codebook
            weight = layer.weight_from_kernels(book[codes[name].to(book.device, torch.long)]).to(layer.weight.dtype)
        else:
            weight = layer.searched_weight().clone()
        new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        new.bias = layer.bias
        new.train(layer.training)
        if name:
            plain.set_submodule(name, new)
        else:
            plain = new
    return plain
