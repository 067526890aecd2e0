"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): a frozen backbone and a learned binary mask per task.

Every weight of the masked layers (all convolutions and linear layers but the classifier) gets a
real-valued score, initialised to ``mask_init``; the forward uses ``weight * (score > mask_threshold)``
and the scores learn through a straight-through estimator (the binary mask's gradient is passed to the
scores), with Adam at ``mask_lr``. The backbone's weights never change; each task also trains its own
classifier and BatchNorm with the task's schedule.

Stored: ``backbone.safetensors`` (the source network's weights, float32, once) and per task its mask
(one bit per masked weight, bit-packed), BatchNorm and classifier.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nws.engine import ParamGroup
from nws.errors import StoreError
from nws.methods.base import Saved
from nws.methods.plain import (PlainMethod, PlainStore, batchnorm_state, batchnorm_tensors, masked_layers, pack_masks,
                               prefixed, state_parts, unpack_masks, unprefixed, weight_key)

BACKBONE = "backbone.safetensors"


class _Binarize(torch.autograd.Function):
    """``score > threshold`` as 0/1 forward; the gradient passes to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:  # noqa: ARG004
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PiggybackMask(nn.Module):
    """A parametrization ``weight -> weight * binary_mask(scores)`` with learnable ``scores``."""

    def __init__(self, shape: torch.Size, init: float, threshold: float):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init)))
        self.threshold = threshold

    def forward(self, weight: Tensor) -> Tensor:
        return weight * _Binarize.apply(self.scores, self.threshold)

    def mask(self) -> Tensor:
        return self.scores.detach() > self.threshold


class PiggybackStore(PlainStore):
    shared = (BACKBONE,)

    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        what = str(self.root / entry["file"])
        backbone, meta = self.file(BACKBONE, self.kind("backbone"))
        shapes = self.layer_shapes(meta, str(self.root / BACKBONE))
        tensors = self.task_tensors(index)
        if "masks" not in tensors:
            raise StoreError(f"{what} has no masks")
        body = unprefixed("body", backbone)
        for name, mask in unpack_masks(tensors["masks"], shapes, what).items():
            if weight_key(name) not in body or body[weight_key(name)].shape != mask.shape:
                raise StoreError(f"{self.root / BACKBONE}: {weight_key(name)} is missing or not of its recorded shape")
            body[weight_key(name)] = body[weight_key(name)] * mask.to(body[weight_key(name)].dtype)
        model = self.plain(len(entry["classes"]))
        state = {**body, **batchnorm_state(tensors, model, what), **unprefixed("head", tensors)}
        return self.load_state(model, state, what)


class Piggyback(PlainMethod):
    name = "piggyback"
    store_class = PiggybackStore
    colour, marker = "#9467bd", "s"

    def start(self, store: PlainStore, source: nn.Module) -> None:
        self.source = source
        if BACKBONE not in store.manifest["files"]:  # written once (a resumed run has it)
            shapes = {name: list(layer.weight.shape) for name, layer in masked_layers(source)}
            store.put(BACKBONE, store.kind("backbone"), prefixed("body", state_parts(source)["body"]),
                      {"layers": shapes})

    def learn(self, index: int) -> nn.Module:
        b = self.config.baseline
        model = self.head_for(copy.deepcopy(self.source).train(), index)
        parts = state_parts(model)
        trainable = set(parts["head"]) | set(parts["batchnorm"])
        params = []
        for key, p in model.named_parameters():
            p.requires_grad_(key in trainable)
            if key in trainable:
                params.append(p)
        layers = dict(masked_layers(model))
        masks = {}
        for name, layer in layers.items():
            masks[name] = PiggybackMask(layer.weight.shape, b.mask_init, b.mask_threshold)
            parametrize.register_parametrization(layer, "weight", masks[name])
        scores = ParamGroup("the mask scores", [m.scores for m in masks.values()],
                            lambda ps: torch.optim.Adam(ps, lr=b.mask_lr))
        model = self.train_task(model, index, params=params, param_groups=[scores])
        self.masks = {name: m.mask() for name, m in masks.items()}
        for layer in layers.values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        return model

    def save(self, store: PlainStore, index: int, model: nn.Module) -> Saved:
        parts = state_parts(model)
        tensors = {"masks": pack_masks(self.masks), **batchnorm_tensors(parts["batchnorm"], self.config.model.bn_dtype),
                   **prefixed("head", parts["head"])}
        return self.saved(store, index, tensors, masks=self.masks)
