"""PackNet (Mallya & Lazebnik, CVPR 2018): iterative magnitude pruning packs tasks into one network.

For task ``t``: the weights no earlier task owns (all of them for the first task) are trained while the
owned ones stay exactly as they are; then, in every layer, the ``prune_ratio`` fraction of those free
weights with the smallest magnitude is set to zero and left free for later tasks; the kept ones, now
owned by ``t``, are retrained for ``retrain_epochs`` at a tenth of the learning rate. Task ``t``'s network
is the shared weights owned by tasks ``0..t`` (the rest zero), its own BatchNorm and its classifier.
Biases and other unmasked weights are trained with the first task only, then frozen.

Stored: the shared weights (float32; a new ``network_00i.safetensors`` after each task replaces the
previous one) and per task its owned-weight mask (one bit per weight of the pruned layers, bit-packed),
BatchNorm and classifier.
"""

from __future__ import annotations


import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from nws.engine import StepAction
from nws.errors import StoreError
from nws.methods.base import Saved
from nws.methods.plain import (PlainMethod, PlainStore, batchnorm_state, batchnorm_tensors, masked_layers, pack_masks,
                               prefixed, state_parts, unpack_masks, unprefixed, weight_key)


class PackNetStore(PlainStore):
    rewrites_network = True

    def owned(self, index: int, shapes: dict[str, list[int]]) -> dict[str, Tensor]:
        """The weights task ``index`` owns, per pruned layer."""
        tensors = self.task_tensors(index)
        what = str(self.root / self.task_entry(index)["file"])
        if "masks" not in tensors:
            raise StoreError(f"{what} has no masks")
        return unpack_masks(tensors["masks"], shapes, what)

    def network_layers(self) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """The current network's body tensors and the shapes of its pruned layers (checked against each other)."""
        network, meta = self.network()
        what = str(self.root / self.shared_files()[-1])
        body, shapes = unprefixed("body", network), self.layer_shapes(meta, what)
        for name, shape in shapes.items():
            if weight_key(name) not in body or list(body[weight_key(name)].shape) != shape:
                raise StoreError(f"{what}: {weight_key(name)} is missing or not of its recorded shape {shape}")
        return body, shapes

    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        body, shapes = self.network_layers()
        union = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
        for i in range(index + 1):
            for name, mask in self.owned(i, shapes).items():
                union[name] |= mask
        for name, mask in union.items():
            body[weight_key(name)] = torch.where(mask, body[weight_key(name)], torch.zeros(()))
        tensors = self.task_tensors(index)
        model, what = self.plain(len(entry["classes"])), str(self.root / entry["file"])
        state = {**body, **batchnorm_state(tensors, model, what), **unprefixed("head", tensors)}
        return self.load_state(model, state, what)


class PackNet(PlainMethod):
    name = "packnet"
    store_class = PackNetStore
    colour, marker = "#2ca02c", "^"

    def start(self, store: PlainStore, source: nn.Module) -> None:
        self.model = source
        # Which task owns each weight of each pruned layer; -1: free.
        self.owner = {name: torch.full(layer.weight.shape, -1, dtype=torch.int16)
                      for name, layer in masked_layers(source)}

    def restore(self, store: PackNetStore, index: int) -> None:
        self.model = store.build(index)
        _, shapes = store.network_layers()
        for task in range(index + 1):
            for name, mask in store.owned(task, shapes).items():
                self.owner[name][mask] = task

    def _params(self, model: nn.Module, index: int) -> list[nn.Parameter]:
        """Masked weights, BatchNorm and classifier; biases and other weights only with the first task."""
        weights = {id(layer.weight) for _, layer in masked_layers(model)}
        parts = state_parts(model)
        trainable = set(parts["head"]) | set(parts["batchnorm"])
        params = []
        for key, p in model.named_parameters():
            train = id(p) in weights or key in trainable or index == 0
            p.requires_grad_(train)
            if train:
                params.append(p)
        return params

    @staticmethod
    def _hold(layers: dict[str, nn.Module], trainable: dict[str, Tensor]) -> Callable[[], None]:
        """A per-step action that puts every weight outside ``trainable`` back to its current value, exactly."""
        held = {name: layer.weight.detach().clone() for name, layer in layers.items()}

        def restore() -> None:
            for name, layer in layers.items():
                layer.weight.copy_(torch.where(trainable[name], layer.weight, held[name]))
        return restore

    def learn(self, index: int) -> nn.Module:
        model = self.head_for(self.unfolded(self.model, index).train(), index)
        layers = dict(masked_layers(model))
        params = self._params(model, index)
        free = {name: self.owner[name] == -1 for name in layers}
        model = self.train_task(model, index, params=params, callbacks=[StepAction(self._hold(layers, free))])
        self._prune(layers, free, index)
        mine = {name: self.owner[name] == index for name in layers}
        retrain = dataclasses.replace(self.config.task, epochs=self.config.baseline.retrain_epochs,
                                      lr=self.config.task.lr * 0.1)
        model = self.train_task(model, index, "_retrain", cfg=retrain, params=params,
                                callbacks=[StepAction(self._hold(layers, mine))])
        self.model = model
        return model

    def save(self, store: PlainStore, index: int, model: nn.Module) -> Saved:
        layers = dict(masked_layers(model))
        mine = {name: self.owner[name] == index for name in layers}
        parts = state_parts(model)
        tensors = {"masks": pack_masks(mine), **batchnorm_tensors(parts["batchnorm"], self.config.model.bn_dtype),
                   **prefixed("head", parts["head"])}
        shapes = {name: list(layer.weight.shape) for name, layer in layers.items()}
        return self.saved(store, index, tensors, network=prefixed("body", parts["body"]),
                          network_meta={"layers": shapes}, masks=mine)

    @torch.no_grad()
    def _prune(self, layers: dict[str, nn.Module], free: dict[str, Tensor], index: int) -> None:
        """Per layer, keep the largest ``1 - prune_ratio`` of the free weights (owned by task ``index`` from
        now on) and zero the rest (still free)."""
        ratio = self.config.baseline.prune_ratio
        for name, layer in layers.items():
            candidates = free[name].flatten().nonzero().flatten()
            keep = round((1 - ratio) * len(candidates))
            magnitude = layer.weight.detach().abs().flatten()[candidates]
            kept = candidates[torch.topk(magnitude, keep, sorted=False).indices] if keep else candidates[:0]
            owner = self.owner[name].view(-1)
            owner[kept] = index
            pruned = free[name] & (self.owner[name] == -1)
            layer.weight[pruned] = 0.0
