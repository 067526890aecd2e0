"""Individual networks: an independent copy of the network per task, stored in float32.

Each task starts from the source network and trains every weight; its file holds the whole network (every
float tensor), so memory is tasks x the float32 model size (plus each file's small header). Nothing is
shared, nothing is forgotten: the memory upper bound and, usually, the accuracy reference.
"""

from __future__ import annotations

import copy

from torch import nn

from nws.methods.base import Saved
from nws.methods.plain import (PlainMethod, PlainStore, batchnorm_state, batchnorm_tensors, prefixed, state_parts,
                               unprefixed)


class IndividualStore(PlainStore):
    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        tensors = self.task_tensors(index)
        model, what = self.plain(len(entry["classes"])), str(self.root / entry["file"])
        state = {**unprefixed("body", tensors), **batchnorm_state(tensors, model, what), **unprefixed("head", tensors)}
        return self.load_state(model, state, what)


class Individual(PlainMethod):
    name = "individual"
    store_class = IndividualStore
    colour, marker = "#7f7f7f", "D"

    def start(self, store: PlainStore, source: nn.Module) -> None:
        self.source = source

    def learn(self, index: int) -> nn.Module:
        model = self.head_for(copy.deepcopy(self.source).train(), index)
        for p in model.parameters():
            p.requires_grad_(True)
        return self.train_task(model, index)

    def save(self, store: PlainStore, index: int, model: nn.Module) -> Saved:
        parts = state_parts(model)
        tensors = {**prefixed("body", parts["body"]), **batchnorm_tensors(parts["batchnorm"], self.config.model.bn_dtype),
                   **prefixed("head", parts["head"])}
        return self.saved(store, index, tensors)
