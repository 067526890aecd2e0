"""Individual networks: an independent copy of the network per task, stored in float32.

Each task starts from the source network and trains every weight; its file holds the whole network (every
float tensor), so memory is tasks x the float32 model size (plus each file's small header). Nothing is
shared, nothing is forgotten: the memory upper bound and, usually, the accuracy reference.
"""

from __future__ import annotations

import copy

from torch import nn

from nws.methods.base import Saved
from nws.methods.plain import PlainMethod, PlainStore, prefixed, state_parts, unprefixed


class IndividualStore(PlainStore):
    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        tensors = self.task_tensors(index)
        state = {k: v for part in ("body", "batchnorm", "head") for k, v in unprefixed(part, tensors).items()}
        return self.load_state(self.plain(len(entry["classes"])), state, str(self.root / entry["file"]))


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
        tensors = {k: v for part, state in state_parts(model).items() for k, v in prefixed(part, state).items()}
        return self.saved(store, index, tensors)
