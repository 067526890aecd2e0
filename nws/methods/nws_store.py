"""NWS's reader of a run directory: the frozen pools, the pool-pretrained network, the reference and one file of
codes per task (formats: :mod:`nws.taskfile`; the directory and its manifest: :mod:`nws.store`)."""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any

import numpy as np
from torch import Tensor, nn

from nws.codes import code_layout
from nws.convert import materialize
from nws.errors import StoreError
from nws.packing import Layout
from nws.spec import ModelSpec, is_int
from nws.store import SOURCE, RunStore, task_file
from nws.taskfile import (SOURCE_REFERENCE, TaskFile, build_model, build_task, model_from_source,
                          pools_bytes, read_pools, read_reference, read_task_file, reference_bytes,
                          reference_pools_bytes, reference_task_bytes, source_bytes, task_bytes, task_codes)

POOLS = "pools.safetensors"
REFERENCE = "reference.safetensors"


class TaskStore(RunStore):
    """An NWS run: the frozen pools, the pool-pretrained network, the reference, one file of codes per task.

    ``model(i)`` is task ``i``'s network rebuilt from the shared files (pools, reference) and its task file;
    ``codes(i)`` its pool indices without building a model; ``load_source()`` the network the first task
    starts from. A task coded against an earlier task (``model.code_reference: previous``) needs that task's
    codes too, back to its key task (coded against the reference).
    """

    CODES_CACHE = 4  # decoded tasks kept: a chain is read in order, each task needing the one before

    def __init__(self, root: str | os.PathLike, create: bool = False, method: str = "nws", **fields: Any):
        super().__init__(root, create, method, **fields)
        self._pools: tuple[dict[str, Tensor], str, ModelSpec] | None = None
        self._reference: dict[str, Tensor] | None = None
        self._layouts: dict[int, Layout] = {}
        self._codes: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        """The run's ``spec``, and per task its ``sparsity`` and ``reference_bytes`` records."""
        if "spec" in manifest:
            try:
                ModelSpec.from_json(manifest["spec"])
            except StoreError:
                return "bad model spec"
        for t in manifest["tasks"]:
            if not isinstance(t.get("sparsity", {}), dict):
                return f"bad sparsity in task {t['index']}"
            sizes = t.get("reference_bytes")
            if not (isinstance(sizes, dict) and all(is_int(v) for v in sizes.values())):
                return f"bad or missing reference sizes in task {t['index']}"
        return None

    def shared_files(self) -> list[str]:
        """The pools, and the reference every task is coded against (written once the source stage is done)."""
        return [POOLS] + ([REFERENCE] if REFERENCE in self.manifest["files"] else [])

    def save_pools(self, model: nn.Module, spec: ModelSpec) -> None:
        self.write(POOLS, pools_bytes(model, spec))
        self.manifest["spec"] = spec.to_json()
        self._pools = None
        self.write_manifest()

    def _read_pools(self) -> tuple[dict[str, Tensor], str, ModelSpec]:
        if self._pools is None:
            what = str(self.root / POOLS)
            books, fingerprint, spec = read_pools(self.read(POOLS), what)
            if "spec" in self.manifest and self.manifest["spec"] != spec.to_json():
                raise StoreError(f"{what} and the manifest disagree on the model spec")
            self._pools = (books, fingerprint, spec)
        return self._pools

    def pools(self) -> tuple[dict[str, Tensor], str]:
        """The run's codebooks by layer, and their fingerprint."""
        books, fingerprint, _ = self._read_pools()
        return books, fingerprint

    def spec(self) -> ModelSpec:
        """The run's model spec (architecture and NWS settings; ``num_classes`` of the source task)."""
        return self._read_pools()[2]

    def layout(self, num_classes: int) -> Layout:
        """The codes layout of the run's model with ``num_classes`` classes (built once per class count)."""
        if num_classes not in self._layouts:
            spec = dataclasses.replace(self.spec(), num_classes=num_classes)
            self._layouts[num_classes] = code_layout(build_model(spec, f"{self.root}: model spec"))
        return self._layouts[num_classes]

    def save_source(self, model: nn.Module, spec: ModelSpec) -> None:
        """The pool-pretrained network: the starting weights of the first task."""
        self.write(SOURCE, source_bytes(model, spec))

    def load_source(self) -> nn.Module:
        """The pool-pretrained network rebuilt from storage, its pools loaded from the pools file and frozen."""
        books, _, spec = self._read_pools()
        return model_from_source(self.read(SOURCE), books, spec, str(self.root / SOURCE))

    def save_reference(self) -> None:
        """Store the reference the tasks are coded against: the indices of the source network, as stored."""
        self.write(REFERENCE, reference_bytes(self.load_source(), self.pools()[1]))
        self._reference = None

    def reference_codes(self) -> dict[str, Tensor]:
        """The run's reference: the source network's indices per layer."""
        if self._reference is None:
            if REFERENCE not in self.manifest["files"]:
                raise StoreError(f"{self.root} has no {REFERENCE}, which its tasks are coded against")
            self._reference = read_reference(self.read(REFERENCE), self.layout(self.spec().num_classes),
                                             self.pools()[1], str(self.root / REFERENCE))
        return self._reference

    def save_task(self, index: int, model: nn.Module, name: str, classes: list[str],
                  against: str | int = SOURCE_REFERENCE, bn_dtype: str = "float32",
                  **record: Any) -> dict[str, int]:
        """Store task ``index`` (codes against ``against``: ``"source"`` or an earlier task's index, BatchNorm
        as ``bn_dtype``, other state) and list it with ``record``, its size as the reference would store it and
        what serving the tasks so far takes (``memory_after``); returns its sizes."""
        data, sizes = self.task_bytes(index, model, name, classes, against, bn_dtype)
        self.add_task({"index": index, "name": name, "classes": list(classes), "file": task_file(index),
                       "bytes": sizes, "reference_bytes": reference_task_bytes(model), **record},
                      {task_file(index): data})
        self.record_memory(index)
        return sizes

    def task_bytes(self, index: int, model: nn.Module, name: str, classes: list[str],
                   against: str | int = SOURCE_REFERENCE, bn_dtype: str = "float32",
                   ) -> tuple[bytes, dict[str, int]]:
        """Task ``index``'s file (:func:`nws.taskfile.task_bytes`), coded against the run's reference or the
        stored codes of task ``against``."""
        reference = self.reference_codes() if against == SOURCE_REFERENCE else self.codes(int(against))
        task = {"index": index, "name": name, "classes": list(classes)}
        return task_bytes(model, task, self.pools()[1], reference, against, bn_dtype)

    def add_task(self, entry: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        self._codes.pop(entry["index"], None)
        return super().add_task(entry, files)

    def _task_file(self, index: int) -> TaskFile:
        """Task ``index``'s file, verified and parsed, checked to hold the task the manifest lists."""
        entry = self.task_entry(index)
        what = str(self.root / entry["file"])
        tf = read_task_file(self.read(entry["file"]), self.pools()[1], what)
        if tf.task["index"] != index or tf.task["name"] != entry["name"]:
            raise StoreError(f"{what} holds task {tf.task['index']} ({tf.task['name']}), the manifest lists it as "
                             f"task {index} ({entry['name']})")
        return tf

    def _decode(self, tf: TaskFile) -> dict[str, Tensor]:
        return task_codes(tf, self.layout(len(tf.task["classes"])), self.pools()[0], self._reference_of)

    def _reference_of(self, against: str | int) -> dict[str, Tensor]:
        return self.reference_codes() if against == SOURCE_REFERENCE else self._codes[int(against)]

    def codes(self, index: int) -> dict[str, Tensor]:
        """Task ``index``'s pool indices per layer, read from its task file (no model is built), and from the
        tasks back to its key task where it is coded against the previous one."""
        chain: list[TaskFile] = []
        i: str | int = index
        while i != SOURCE_REFERENCE and i not in self._codes:
            chain.append(self._task_file(int(i)))
            i = chain[-1].reference
        for tf in reversed(chain):
            self._codes[tf.task["index"]] = self._decode(tf)
            while len(self._codes) > max(self.CODES_CACHE, len(chain)):
                self._codes.popitem(last=False)
        self._codes.move_to_end(index)
        return self._codes[index]

    def pool_usage(self) -> dict[str, Any]:
        """Per layer and task: the pool utilisation (distinct indices used / pool size), read from the task
        files; per task the fraction of all pool entries (over every layer) it uses, and the same for all tasks
        together; per layer its number of grouped kernels (the most entries a task can use); per layer and task
        the fraction of its kernels off the reference's entries (``off_reference``; None where the layer has
        no reference of its length, a classifier resized for the task)."""
        books, _ = self.pools()
        layers = list(books)
        sizes = np.array([books[name].shape[0] for name in layers], dtype=np.float64)
        ref = self.reference_codes()
        used: list[list[set[int]]] = []
        off: list[list[float | None]] = []
        tasks, kernels = [], [0] * len(layers)
        for t in self.tasks():
            codes = self.codes(t["index"])
            used.append([set(np.unique(codes[name].numpy()).tolist()) for name in layers])
            off.append([float((codes[name] != ref[name]).double().mean())
                        if name in ref and ref[name].shape == codes[name].shape and len(codes[name]) else None
                        for name in layers])
            kernels = [max(k, len(codes[name])) for k, name in zip(kernels, layers)]
            tasks.append(t["name"])
        counts = np.array([[len(u) for u in per_task] for per_task in used], dtype=np.float64).T  # layers x tasks
        union = [len(set().union(*(per_task[i] for per_task in used))) for i in range(len(layers))] if used else []
        return {"layers": layers, "tasks": tasks, "pool_sizes": sizes.astype(int).tolist(), "kernels": kernels,
                "utilisation": (counts / sizes[:, None]).tolist() if used else [],
                "task_fraction": (counts.sum(0) / sizes.sum()).tolist() if used else [],
                "all_tasks_fraction": float(sum(union) / sizes.sum()) if used else 0.0,
                "layer_union": [u / s for u, s in zip(union, sizes)],
                "off_reference": [list(per_layer) for per_layer in zip(*off)] if used else []}

    def build(self, index: int) -> nn.Module:
        codes = self.codes(index)
        books, _, spec = self._read_pools()
        return build_task(self._task_file(index), books, spec, codes=codes)

    def build_plain(self, index: int) -> nn.Module:
        """:meth:`build` materialised with its stored indices (no search)."""
        return materialize(self.build(index), inplace=True, codes=self.codes(index))

    def memory_extras(self) -> dict[str, Any]:
        """``reference_equivalent``: the run's memory as the reference implementation stores it
        (``docs/reference.md``, row 6): its pools file for these pools, and every task's indices and BatchNorm
        (``reference_bytes``, recorded when the task was stored)."""
        tasks = self.tasks()
        pools = reference_pools_bytes(self.pools()[0])
        total = sum(v for t in tasks for v in t["reference_bytes"].values())
        return {"reference_equivalent": {"pools": pools, "tasks_total": total, "total": pools + total}}


def save_pools_run(out: str | os.PathLike, model: nn.Module, spec: ModelSpec, source: dict[str, Any]) -> TaskStore:
    """Write ``model``'s pools and network as a pool-pretraining run directory (pools, source network,
    manifest), which ``nws run --pretrained OUT`` starts its first task from; ``source`` (where the pools come
    from) is recorded in the manifest. A directory that already holds a run is refused."""
    store = TaskStore(out, create=True)
    store.save_pools(model, spec)
    store.save_source(model, spec)
    store.manifest["source"] = source
    store.write_manifest()
    return store
