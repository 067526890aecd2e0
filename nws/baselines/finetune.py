"""Fine-tuning: one network trained on each task in turn, a classifier head kept per task.

Stored: ``network.safetensors`` (every weight and BatchNorm except the classifier, overwritten after each
task) and one file per task with its classifier. Task ``i`` is served by the *current* network and head
``i``, so earlier tasks are re-evaluated on weights later tasks have changed: this shows forgetting.
"""

from __future__ import annotations

from torch import nn

from nws.baselines.common import (BaselineLearner, BaselineStore, load_float_state, prefixed, state_parts,
                                  unprefixed)
from nws.store import task_file

NETWORK = "network.safetensors"


class FinetuneStore(BaselineStore):
    method = "finetune"
    shared_files = (NETWORK,)

    def build(self, index: int) -> nn.Module:
        entry = self.entry(index)
        model = self.plain(len(entry["classes"]))
        network, _ = self.file(NETWORK, "network")
        head, _ = self.file(entry["file"], "task")
        state = {**unprefixed("body", network), **unprefixed("batchnorm", network), **unprefixed("head", head)}
        load_float_state(model, state, str(self.root / entry["file"]))
        return model


class FinetuneLearner(BaselineLearner):
    """Starts from the source network; each task fine-tunes every weight of the previous task's network."""

    method = "finetune"
    store_class = FinetuneStore

    def start(self, store: BaselineStore, source: nn.Module) -> None:
        self.model = source

    def learn(self, store: BaselineStore, index: int) -> nn.Module:
        task = self.benchmark.tasks[index]
        model = self.head_for(self.model.train(), index)
        for p in model.parameters():
            p.requires_grad_(True)
        model = self.fit(model, task, self.config.task, f"task_{index:03d}", index=index)
        parts = state_parts(model)
        store.put(NETWORK, "network", {**prefixed("body", parts["body"]), **prefixed("batchnorm", parts["batchnorm"])},
                  {"after_task": index})
        tensors = prefixed("head", parts["head"])
        size = store.put(task_file(index), "task", tensors, {"index": index, "name": task.name})
        self.record(store, index, model, tensors, size)
        self.model = model
        return model
