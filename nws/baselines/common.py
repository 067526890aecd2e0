"""What every baseline shares: source pretraining of the plain backbone, the task loop, storage and results.

A baseline run directory is a task store (``manifest.json`` with each file's size and sha256, safetensors
files written atomically) whose manifest names its ``method``. Memory is counted from the files that must
be kept to serve every task: the method's shared files plus one file per task. The source-pretrained
network (``source.safetensors``) is the common starting point and is not counted, as NWS does not count its
own.

A network that changes with every task (fine-tuning, PackNet) is never rewritten in place: the one after
task ``i`` is written as ``network_00i.safetensors``, becomes current when task ``i`` is listed, and only then
is the previous one removed. A crash therefore leaves every listed task servable, and ``--resume`` continues
from the last listed task exactly as an uninterrupted run would.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.config import RunConfig, TrainConfig
from nws.data import Benchmark, Task, benchmark_from_config
from nws.engine import evaluate
from nws.errors import NWSError
from nws.learner import float32_bytes, reopen, resize_classifier, task_seed
from nws.models import create_model
from nws.report import continual_metrics, markdown_table
from nws.store import (MANIFEST, SOURCE, StoreError, TaskStore, atomic_write, nbytes, pack_file, task_file,
                       unpack_file)

# ----------------------------------------------------------------------------------- model parts


def classifier_name(model: nn.Module) -> str:
    name = getattr(model, "classifier_name", None)
    if name is None:
        raise StoreError(f"model {type(model).__name__} has no classifier_name attribute")
    return name


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers PackNet prunes and Piggyback masks: every Conv2d and Linear except the classifier."""
    head = classifier_name(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head]


def state_parts(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The float state split into ``head`` (classifier), ``batchnorm`` and ``body`` (everything else).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are left out: inference does not use them.
    """
    head = classifier_name(model) + "."
    bn = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    parts: dict[str, dict[str, Tensor]] = {"head": {}, "batchnorm": {}, "body": {}}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        part = "head" if key.startswith(head) else "batchnorm" if key.startswith(bn) else "body"
        parts[part][key] = value.detach().clone()
    return parts


def load_float_state(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load ``state`` into ``model``, which must cover exactly its float entries (integer buffers may lack)."""
    expected = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    if set(state) != expected:
        raise StoreError(f"{what}: stored state does not match the model (missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise StoreError(f"{what}: {str(err).splitlines()[0]}") from None


def pack_masks(masks: dict[str, Tensor]) -> Tensor:
    """Binary masks, one bit per weight (layer order, row-major), as a uint8 tensor."""
    flat = np.concatenate([m.detach().cpu().numpy().astype(bool).ravel() for m in masks.values()]) \
        if masks else np.zeros(0, bool)
    return torch.from_numpy(np.packbits(flat))


def unpack_masks(bits: Tensor, shapes: dict[str, list[int]], what: str) -> dict[str, Tensor]:
    """Inverse of :func:`pack_masks` for layers of ``shapes``."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    flat = np.unpackbits(bits.numpy().astype(np.uint8))
    if len(flat) != 8 * ((sum(sizes) + 7) // 8):
        raise StoreError(f"{what}: masks have {len(flat)} bits, the layers need {sum(sizes)}")
    out, pos = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        out[name] = torch.from_numpy(flat[pos : pos + size].astype(bool)).reshape(shape)
        pos += size
    return out


# ----------------------------------------------------------------------------------- the store


class BaselineStore(TaskStore):
    """A baseline's run directory: ``model(i)`` rebuilds task ``i`` from the files alone (cached)."""

    method: ClassVar[str]
    shared_files: ClassVar[tuple[str, ...]] = ()  # written once
    rewrites_network: ClassVar[bool] = False  # a network file per task, the last listed task's one current

    def shared(self) -> list[str]:
        """The shared files that serve the tasks listed now."""
        tasks = self.manifest["tasks"]
        current = [network_file(max(t["index"] for t in tasks))] if self.rewrites_network and tasks else []
        return [*self.shared_files, *current]

    def network(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of the current network (after the last listed task)."""
        return self.file(self.shared()[-1], "network")

    def prune(self) -> None:
        """Remove every file no listed task needs (a superseded network, files of an unfinished task)."""
        keep = {SOURCE, *self.shared(), *(t["file"] for t in self.manifest["tasks"])}
        for name in [f for f in self.manifest["files"] if f not in keep]:
            self.remove(name)

    def file(self, name: str, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of a verified file of ``kind``."""
        return unpack_file(self.read(name), f"nws-{self.method}-{kind}", str(self.root / name))

    def put(self, name: str, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> int:
        """Write a safetensors file of ``kind`` atomically and record it; returns its size."""
        data = pack_file(f"nws-{self.method}-{kind}", tensors, meta)
        self.write(name, data)
        return len(data)

    def entry(self, index: int) -> dict[str, Any]:
        for t in self.manifest["tasks"]:
            if t["index"] == index:
                return t
        raise StoreError(f"{self.root} has no task {index} (tasks: {[t['index'] for t in self.manifest['tasks']]})")

    def plain(self, num_classes: int) -> nn.Module:
        """A fresh plain network of the run's architecture."""
        spec = self.manifest.get("model") or {}
        try:
            return create_model(spec["name"], num_classes=num_classes, **spec["kwargs"])
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{self.root}: cannot build the run's model ({err})") from None

    def shared_size(self) -> int:
        return sum(self.manifest["files"][f]["size"] for f in self.shared() if f in self.manifest["files"])

    def serving_size(self) -> int:
        """Bytes of every file needed to serve the tasks stored so far."""
        return self.shared_size() + sum(self.manifest["files"][t["file"]]["size"] for t in self.manifest["tasks"])

    def model(self, index: int) -> nn.Module:
        if index not in self._cache:
            self._cache[index] = self.build(index).eval()
        return self._cache[index]

    def build(self, index: int) -> nn.Module:
        """Task ``index``'s network from the files alone."""
        raise NotImplementedError


def task_sizes(size: int, tensors: dict[str, Tensor]) -> dict[str, int]:
    """A task file's size split into ``weights`` / ``masks`` / ``batchnorm`` / ``other`` (header), summing to it."""
    sizes = {"weights": nbytes(v for k, v in tensors.items() if k.startswith(("head.", "body."))),
             "masks": nbytes(v for k, v in tensors.items() if k == "masks"),
             "batchnorm": nbytes(v for k, v in tensors.items() if k.startswith("batchnorm."))}
    sizes["other"] = size - sum(sizes.values())
    return sizes


def network_file(index: int) -> str:
    """The shared network after task ``index`` of a method that changes it with every task."""
    return f"network_{index:03d}.safetensors"


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------------- the learner


class BaselineLearner:
    """Runs a baseline under the NWS protocol: same data, backbone, schedule and source pretraining.

    ``run()`` trains the plain backbone on the source task, learns every task in order, stores each, and
    writes ``results.json`` (the NWS contract plus ``method``, per-task ``acc_final``, ``memory_after_task``,
    ``backward_transfer`` and ``forgetting``) and ``results.md``.
    """

    method: ClassVar[str]
    store_class: ClassVar[type[BaselineStore]]

    def __init__(self, config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True,
                 pretrained_source: nn.Module | None = None):
        """``pretrained_source``: a plain backbone already trained on this benchmark's source task with this
        config's ``pretrain`` schedule and seed (``nws demo --compare`` trains it once for all baselines)."""
        self.config = config
        self.pretrained_source = pretrained_source
        self.source_network: nn.Module | None = None
        self.out = Path(config.out)
        if config.pretrained:
            raise NWSError(f"method {self.method} pretrains its plain backbone on the source task itself; "
                           "unset `pretrained` (a pool-pretraining run serves NWS only)")
        self.benchmark = benchmark or benchmark_from_config(config.data, config.seed)
        self.progress = progress

    def fit(self, model: nn.Module, task: Task, cfg: TrainConfig, name: str, index: int = -1,
            **kwargs: Any) -> nn.Module:
        """Train on ``task``; the seed (weights drawn, data order) depends on the run seed and ``index`` alone
        (``-1``: the source task), as in NWS."""
        from nws.baselines.training import fit_plain

        seed = self.config.seed if index < 0 else task_seed(self.config.seed, index)
        L.seed_everything(seed, verbose=False)
        if self.progress:
            print(f"[{self.method}:{name}] learning {task.name} ({len(task.classes)} classes, {cfg.epochs} epochs)",
                  flush=True)
        return fit_plain(model, task.train, cfg, self.config.trainer, log_dir=self.out, name=f"{self.method}_{name}",
                         num_workers=self.config.data.num_workers, seed=seed, **kwargs)

    def pretrain(self, store: BaselineStore) -> nn.Module:
        """The plain backbone trained on the source task with the ``pretrain`` schedule (the common start)."""
        if self.pretrained_source is None:
            model = store.plain(len(self.benchmark.source.classes))
            model = self.fit(model, self.benchmark.source, self.config.pretrain, "pretrain")
        else:
            model = copy.deepcopy(self.pretrained_source)
        store.write(SOURCE, pack_file("nws-source-plain", model.state_dict(), {"model": store.manifest["model"]}))
        return model

    def load_source(self, store: BaselineStore) -> nn.Module:
        """The source-pretrained backbone of an interrupted run, from its file."""
        what = str(store.root / SOURCE)
        tensors, _ = unpack_file(store.read(SOURCE), "nws-source-plain", what)
        model = store.plain(len(self.benchmark.source.classes))
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            raise StoreError(f"{what}: {str(err).splitlines()[0]}") from None
        return model

    def start(self, store: BaselineStore, source: nn.Module) -> None:
        """Method-specific setup after pretraining (e.g. writing the frozen backbone)."""

    def restore(self, store: BaselineStore, index: int) -> None:
        """Method-specific state after task ``index`` from the files, to continue an interrupted run."""

    def learn(self, store: BaselineStore, index: int) -> nn.Module:
        """Learn task ``index``, store it (:meth:`save`), return the trained network."""
        raise NotImplementedError

    def head_for(self, model: nn.Module, index: int) -> nn.Module:
        """``model`` with its classifier resized to task ``index`` (rows kept, new rows seeded, as NWS does)."""
        resize_classifier(model, classifier_name(model), len(self.benchmark.tasks[index].classes),
                          seed=self.config.seed + index)
        return model

    def save(self, store: BaselineStore, index: int, model: nn.Module, tensors: dict[str, Tensor],
             network: dict[str, Tensor] | None = None, network_meta: dict[str, Any] | None = None,
             masks: dict[str, Tensor] | None = None) -> None:
        """Store task ``index``: its file and (methods that change it) the network after it, then list it
        in the manifest (sizes, accuracy after training and from storage, memory so far, the fraction of
        the masked weights its ``masks`` keep), then remove the superseded network."""
        task = self.benchmark.tasks[index]
        size = store.put(task_file(index), "task", tensors, {"index": index, "name": task.name})
        if network is not None:
            store.put(network_file(index), "network", network, {"after_task": index, **(network_meta or {})})
        entry = {"index": index, "name": task.name, "classes": list(task.classes), "file": task_file(index),
                 "bytes": task_sizes(size, tensors), "acc_after_training": evaluate(model, task.test),
                 "float32_model": float32_bytes(model)}
        if masks:
            entry["mask_density"] = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        store.manifest["tasks"] = [t for t in store.manifest["tasks"] if t["index"] != index] + [entry]
        store.manifest["tasks"].sort(key=lambda t: t["index"])
        entry["memory_after"] = store.serving_size()
        store.write_manifest()
        self._record_from_storage(store, index)
        store.prune()

    def _record_from_storage(self, store: BaselineStore, index: int) -> None:
        entry = store.entry(index)
        entry["acc_from_storage"] = evaluate(type(store)(self.out).model(index), self.benchmark.tasks[index].test)
        store.write_manifest()

    def run(self, resume: bool = False) -> dict[str, Any]:
        """The whole sequence; returns (and writes) the results.

        With ``resume``, an interrupted run in ``config.out`` continues after its last listed task: its
        files are verified, finished tasks are kept as they are, and the method's state after the last one
        (the network, PackNet's weight owners) is read back from the files. Every task's training is
        seeded from the run seed and its index alone, so the resumed run writes the same files as an
        uninterrupted one.
        """
        L.seed_everything(self.config.seed, verbose=False)
        model_spec = {"name": self.config.model.name,
                      "kwargs": {"in_channels": self.benchmark.in_channels, **self.config.model.kwargs}}
        if resume and (self.out / MANIFEST).exists():
            store = self.store_class(self.out)
            if store.manifest.setdefault("method", self.method) != self.method:
                raise StoreError(f"--resume: {self.out} holds a run of method {store.manifest['method']}, "
                                 f"not {self.method}")
            store.manifest.setdefault("model", model_spec)
            reopen(store, self.config, len(self.benchmark.tasks), self.progress)
            store.prune()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            store = self.store_class(self.out, create=True)
            store.manifest.update(method=self.method, config=dataclasses.asdict(self.config), model=model_spec)
            store.write_manifest()
        if SOURCE in store.manifest["files"]:
            source = self.load_source(store)
        elif store.tasks():
            raise StoreError(f"{self.out} lists tasks but lacks its source network")
        else:
            source = self.pretrain(store)
        self.source_network = copy.deepcopy(source)
        if "source" not in store.manifest:
            store.manifest["source"] = {"name": self.benchmark.source.name,
                                        "accuracy": evaluate(source, self.benchmark.source.test)}
            store.write_manifest()
        self.start(store, source)
        done = [t["index"] for t in store.tasks()]
        for index in done:
            if "acc_from_storage" not in store.entry(index):  # interrupted while evaluating it from storage
                self._record_from_storage(store, index)
        if done:
            self.restore(store, done[-1])
        for index in range(len(done), len(self.benchmark.tasks)):
            self.learn(store, index)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Evaluate every task from a fresh store now and write ``results.json`` and ``results.md``."""
        results = collect_results(self.store_class(self.out), self.benchmark)
        atomic_write(self.out / "results.json", json.dumps(results, indent=1).encode())
        atomic_write(self.out / "results.md", markdown_table(results).encode())
        return results


def collect_results(store: BaselineStore, benchmark: Benchmark) -> dict[str, Any]:
    """The ``results.json`` contract for a baseline; ``acc_final`` is each task evaluated from storage now."""
    tasks = []
    for entry in store.tasks():
        task = benchmark.tasks[entry["index"]]
        tasks.append({"name": entry["name"], "classes": entry["classes"],
                      "acc_after_training": entry["acc_after_training"],
                      "acc_from_storage": entry["acc_from_storage"],
                      "acc_final": evaluate(store.model(entry["index"]), task.test),
                      "bytes": entry["bytes"], "float32_model": entry["float32_model"]})
        if "mask_density" in entry:
            tasks[-1]["mask_density"] = entry["mask_density"]
    config = store.manifest.get("config", {})
    return {"method": store.method, "seed": config.get("seed"), "config": config,
            **continual_metrics(tasks),
            "tasks": tasks,
            "memory": {"shared": store.shared_size(), "tasks_total": sum(sum(t["bytes"].values()) for t in tasks),
                       "float32_model": max((t["float32_model"] for t in tasks), default=0)},
            "memory_after_task": [t["memory_after"] for t in store.tasks()],
            "source": store.manifest.get("source")}
