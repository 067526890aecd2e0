"""Fine-tuning: one network trained on each task in turn, a classifier head kept per task.

Stored: the network (every weight and BatchNorm except the classifier; a new ``network_00i.safetensors``
after each task replaces the previous one) and one file per task with its classifier. Task ``i`` is served
by the *current* network and head ``i``, so earlier tasks are re-evaluated on weights later tasks have
changed: this shows forgetting.
"""

from __future__ import annotations


from torch import nn

from nws.methods.base import Saved
from nws.methods.plain import (PlainMethod, PlainStore, batchnorm_state, batchnorm_tensors, prefixed, state_parts,
                               unprefixed)


class FinetuneStore(PlainStore):
    rewrites_network = True

    def build(self, index: int) -> nn.Module:
        entry = self.task_entry(index)
        network, _ = self.network()
        head = self.task_tensors(index)
        model, what = self.plain(len(entry["classes"])), str(self.root / entry["file"])
        state = {**unprefixed("body", network), **batchnorm_state(network, model, what), **unprefixed("head", head)}
        return self.load_state(model, state, what)


class Finetune(PlainMethod):
    """Starts from the source network; each task fine-tunes every weight of the previous task's network."""

    name = "finetune"
    store_class = FinetuneStore
    colour, marker = "#1f77b4", "v"

    def start(self, store: PlainStore, source: nn.Module) -> None:
        self.model = source

    def restore(self, store: PlainStore, index: int) -> None:
        self.model = store.build(index)

    def learn(self, index: int) -> nn.Module:
        model = self.head_for(self.unfolded(self.model, index).train(), index)
        for p in model.parameters():
            p.requires_grad_(True)
        self.model = self.train_task(model, index)
        return self.model

    def save(self, store: PlainStore, index: int, model: nn.Module) -> Saved:
        parts = state_parts(model)
        return self.saved(store, index, prefixed("head", parts["head"]),
                          network={**prefixed("body", parts["body"]),
                                   **batchnorm_tensors(parts["batchnorm"], self.config.model.bn_dtype)})
