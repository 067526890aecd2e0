"""Individual networks: an independent copy of the network per task, stored in float32.

Each task starts from the source network and trains every weight; its file holds the whole network (every
float tensor), so memory is tasks x the float32 model size (plus each file's small header). Nothing is
shared, nothing is forgotten: the memory upper bound and, usually, the accuracy reference.
"""

from __future__ import annotations

import copy

from torch import nn

from nws.baselines.common import BaselineLearner, BaselineStore, load_float_state, prefixed, state_parts, unprefixed


class IndividualStore(BaselineStore):
    method = "individual"

    def build(self, index: int) -> nn.Module:
        entry = self.entry(index)
        model = self.plain(len(entry["classes"]))
        tensors, _ = self.file(entry["file"], "task")
        state = {k: v for part in ("body", "batchnorm", "head") for k, v in unprefixed(part, tensors).items()}
        load_float_state(model, state, str(self.root / entry["file"]))
        return model


class IndividualLearner(BaselineLearner):
    method = "individual"
    store_class = IndividualStore

    def start(self, store: BaselineStore, source: nn.Module) -> None:
        self.source = source

    def learn(self, store: BaselineStore, index: int) -> nn.Module:
        task = self.benchmark.tasks[index]
        model = self.head_for(copy.deepcopy(self.source).train(), index)
        for p in model.parameters():
            p.requires_grad_(True)
        model = self.fit(model, task, self.config.task, f"task_{index:03d}", index=index)
        tensors = {k: v for part, state in state_parts(model).items() for k, v in prefixed(part, state).items()}
        self.save(store, index, model, tensors)
        return model
