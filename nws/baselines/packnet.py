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

import torch
from torch import Tensor, nn

from nws.baselines.common import (BaselineLearner, BaselineStore, load_float_state, masked_layers, pack_masks,
                                  prefixed, state_parts, unpack_masks, unprefixed)
from nws.errors import NWSError
from nws.store import StoreError


class PackNetStore(BaselineStore):
    method = "packnet"
    rewrites_network = True

    def owned(self, index: int, shapes: dict[str, list[int]]) -> dict[str, Tensor]:
        """The weights task ``index`` owns, per pruned layer."""
        entry = self.entry(index)
        tensors, _ = self.file(entry["file"], "task")
        if "masks" not in tensors:
            raise StoreError(f"{self.root / entry['file']} has no masks")
        return unpack_masks(tensors["masks"], shapes, str(self.root / entry["file"]))

    def network_layers(self) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """The current network's tensors and the shapes of its pruned layers."""
        network, meta = self.network()
        shapes = meta.get("layers")
        if not isinstance(shapes, dict):
            raise StoreError(f"{self.root / self.shared()[-1]} lacks its 'layers' metadata")
        return network, shapes

    def build(self, index: int) -> nn.Module:
        entry = self.entry(index)
        model = self.plain(len(entry["classes"]))
        network, shapes = self.network_layers()
        body = unprefixed("body", network)
        union = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
        for i in range(index + 1):
            for name, mask in self.owned(i, shapes).items():
                union[name] |= mask
        for name, mask in union.items():
            key = f"{name}.weight" if name else "weight"
            if key not in body:
                raise StoreError(f"{self.root / self.shared()[-1]} lacks {key}")
            body[key] = torch.where(mask, body[key], torch.zeros_like(body[key]))
        tensors, _ = self.file(entry["file"], "task")
        state = {**body, **unprefixed("batchnorm", tensors), **unprefixed("head", tensors)}
        load_float_state(model, state, str(self.root / entry["file"]))
        return model


class PackNetLearner(BaselineLearner):
    method = "packnet"
    store_class = PackNetStore

    def start(self, store: BaselineStore, source: nn.Module) -> None:
        ratio = self.config.baseline.prune_ratio
        if not 0 <= ratio < 1:
            raise NWSError(f"baseline.prune_ratio must be in [0, 1), got {ratio}")
        self.model = source
        # Which task owns each weight of each pruned layer; -1: free.
        self.owner = {name: torch.full(layer.weight.shape, -1, dtype=torch.int16)
                      for name, layer in masked_layers(source)}

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

    def _hold(self, layers: dict[str, nn.Module], trainable: dict[str, Tensor]):
        """An after-step hook that puts every weight outside ``trainable`` back to its current value, exactly."""
        held = {name: layer.weight.detach().clone() for name, layer in layers.items()}

        def restore() -> None:
            for name, layer in layers.items():
                layer.weight.copy_(torch.where(trainable[name], layer.weight, held[name]))
        return restore

    def learn(self, store: BaselineStore, index: int) -> nn.Module:
        task, cfg = self.benchmark.tasks[index], self.config.task
        model = self.head_for(self.model.train(), index)
        layers = dict(masked_layers(model))
        params = self._params(model, index)
        free = {name: self.owner[name] == -1 for name in layers}
        model = self.fit(model, task, cfg, f"task_{index:03d}", index=index, params=params,
                         after_step=self._hold(layers, free))
        self._prune(layers, free, index)
        mine = {name: self.owner[name] == index for name in layers}
        retrain = dataclasses.replace(cfg, epochs=self.config.baseline.retrain_epochs, lr=cfg.lr * 0.1)
        model = self.fit(model, task, retrain, f"task_{index:03d}_retrain", index=index, params=params,
                         after_step=self._hold(layers, mine))
        parts = state_parts(model)
        shapes = {name: list(layer.weight.shape) for name, layer in layers.items()}
        tensors = {"masks": pack_masks(mine), **prefixed("batchnorm", parts["batchnorm"]),
                   **prefixed("head", parts["head"])}
        self.save(store, index, model, tensors, network=prefixed("body", parts["body"]),
                  network_meta={"layers": shapes}, masks=mine)
        self.model = model
        return model

    def restore(self, store: BaselineStore, index: int) -> None:
        self.model = store.build(index)
        _, shapes = store.network_layers()
        for task in range(index + 1):
            for name, mask in store.owned(task, shapes).items():
                self.owner[name][mask] = task

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
