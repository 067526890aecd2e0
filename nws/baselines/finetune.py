"""Fine-tuning: one network trained on each task in turn, a classifier head kept per task.

Stored: the network (every weight and BatchNorm except the classifier; a new ``network_00i.safetensors``
after each task replaces the previous one) and one file per task with its classifier. Task ``i`` is served
by the *current* network and head ``i``, so earlier tasks are re-evaluated on weights later tasks have
changed: this shows forgetting.
"""

from __future__ import annotations

from torch import nn

from nws.baselines.common import (BaselineLearner, BaselineStore, load_float_state, prefixed, state_parts,
                                  unprefixed)


class FinetuneStore(BaselineStore):
    method = "finetune"
    rewrites_network = True

    def build(self, index: int) -> nn.Module:
        entry = self.entry(index)
        model = self.plain(len(entry["classes"]))
        network, _ = self.network()
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
        self.save(store, index, model, prefixed("head", parts["head"]),
                  network={**prefixed("body", parts["body"]), **prefixed("batchnorm", parts["batchnorm"])})
        self.model = model
        return model

    def restore(self, store: BaselineStore, index: int) -> None:
        self.model = store.build(index)
