"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): a frozen backbone and a learned binary mask per task.

Every weight of the masked layers (all convolutions and linear layers but the classifier) gets a
real-valued score, initialised to ``mask_init``; the forward uses ``weight * (score > mask_threshold)``
and the scores learn through a straight-through estimator (the binary mask's gradient is passed to the
scores), with Adam at ``mask_lr``. The backbone's weights never change; each task also trains its own
classifier and BatchNorm with the task's SGD schedule.

Stored: ``backbone.safetensors`` (the source network's weights, float32, once) and per task its mask
(one bit per masked weight, bit-packed), BatchNorm and classifier.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nws.baselines.common import (BaselineLearner, BaselineStore, load_float_state, masked_layers, pack_masks,
                                  prefixed, state_parts, unpack_masks, unprefixed)
from nws.store import StoreError

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


class PiggybackStore(BaselineStore):
    method = "piggyback"
    shared_files = (BACKBONE,)

    def build(self, index: int) -> nn.Module:
        entry = self.entry(index)
        model = self.plain(len(entry["classes"]))
        backbone, meta = self.file(BACKBONE, "backbone")
        shapes = meta.get("layers")
        if not isinstance(shapes, dict):
            raise StoreError(f"{self.root / BACKBONE} lacks its 'layers' metadata")
        tensors, _ = self.file(entry["file"], "task")
        if "masks" not in tensors:
            raise StoreError(f"{self.root / entry['file']} has no masks")
        body = unprefixed("body", backbone)
        for name, mask in unpack_masks(tensors["masks"], shapes, str(self.root / entry["file"])).items():
            key = f"{name}.weight" if name else "weight"
            if key not in body:
                raise StoreError(f"{self.root / BACKBONE} lacks {key}")
            body[key] = body[key] * mask.to(body[key].dtype)
        state = {**body, **unprefixed("batchnorm", tensors), **unprefixed("head", tensors)}
        load_float_state(model, state, str(self.root / entry["file"]))
        return model


class PiggybackLearner(BaselineLearner):
    method = "piggyback"
    store_class = PiggybackStore

    def start(self, store: BaselineStore, source: nn.Module) -> None:
        self.source = source
        if BACKBONE not in store.manifest["files"]:  # written once (a resumed run has it)
            shapes = {name: list(layer.weight.shape) for name, layer in masked_layers(source)}
            store.put(BACKBONE, "backbone", prefixed("body", state_parts(source)["body"]), {"layers": shapes})

    def learn(self, store: BaselineStore, index: int) -> nn.Module:
        task, b = self.benchmark.tasks[index], self.config.baseline
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
        model = self.fit(model, task, self.config.task, f"task_{index:03d}", index=index, params=params,
                         mask_params=[m.scores for m in masks.values()], mask_lr=b.mask_lr)
        bits = {name: m.mask() for name, m in masks.items()}
        for layer in layers.values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        parts = state_parts(model)
        tensors = {"masks": pack_masks(bits), **prefixed("batchnorm", parts["batchnorm"]),
                   **prefixed("head", parts["head"])}
        self.save(store, index, model, tensors, masks=bits)
        return model
