"""Pools without pretraining: k-means pools from any network, and the reference implementation's pools.

Pretraining pools by EMA on ImageNet is the costly step of NWS. :func:`pools_from_model` instead builds each
layer's pool by k-means over the grouped kernels of a network that is already trained (any checkpoint);
:func:`import_reference` reads a pool-pretraining checkpoint of the reference implementation. Both return an
NWS-converted model whose pools are frozen and whose temporary weights are the source weights, ready to
start the first task. Foreign files are read with ``torch.load(weights_only=True)`` or safetensors: no code
is ever unpickled.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nws.convert import Exclude, convert, layer_group_size, nws_layers
from nws.errors import NWSError
from nws.layers import NWSLayer
from nws.models import create_model, list_models
from nws.kmeans import kmeans
from nws.exhaustive import CHUNK_ELEMENTS
from nws.spec import ModelSpec


class CheckpointError(NWSError):
    """A checkpoint that cannot be read or does not fit the architecture asked for."""


# ------------------------------------------------------------------------------------- pools from a model


@dataclass
class LayerReport:
    """How well a layer's pool represents its source kernels."""

    name: str
    kernels: int
    dim: int
    entries: int
    used: int
    mse: float
    relative: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def quantisation_report(model: nn.Module) -> list[LayerReport]:
    """Per NWS layer: kernel count, pool entries used, and the mean squared error ``mean((W - Q)^2)`` between
    the temporary weights and their searched weights (``relative``: divided by ``mean(W^2)``)."""
    rows = []
    for name, layer in nws_layers(model):
        w = layer.weight.detach().float()
        q = layer.searched_weight().float()
        mse = float((w - q).pow(2).mean())
        power = float(w.pow(2).mean())
        rows.append(LayerReport(name, layer.num_kernels, layer.pool.dim, layer.pool.num_entries,
                                int(layer.search().unique().numel()), mse, mse / power if power > 0 else 0.0))
    return rows


def format_report(rows: list[LayerReport]) -> str:
    """The per-layer quantisation table as fixed-width text, with kernel-weighted totals."""
    width = max([5] + [len(r.name) for r in rows])
    lines = [f"{'layer':<{width}}  {'kernels':>9}  {'d':>3}  {'used/K':>9}  {'mse':>10}  {'mse/mean(w^2)':>13}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.kernels:>9}  {r.dim:>3}  {f'{r.used}/{r.entries}':>9}  "
                     f"{r.mse:>10.3e}  {r.relative:>13.4f}")
    n = sum(r.kernels * r.dim for r in rows)
    if n:
        mse = sum(r.mse * r.kernels * r.dim for r in rows) / n
        lines.append(f"{'all':<{width}}  {sum(r.kernels for r in rows):>9}  {'':>3}  {'':>9}  {mse:>10.3e}")
    return "\n".join(lines)


@torch.no_grad()
def pools_from_model(model: nn.Module, pool_size: int = 512, group_size: int = 1, iters: int = 25, seed: int = 0,
                     exclude: Exclude = (), zero_entry: bool = False, chunk_elements: int = CHUNK_ELEMENTS,
                     group_1x1: bool = False) -> tuple[nn.Module, list[LayerReport]]:
    """Make ``model`` searchable with pools built by k-means of each layer's own grouped kernels.

    ``model`` is converted in place (as :func:`nws.convert` does, with its group policy: ``group_size`` for
    k x k convs, 1 for 1x1 convs and Linear layers unless ``group_1x1``); a model that is already converted
    keeps its layers and gets new pools. Layer ``i`` uses seed ``seed + i``. With ``zero_entry`` each pool's
    entry 0 is all zero (sparsification). The pools are frozen; the temporary weights stay the source
    weights. Returns the model and the per-layer quantisation report (:func:`quantisation_report`).
    """
    if not any(True for _ in nws_layers(model)):
        model = convert(model, pool_size=pool_size, group_size=group_size, exclude=exclude, seed=seed,
                        zero_entry=zero_entry, group_1x1=group_1x1)
    for i, (_, layer) in enumerate(nws_layers(model)):
        build_pool(layer, iters=iters, seed=seed + i, zero_entry=zero_entry, chunk_elements=chunk_elements)
    return model, quantisation_report(model)


@torch.no_grad()
def build_pool(layer: NWSLayer, iters: int = 25, seed: int = 0, zero_entry: bool = False,
               chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Set ``layer``'s pool to k-means centres of its grouped kernels and freeze it."""
    pool = layer.pool
    fixed = torch.zeros(1, pool.dim) if zero_entry else None
    book = kmeans(layer.kernels().detach(), pool.num_entries, iters=iters, seed=seed, fixed=fixed,
                  chunk_elements=chunk_elements)
    pool.codebook.copy_(book)
    pool.embed_sum.copy_(book)
    pool.cluster_size.fill_(1.0)
    pool.zero_entry = False
    if zero_entry:
        pool.add_zero_entry()
    pool.freeze()


# ------------------------------------------------------------------------------------ reading checkpoints


def _tensor_dict(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} holds no state dict of tensors")
    return {str(k): v for k, v in obj.items()}


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object saved in ``path``: a safetensors file, or a ``torch.save`` file loaded with
    ``weights_only=True`` (tensors and plain containers only; a file that holds code is refused)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types on corrupt data
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, zip errors, refused globals: all mean "not usable"
        raise CheckpointError(f"{path} cannot be loaded as weights only ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def state_dict_of(obj: Any, what: str) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: the object itself, or its ``state_dict``/``model`` entry;
    a ``module.`` prefix (DataParallel) on every key is removed."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    state = _tensor_dict(obj, what)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def model_from_state_dict(arch: str, state: Mapping[str, Tensor], what: str = "checkpoint",
                          new_head: bool = False, **kwargs: Any) -> nn.Module:
    """An ``nws.models`` network ``arch`` holding ``state`` (strictly: every key must match).

    The class count is read off the classifier's weight unless ``num_classes`` is given. torchvision key
    names match the builders for resnet18/34 (with ``bias=True``: torchvision's ``fc`` has a bias), and the
    ``features`` of mobilenet_v2 and of vgg16_bn (with ``bias=True``: torchvision's convs have biases).
    ``new_head`` drops the checkpoint's classifier entries (e.g. torchvision vgg16_bn's three-layer head,
    which the paper's single 1x1 classifier replaces, or mobilenet_v2's ``classifier.1``) and keeps the
    builder's freshly initialised head.
    """
    if arch not in list_models():
        raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(list_models())}")
    try:
        head = create_model(arch, **{**kwargs, "num_classes": 1}).classifier_name
        if new_head:
            state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
        elif "num_classes" not in kwargs:
            weight = state.get(f"{head}.weight")
            if weight is None:
                raise CheckpointError(f"{what} has no {head}.weight, so its class count is unknown (is it a {arch} "
                                      "checkpoint? --new-head starts a fresh classifier)")
            kwargs["num_classes"] = int(weight.shape[0])
        model = create_model(arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build {arch} ({_first_line(err)})") from None
    expected = {k: v for k, v in model.state_dict().items() if not (new_head and k.startswith(f"{head}."))}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if not missing and all(k.endswith(".bias") and k[: -len(".bias")] in dict(model.named_modules())
                               for k in unexpected):
            hint = ("; its convs or classifier have biases, which the builders leave out as the reference does: "
                    "add bias: true to the builder arguments if it accepts it")
        raise CheckpointError(f"{what} does not match {arch} (missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                              f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}){hint}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise CheckpointError(f"{what}: {key} has shape {tuple(state[key].shape)}, {arch} needs "
                                  f"{tuple(value.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=not new_head)
    return model


# ---------------------------------------------------------------------------- the reference's checkpoints

REFERENCE_ARCH = "resnet18"
REFERENCE_KWARGS = {"stem": "imagenet", "maxpool": False}
_QTZ_IGNORED = ("acum_embed_sum", "acum_embed_onehot_sum")
_SUBLAYER = {"residual_function.0": "conv1", "residual_function.1": "bn1", "residual_function.3": "conv2",
             "residual_function.4": "bn2", "shortcut.0": "downsample.0", "shortcut.1": "downsample.1"}
_BLOCK = re.compile(r"conv([2-5])_x\.NwsRes(\d+)\.(residual_function\.[0134]|shortcut\.[01])$")


def reference_module_name(name: str) -> str | None:
    """Our ``nws.models.resnet18`` module name for a reference module name (``None`` if it has none)."""
    if name == "conv1.0":
        return "conv1"
    if name == "conv1.1":
        return "bn1"
    if name == "last_layer":
        return "fc"
    match = _BLOCK.match(name)
    if match:
        stage, block, sub = match.groups()
        return f"layer{int(stage) - 1}.{block}.{_SUBLAYER[sub]}"
    return None


def import_reference(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The reference implementation's pool-pretraining checkpoint as an NWS ``resnet18``.

    ``checkpoint`` is a path (read with ``weights_only=True``) or the loaded object: a dict whose ``model``
    entry is a DistributedDataParallel state dict (``module.`` prefix), each searched layer holding its
    temporary ``weight`` and ``qtz.embed`` ``(d, K)``. Returns the converted model (imagenet stem without
    max-pool, as the reference runs it) whose pools are the transposed ``embed`` buffers, frozen, whose
    temporary weights, BatchNorm and classifier are the checkpoint's; and the settings read off it
    (``pool_size``, ``group_size``, ``num_classes``, ``in_channels``).
    """
    what = os.fspath(checkpoint) if not isinstance(checkpoint, Mapping) else "checkpoint"
    obj = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    state = state_dict_of(obj, what)
    pools: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module.endswith(".qtz"):
            target = reference_module_name(module[: -len(".qtz")])
            if target is None:
                raise CheckpointError(f"{what}: unknown reference layer {module[: -len('.qtz')]!r}")
            if leaf not in _QTZ_IGNORED:
                pools.setdefault(target, {})[leaf] = value
            continue
        target = reference_module_name(module)
        if target is None:
            raise CheckpointError(f"{what}: key {key!r} is not part of the reference resnet18 layout")
        plain[f"{target}.{leaf}"] = value
    for needed in ("conv1.weight", "fc.weight"):
        if needed not in plain:
            raise CheckpointError(f"{what} lacks the reference layer for {needed} (is it a reference resnet18 "
                                  "pool-pretraining checkpoint?)")
    fc = plain["fc.weight"]
    plain["fc.weight"] = fc.reshape(fc.shape[0], -1)  # the reference's bias-free 1x1 conv classifier
    settings = _reference_settings(pools, plain, what)
    model = model_from_state_dict(REFERENCE_ARCH, plain, what, num_classes=settings["num_classes"],
                                  in_channels=settings["in_channels"], **REFERENCE_KWARGS)
    model = convert(model, pool_size=settings["pool_size"], group_size=settings["group_size"])
    layers = dict(nws_layers(model))
    if set(layers) != set(pools):
        missing = sorted(set(layers) - set(pools))
        raise CheckpointError(f"{what}: pools missing for {missing[:3]} or present for unknown layers")
    with torch.no_grad():
        for name, layer in layers.items():
            book = pools[name]["embed"].t().float()
            if book.shape != layer.pool.codebook.shape:
                raise CheckpointError(f"{what}: {name}.qtz.embed has shape {tuple(pools[name]['embed'].shape)}, "
                                      f"expected {tuple(layer.pool.codebook.shape[::-1])}")
            layer.pool.codebook.copy_(book)
            if "cluster_size" in pools[name] and pools[name]["cluster_size"].shape == (layer.pool.num_entries,):
                layer.pool.cluster_size.copy_(pools[name]["cluster_size"])
            if "embed_avg" in pools[name] and pools[name]["embed_avg"].shape == pools[name]["embed"].shape:
                layer.pool.embed_sum.copy_(pools[name]["embed_avg"].t())
            else:
                layer.pool.embed_sum.copy_(book)
            layer.pool.freeze()
    return model, settings


def _reference_settings(pools: dict[str, dict[str, Tensor]], plain: dict[str, Tensor], what: str) -> dict[str, Any]:
    """Pool size and group size of the checkpoint, classes and input channels.

    The group size g is read off the k x k convs (``d / (kh * kw)``); every layer must then have the group
    size our layer policy gives it (:func:`nws.convert.layer_group_size`): the reference's shortcuts and
    classifier, 1x1 convs, are at g = 1, and a stem whose input channels g does not divide uses their gcd.
    """
    sizes, found = set(), {}
    for name, bufs in pools.items():
        if "embed" not in bufs or bufs["embed"].ndim != 2:
            raise CheckpointError(f"{what}: layer {name} has no (d, K) qtz.embed buffer")
        weight = plain.get(f"{name}.weight")
        if weight is None:
            raise CheckpointError(f"{what}: layer {name} has a pool but no weight")
        d, k = bufs["embed"].shape
        kernel = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
        if d % kernel:
            raise CheckpointError(f"{what}: {name}.qtz.embed length {d} is not a multiple of its kernel size {kernel}")
        sizes.add(int(k))
        found[name] = (d // kernel, tuple(weight.shape))
    if len(sizes) != 1:
        raise CheckpointError(f"{what}: layers have different pool sizes {sorted(sizes)}; nws needs one")
    g = max([gl for gl, shape in found.values() if math.prod(shape[2:]) > 1], default=1)
    wrong = {name: gl for name, (gl, shape) in found.items() if gl != layer_group_size(shape, g)}
    if wrong:
        name, gl = next(iter(wrong.items()))
        raise CheckpointError(f"{what}: the layers' group sizes are not one policy (g = {g} on the k x k convs, "
                              f"but {name} has {gl}; 1x1 layers must have 1)")
    return {"pool_size": sizes.pop(), "group_size": g, "num_classes": int(plain["fc.weight"].shape[0]),
            "in_channels": int(plain["conv1.weight"].shape[1])}


# ------------------------------------------------------------------------------------------ pools on disk


def first_conv_channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (what ``in_channels`` a builder needs)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise CheckpointError("the model has no convolution")


def pools_from_checkpoint(path: str | os.PathLike, arch: str, pool_size: int = 512, group_size: int = 1,
                          kwargs: Mapping[str, Any] | None = None, exclude: Exclude = (), iters: int = 25,
                          seed: int = 0, zero_entry: bool = False,
                          new_head: bool = False) -> tuple[nn.Module, ModelSpec, list[LayerReport]]:
    """k-means pools of the ordinary state dict in ``path`` loaded into ``nws.models`` builder ``arch``
    (``new_head``: see :func:`model_from_state_dict`).

    Returns the converted model, its :class:`~nws.spec.ModelSpec` (``in_channels`` read off the first
    convolution, so it equals what a run on that data builds) and the quantisation report.
    """
    kwargs = dict(kwargs or {})
    state = state_dict_of(read_checkpoint(path), os.fspath(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a fresh head (new_head) is the same for the same seed
        model = model_from_state_dict(arch, state, os.fspath(path), new_head=new_head, **kwargs)
    num_classes = int(kwargs.pop("num_classes", model.get_submodule(model.classifier_name).weight.shape[0]))
    spec = ModelSpec(arch, num_classes, {"in_channels": first_conv_channels(model), **kwargs}, pool_size,
                     group_size, tuple(exclude))
    model, report = pools_from_model(model, pool_size, group_size, iters=iters, seed=seed, exclude=list(exclude),
                                     zero_entry=zero_entry)
    return model, spec, report


def reference_pools(path: str | os.PathLike) -> tuple[nn.Module, ModelSpec, list[LayerReport]]:
    """:func:`import_reference` with the :class:`~nws.spec.ModelSpec` a run needs and the quantisation report
    of the checkpoint's temporary weights against its pools."""
    model, s = import_reference(path)
    spec = ModelSpec(REFERENCE_ARCH, s["num_classes"], {"in_channels": s["in_channels"], **REFERENCE_KWARGS},
                     s["pool_size"], s["group_size"])
    return model, spec, quantisation_report(model)
