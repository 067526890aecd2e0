"""The task-incremental pipeline: pretrain pools on a source task, then learn each task against the frozen
pools, store it as indices, and report every task's accuracy from storage alone."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from nws.config import RunConfig
from nws.convert import convert, freeze_pools
from nws.data import Benchmark, Task, benchmark_from_config
from nws.engine import barrier, eval_device, evaluate, fit, is_global_zero, last_checkpoint
from nws.errors import NWSError
from nws.models import create_model
from nws.report import continual_metrics, markdown_table
from nws.sparsity import has_zero_entry, kernel_sparsity, sparsity_table
from nws.store import MANIFEST, POOLS, SOURCE, ModelSpec, StoreError, TaskStore, atomic_write

# Settings that may differ when a run is resumed: where it runs and logs, not what it learns.
RESUME_MAY_DIFFER = ("out", "data.root", "data.num_workers", "trainer.accelerator", "trainer.devices",
                     "trainer.logger", "trainer.num_nodes", "trainer.strategy", "trainer.progress_bar",
                     "trainer.checkpoint", "data.source_root")


def task_seed(seed: int, index: int) -> int:
    """The seed of task ``index``'s training: a function of the run seed and the index alone, so a resumed
    run learns every task exactly as an uninterrupted run does."""
    return int.from_bytes(hashlib.sha256(f"nws-task:{seed}:{index}".encode()).digest()[:4], "little")


def reopen(store: TaskStore, config: RunConfig, num_tasks: int, progress: bool = True) -> None:
    """Check that ``store`` holds an interrupted run of ``config`` (same settings but
    :data:`RESUME_MAY_DIFFER`, every file intact, a first part of its ``num_tasks`` tasks done) and remove
    the temporary files its interruption left; :class:`StoreError` otherwise."""
    stored = store.manifest.get("config")
    if stored is not None:
        differ = config_differences(stored, json.loads(json.dumps(dataclasses.asdict(config))))
        if differ:
            raise StoreError(f"--resume: {store.root} was run with other settings ({'; '.join(differ[:3])}); "
                             "resume with the same config or choose another output directory")
    else:
        store.manifest["config"] = dataclasses.asdict(config)
        store.write_manifest()
    store.check()
    done = sorted(t["index"] for t in store.tasks())
    if done != list(range(len(done))) or len(done) > num_tasks:
        raise StoreError(f"--resume: {store.root} holds tasks {done}, not a first part of this run's "
                         f"{num_tasks} tasks")
    store.remove_temporaries()
    if progress and done:
        print(f"[resume] {len(done)} of {num_tasks} tasks already learned in {store.root}", flush=True)


def config_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: stored -> current`` for every setting (dotted key) that differs, except :data:`RESUME_MAY_DIFFER`
    and settings only one side has (added to or removed from nws since the run began)."""
    out = []
    for key in sorted(set(stored) & set(current)):
        dotted = f"{prefix}{key}"
        a, b = stored[key], current[key]
        if dotted in RESUME_MAY_DIFFER:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


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


def pretrained_spec(path: str, name: str, kwargs: dict[str, Any], pool_size: int, group_size: int,
                    exclude: list[str]) -> ModelSpec:
    """The model spec of the pool-pretraining run at ``path``, checked against this run's model settings."""
    spec = TaskStore(path).spec()
    want = (name, kwargs, pool_size, group_size, tuple(exclude))
    have = (spec.name, spec.kwargs, spec.pool_size, spec.group_size, spec.exclude)
    if want != have:
        raise NWSError(f"pretrained run {path} has model {have[0]} {have[1]} with pools K={have[2]} g={have[3]} "
                       f"exclude={list(have[4])}; this config asks for {want[0]} {want[1]} K={want[2]} g={want[3]} "
                       f"exclude={list(want[4])}")
    return spec


class NWSLearner:
    """Runs a :class:`RunConfig`: ``learner.run()`` pretrains pools, learns every task, writes the results.

    Everything is written to ``config.out``: the task store (pools, one file per task, manifest),
    ``results.json`` and ``results.md``.
    """

    def __init__(self, config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True):
        self.config = config
        self.out = Path(config.out)
        self.benchmark = benchmark or benchmark_from_config(config.data, config.seed)
        self.progress = progress
        # In a DDP run every rank runs the learner; rank 0 writes the run, the others only train (see _follow).
        self.writer = is_global_zero()
        self.device = eval_device(config.trainer)
        self._resume = False
        m = config.model
        kwargs = {"in_channels": self.benchmark.in_channels, **m.kwargs}
        if config.pretrained:
            self.spec = pretrained_spec(config.pretrained, m.name, kwargs, m.pool_size, m.group_size, m.exclude)
        elif self.benchmark.source is None:
            raise NWSError("data.source is none: set pretrained: RUN_DIR (pools pretrained by "
                           "configs/pretrain_pools_imagenet_resnet18.yaml) or choose a data.source")
        else:
            self.spec = ModelSpec(m.name, len(self.benchmark.source.classes), kwargs, m.pool_size, m.group_size,
                                  tuple(m.exclude))

    def _evaluate(self, model: nn.Module, data) -> float:
        return evaluate(model, data, num_workers=self.config.data.num_workers, device=self.device)

    def _drop_checkpoints(self, name: str) -> None:
        """Remove a stage's epoch checkpoints once its result is stored."""
        shutil.rmtree(self.out / "checkpoints" / name, ignore_errors=True)
        try:
            (self.out / "checkpoints").rmdir()  # only when no other stage's checkpoints are left
        except OSError:
            pass

    def _train(self, model: nn.Module, task: Task, pretrain: bool, name: str, seed: int | None = None) -> nn.Module:
        """Train one stage; checkpoints go to ``out/checkpoints/<name>/`` and, when resuming, the stage
        continues from its last checkpoint if it has one."""
        cfg = self.config.pretrain if pretrain else self.config.task
        checkpoints = self.out / "checkpoints" / name
        resume_from = last_checkpoint(checkpoints) if self._resume else None
        if self.progress and self.writer:
            what = "pretraining pools on" if pretrain else "learning"
            again = f", continuing from {resume_from}" if resume_from else ""
            print(f"[{name}] {what} {task.name} ({len(task.classes)} classes, {cfg.epochs} epochs{again})",
                  flush=True)
        return fit(model, task.train, cfg, self.config.trainer, pretrain=pretrain, log_dir=self.out, name=name,
                   num_workers=self.config.data.num_workers, checkpoint_dir=checkpoints, resume_from=resume_from,
                   seed=self.config.seed if seed is None else seed)

    def pretrain(self, store: TaskStore | None) -> nn.Module:
        """Pretrain the pools (EMA) and the network on the source task, or take both from the ``pretrained``
        run; store both (``store`` is None on DDP ranks that do not write)."""
        if self.config.pretrained:
            return self._use_pretrained(store)
        if self.config.model.init == "kmeans":
            return self._kmeans_pools(store)
        L.seed_everything(self.config.seed, verbose=False)
        m = self.config.model
        model = create_model(m.name, num_classes=self.spec.num_classes, **self.spec.kwargs)
        model = convert(model, pool_size=m.pool_size, group_size=m.group_size, exclude=list(m.exclude),
                        decay=m.decay, eps=m.eps, seed=self.config.seed, init=m.init, zero_entry=m.zero_entry)
        model = self._train(model, self.benchmark.source, pretrain=True, name="pretrain")
        freeze_pools(model)
        if store is not None:
            store.save_pools(model, self.spec)
            store.save_source(model, self.spec)
            self._record_source(store, model)
            self._drop_checkpoints("pretrain")
        return model

    def _kmeans_pools(self, store: TaskStore | None) -> nn.Module:
        """``model.init: kmeans``: train the plain network on the source task (the ``pretrain`` schedule, no
        search, one process), then build every layer's pool by k-means of its kernels
        (:func:`nws.pool_sources.pools_from_model`); the trained weights start the first task."""
        from nws.baselines.training import fit_plain
        from nws.pool_sources import pools_from_model

        L.seed_everything(self.config.seed, verbose=False)
        m, source = self.config.model, self.benchmark.source
        model = create_model(m.name, num_classes=self.spec.num_classes, **self.spec.kwargs)
        if self.progress and self.writer:
            print(f"[pretrain] training the plain network on {source.name} ({len(source.classes)} classes, "
                  f"{self.config.pretrain.epochs} epochs), then k-means pools", flush=True)
        model = fit_plain(model, source.train, self.config.pretrain, self.config.trainer, log_dir=self.out,
                          name="pretrain", num_workers=self.config.data.num_workers)
        plain_accuracy = self._evaluate(model, source.test)
        model, report = pools_from_model(model, m.pool_size, m.group_size, seed=self.config.seed,
                                         exclude=list(m.exclude), zero_entry=m.zero_entry)
        if store is not None:
            store.save_pools(model, self.spec)
            store.save_source(model, self.spec)
            self._record_source(store, model)
            store.manifest["source"].update(accuracy_plain=plain_accuracy, pools="kmeans",
                                            quantisation=[r.to_json() for r in report])
            store.write_manifest()
        return model

    def _use_pretrained(self, store: TaskStore | None) -> nn.Module:
        """The pools and network of the ``pretrained`` run, copied byte for byte into this run."""
        source = TaskStore(self.config.pretrained)
        model = source.load_source()
        if store is not None:
            store.write(POOLS, source.read(POOLS))
            store.manifest["spec"] = source.spec().to_json()
            store.write(SOURCE, source.read(SOURCE))
            self._record_source(store, model)
        return model

    def _record_source(self, store: TaskStore, model: nn.Module) -> None:
        if self.config.pretrained:
            record = dict(TaskStore(self.config.pretrained).manifest.get("source") or {})
            store.manifest["source"] = {**record, "pretrained": str(self.config.pretrained)}
        else:
            store.manifest["source"] = {"name": self.benchmark.source.name,
                                        "accuracy": self._evaluate(model, self.benchmark.source.test)}
        store.write_manifest()

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
        L.seed_everything(task_seed(self.config.seed, index), verbose=False)
        model = self._train(model, task, pretrain=False, name=f"task_{index:03d}",
                            seed=task_seed(self.config.seed, index))
        if store is None:
            return {}
        acc = self._evaluate(model, task.test)
        spec = dataclasses.replace(self.spec, num_classes=len(task.classes))
        store.save_task(index, model, spec, task.name, task.classes, acc_after_training=acc,
                        float32_model=float32_bytes(model))
        rebuilt = TaskStore(self.out).model(index)
        store.update_task(index, acc_from_storage=self._evaluate(rebuilt, task.test))
        if has_zero_entry(rebuilt):
            store.update_task(index, sparsity=kernel_sparsity(rebuilt))
        self._drop_checkpoints(f"task_{index:03d}")
        return next(t for t in store.tasks() if t["index"] == index)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """The whole sequence; returns (and writes) the results.

        With ``resume``, an interrupted run in ``config.out`` is continued: its files are verified, the
        pools and source network are reused if they were saved, finished tasks are kept as they are, and
        the first unfinished task is learned again from its beginning. Every task's training is seeded
        from the run seed and its index alone (:func:`task_seed`), and every task starts from its
        predecessor rebuilt from storage, so a resumed run writes the same task files as an uninterrupted
        one. Without ``resume`` (or with nothing to resume), a new run is started; a directory that already
        holds a run is refused. A stage interrupted mid-way continues from its last epoch checkpoint.
        """
        self._resume = resume
        if not self.writer:
            return self._follow(resume)
        if resume and (self.out / MANIFEST).exists():
            store = self._reopen()
        else:
            store = TaskStore(self.out, create=True)
            store.manifest["config"] = dataclasses.asdict(self.config)
            store.write_manifest()
        if not {POOLS, SOURCE} <= set(store.manifest["files"]):
            if store.tasks():
                raise StoreError(f"{self.out} lists tasks but lacks its pools or source network")
            self.pretrain(store)
            barrier()
        elif "source" not in store.manifest:  # interrupted between saving the source and recording its accuracy
            self._record_source(store, TaskStore(self.out).load_source())
        done = {t["index"] for t in store.tasks()}
        for index in range(len(self.benchmark.tasks)):
            if index in done:
                if "acc_from_storage" not in next(t for t in store.tasks() if t["index"] == index):
                    rebuilt = TaskStore(self.out).model(index)
                    test = self.benchmark.tasks[index].test
                    store.update_task(index, acc_from_storage=self._evaluate(rebuilt, test))
                continue
            fresh = TaskStore(self.out)
            start = fresh.load_source() if index == 0 else fresh.model(index - 1)
            self.learn(store, index, start)
            barrier()
        return self.finish(store)

    def _follow(self, resume: bool) -> dict[str, Any]:
        """A DDP rank other than 0: takes part in every training and writes nothing.

        It decides what to train from the run directory as rank 0 does (read only: on resume rank 0 changes
        nothing that decides it), waits at a barrier while rank 0 stores each stage, and starts each task
        from what rank 0 stored. Before the first training there is no barrier yet, so the first task's start
        comes from the ``pretrained`` run itself (the same bytes rank 0 copies).
        """
        existing = TaskStore(self.out) if resume and (self.out / MANIFEST).exists() else None
        files = set(existing.manifest["files"]) if existing else set()
        done = {t["index"] for t in existing.tasks()} if existing else set()
        if not {POOLS, SOURCE} <= files:
            self.pretrain(None)
            barrier()
        for index in range(len(self.benchmark.tasks)):
            if index in done:
                continue
            if index == 0:
                start = TaskStore(self.config.pretrained or self.out).load_source()
            else:
                start = TaskStore(self.out).model(index - 1)
            self.learn(None, index, start)
            barrier()
        return {}

    def _reopen(self) -> TaskStore:
        """The interrupted run in ``config.out``, verified and checked to be this config's run."""
        store = TaskStore(self.out)
        reopen(store, self.config, len(self.benchmark.tasks), self.progress)
        return store

    def finish(self, store: TaskStore) -> dict[str, Any]:
        """Evaluate every task from storage (a fresh store) and write ``results.json`` and ``results.md``."""
        fresh = TaskStore(self.out)
        results = collect_results(fresh, self.benchmark, num_workers=self.config.data.num_workers,
                                  device=self.device)
        atomic_write(self.out / "results.json", json.dumps(results, indent=1).encode())
        atomic_write(self.out / "results.md", (markdown_table(results) + sparsity_table(results)).encode())
        return results


def collect_results(store: TaskStore, benchmark: Benchmark, num_workers: int = 0,
                    device: torch.device | None = None) -> dict[str, Any]:
    """The ``results.json`` contract, each task evaluated from storage now (on ``device``)."""
    tasks = []
    for entry in store.tasks():
        task = benchmark.tasks[entry["index"]]
        tasks.append({"name": entry["name"], "classes": entry["classes"],
                      "acc_after_training": entry["acc_after_training"],
                      "acc_from_storage": evaluate(store.model(entry["index"]), task.test, num_workers=num_workers,
                                                   device=device),
                      "bytes": entry["bytes"], "float32_model": entry["float32_model"]})
        tasks[-1]["acc_final"] = tasks[-1]["acc_from_storage"]  # NWS never changes a stored task
        if "sparsity" in entry:
            tasks[-1]["sparsity"] = entry["sparsity"]
    pools = store.manifest["files"]["pools.safetensors"]["size"]
    total = sum(sum(t["bytes"].values()) for t in tasks)
    return {"average_accuracy": sum(t["acc_from_storage"] for t in tasks) / max(len(tasks), 1),
            "tasks": tasks,
            "memory": {"pools": pools, "tasks_total": total,
                       "float32_model": max((t["float32_model"] for t in tasks), default=0)},
            "source": store.manifest.get("source"),
            "method": "nws", "seed": (store.manifest.get("config") or {}).get("seed"),
            "config": store.manifest.get("config"),
            "backward_transfer": continual_metrics(tasks)["backward_transfer"],
            "forgetting": continual_metrics(tasks)["forgetting"],
            "memory_after_task": [pools + s for s in itertools.accumulate(sum(t["bytes"].values()) for t in tasks)]}
