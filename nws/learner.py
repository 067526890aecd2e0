"""The task-incremental pipeline: pretrain pools on a source task, then learn each task against the frozen
pools, store it as indices, and report every task's accuracy from storage alone."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from nws.config import RunConfig
from nws.convert import convert, freeze_pools
from nws.data import Benchmark, Task, load_benchmark
from nws.engine import evaluate, fit
from nws.models import create_model
from nws.report import markdown_table
from nws.store import ModelSpec, TaskStore, nbytes


@torch.no_grad()
def resize_classifier(model: nn.Module, name: str, num_classes: int, seed: int = 0) -> None:
    """Give the classifier ``name`` ``num_classes`` outputs: existing rows are kept, new rows initialised
    as a fresh ``nn.Linear`` would be (seeded)."""
    layer = model.get_submodule(name)
    old = layer.weight.shape[0]
    if old == num_classes:
        return
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(layer.weight.shape[1])
    keep = min(old, num_classes)
    weight = (torch.rand(num_classes, *layer.weight.shape[1:], generator=gen) * 2 - 1) * bound
    weight[:keep] = layer.weight[:keep]
    layer.weight = nn.Parameter(weight.to(layer.weight))
    if layer.bias is not None:
        bias = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
        bias[:keep] = layer.bias[:keep]
        layer.bias = nn.Parameter(bias.to(layer.bias))
    layer.out_features = num_classes


def float32_bytes(model: nn.Module) -> int:
    """Size of the same network stored plainly in float32: all parameters and buffers, pools excluded."""
    return sum(4 * t.numel() for k, t in model.state_dict().items()
               if ".pool." not in f".{k}" and t.is_floating_point())


class NWSLearner:
    """Runs a :class:`RunConfig`: ``learner.run()`` pretrains pools, learns every task, writes the results.

    Everything is written to ``config.out``: the task store (pools, one file per task, manifest),
    ``results.json`` and ``results.md``.
    """

    def __init__(self, config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True):
        self.config = config
        self.out = Path(config.out)
        self.benchmark = benchmark or load_benchmark(config.data.name, config.data.root, seed=config.seed)
        self.progress = progress
        m = config.model
        self.spec = ModelSpec(m.name, len(self.benchmark.source.classes),
                              {"in_channels": self.benchmark.in_channels, **m.kwargs}, m.pool_size, m.group_size,
                              tuple(m.exclude))

    def _train(self, model: nn.Module, task: Task, pretrain: bool, name: str) -> nn.Module:
        cfg = self.config.pretrain if pretrain else self.config.task
        if self.progress:
            what = "pretraining pools on" if pretrain else "learning"
            print(f"[{name}] {what} {task.name} ({len(task.classes)} classes, {cfg.epochs} epochs)", flush=True)
        return fit(model, task.train, cfg, self.config.trainer, pretrain=pretrain, log_dir=self.out, name=name,
                   num_workers=self.config.data.num_workers)

    def pretrain(self, store: TaskStore) -> nn.Module:
        """Pretrain the pools (EMA) and the network on the source task; store both."""
        m = self.config.model
        model = create_model(m.name, num_classes=self.spec.num_classes, **self.spec.kwargs)
        model = convert(model, pool_size=m.pool_size, group_size=m.group_size, exclude=list(m.exclude),
                        decay=m.decay, eps=m.eps, seed=self.config.seed, init=m.init)
        model = self._train(model, self.benchmark.source, pretrain=True, name="pretrain")
        freeze_pools(model)
        store.save_pools(model, self.spec)
        store.save_source(model, self.spec)
        store.manifest["source"] = {"name": self.benchmark.source.name,
                                    "accuracy": evaluate(model, self.benchmark.source.test)}
        store.write_manifest()
        return model

    def learn(self, store: TaskStore, index: int, start: nn.Module) -> dict[str, Any]:
        """Learn task ``index`` from ``start`` (the previous task rebuilt from storage), store and check it."""
        task = self.benchmark.tasks[index]
        model = start.train()
        classifier = getattr(model, "classifier_name", None)
        if classifier is None:
            raise ValueError(f"model {self.spec.name!r} has no classifier_name attribute")
        resize_classifier(model, classifier, len(task.classes), seed=self.config.seed + index)
        for p in model.parameters():
            p.requires_grad_(True)
        model = self._train(model, task, pretrain=False, name=f"task_{index:03d}")
        acc = evaluate(model, task.test)
        spec = dataclasses.replace(self.spec, num_classes=len(task.classes))
        store.save_task(index, model, spec, task.name, task.classes, acc_after_training=acc,
                        float32_model=float32_bytes(model))
        rebuilt = TaskStore(self.out).model(index)
        store.update_task(index, acc_from_storage=evaluate(rebuilt, task.test))
        return store.tasks()[-1]

    def run(self) -> dict[str, Any]:
        """The whole sequence; returns (and writes) the results."""
        L.seed_everything(self.config.seed, verbose=False)
        self.out.mkdir(parents=True, exist_ok=True)
        store = TaskStore(self.out, create=True)
        store.manifest["config"] = dataclasses.asdict(self.config)
        store.write_manifest()
        model = self.pretrain(store)
        for index in range(len(self.benchmark.tasks)):
            start = model if index == 0 else TaskStore(self.out).model(index - 1)
            self.learn(store, index, start)
        return self.finish(store)

    def finish(self, store: TaskStore) -> dict[str, Any]:
        """Evaluate every task from storage (a fresh store) and write ``results.json`` and ``results.md``."""
        fresh = TaskStore(self.out)
        results = collect_results(fresh, self.benchmark)
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        table = markdown_table(results)
        (self.out / "results.md").write_text(table)
        return results


def collect_results(store: TaskStore, benchmark: Benchmark) -> dict[str, Any]:
    """The ``results.json`` contract, each task evaluated from storage now."""
    tasks = []
    for entry in store.tasks():
        task = benchmark.tasks[entry["index"]]
        tasks.append({"name": entry["name"], "classes": entry["classes"],
                      "acc_after_training": entry["acc_after_training"],
                      "acc_from_storage": evaluate(store.model(entry["index"]), task.test),
                      "bytes": entry["bytes"], "float32_model": entry["float32_model"]})
    pools = store.manifest["files"]["pools.safetensors"]["size"]
    total = sum(sum(t["bytes"].values()) for t in tasks)
    return {"average_accuracy": sum(t["acc_from_storage"] for t in tasks) / max(len(tasks), 1),
            "tasks": tasks,
            "memory": {"pools": pools, "tasks_total": total,
                       "float32_model": max((t["float32_model"] for t in tasks), default=0)},
            "source": store.manifest.get("source")}
