"""The task-incremental protocol, one loop for every method.

:func:`run` checks the whole configuration and loads the data before anything is written, then: the source
stage (the method makes and stores the network the first task starts from), every task in order (seeded by
the run seed and its index alone; trained by the method; its files written atomically and listed; rebuilt
from storage and evaluated), and finally every task evaluated from storage again, into ``results.json``.

An interrupted run continues with ``resume``: its files are verified, it must be this config's run,
finished tasks are kept byte for byte, the method's state after the last one is read back from the files,
and the first unfinished task is learned again (from its last epoch checkpoint, if any). Since every task is
seeded by its index alone and starts from what is stored, a resumed run writes the same files as an
uninterrupted one. In a distributed run every rank trains; rank 0 alone writes, the others follow it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from nws.config import ConfigError, RunConfig, stored_config, validate
from nws.data import Benchmark, benchmark_from_config
from nws.engine import barrier, eval_device, evaluate, is_global_zero, use_threads
from nws.errors import StoreError
from nws.methods import Context, Method, method_class
from nws.metrics import continual_metrics
from nws.methods.base import float32_bytes, seed_everything, task_seed
from nws.store import MANIFEST, RunStore, atomic_write

# Settings that may differ when a run is resumed: where it runs and logs, not what it learns.
RESUME_MAY_DIFFER = ("out", "data.root", "data.num_workers", "trainer.accelerator", "trainer.devices",
                     "trainer.logger", "trainer.num_nodes", "trainer.strategy", "trainer.progress_bar",
                     "trainer.checkpoint", "trainer.threads", "data.source_root")
RESULTS = "results.json"


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


class Runner:
    """One run of ``config`` (its ``method``) on ``benchmark`` (default: the one the config names).

    Everything is checked here, before :meth:`run` writes anything: the settings, the method's own
    requirements, the data (its folders and files), a ``pretrained`` run's model. ``method_options`` go to
    the method (e.g. ``plain_source`` for a baseline).
    """

    def __init__(self, config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True,
                 **method_options: Any):
        self.config = validate(config)
        use_threads(config.trainer)
        self.method_class = method_class(config.method)
        self.method_class.check(config)
        benchmark = benchmark or benchmark_from_config(config.data, config.seed)
        if benchmark.source is None and not config.pretrained:
            raise ConfigError("data.source is none: set pretrained: RUN_DIR (pools pretrained by "
                              "configs/pretrain_pools_imagenet_resnet18.yaml) or choose a data.source")
        self.ctx = Context(config, benchmark, eval_device(config.trainer), writer=is_global_zero(), progress=progress)
        self.method: Method = self.method_class(self.ctx, **method_options)
        self.out = Path(config.out)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """The whole sequence; returns the results (written to ``results.json``), or ``{}`` on a distributed rank
        that does not write. A directory that already holds a run is refused unless ``resume``."""
        self.ctx.resume = resume
        if not self.ctx.writer:
            return self._follow(resume)
        finished = None if resume else self.finished()
        if finished is not None:
            self.ctx.say(f"{self.out} already holds this run, finished; its results:")
            return finished
        store = self._reopen() if resume and (self.out / MANIFEST).exists() else self._create()
        method, files = self.method, store.manifest["files"]
        if all(f in files for f in method.source_files):
            source = method.load_source(store)
            if "source" not in store.manifest:  # interrupted between saving the source and recording it
                method.record_source(store, source)
        elif store.tasks():
            raise StoreError(f"{self.out} lists tasks but lacks its source files")
        else:
            seed_everything(self.config.seed)
            source = method.pretrain(store)
            self.ctx.drop_checkpoints("pretrain")
            barrier()
        method.start(store, source)
        done = [t["index"] for t in store.tasks()]
        for index in done:
            if "acc_from_storage" not in store.task_entry(index):  # interrupted while evaluating it from storage
                self._record_from_storage(store, index)
        if done:
            method.restore(store, done[-1])
        for index in range(len(done), len(self.ctx.benchmark.tasks)):
            self._learn(store, index)
            barrier()
        return self.finish()

    def finished(self) -> dict[str, Any] | None:
        """The results of this very run if ``out`` already holds it finished (same settings, files verified),
        so that running the same command again shows them instead of refusing; None otherwise."""
        if not (self.out / RESULTS).is_file() or not (self.out / MANIFEST).is_file():
            return None
        try:
            store = RunStore(self.out)
            results = json.loads((self.out / RESULTS).read_text())
        except (StoreError, OSError, ValueError):
            return None
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        stored = store.manifest.get("config")
        if store.method != self.method.name or not isinstance(stored, dict) or config_differences(stored, current):
            return None
        done = [t["index"] for t in store.tasks()]
        if done != list(range(len(self.ctx.benchmark.tasks))) or not isinstance(results, dict):
            return None
        store.check()
        return results

    def _create(self) -> RunStore:
        store = self.method.store_class(self.out, create=True)
        store.manifest.update(method=self.method.name, config=dataclasses.asdict(self.config),
                              **self.method.manifest_fields())
        store.write_manifest()
        return store

    def _reopen(self) -> RunStore:
        """The interrupted run in ``out``, verified and checked to be this config's run, its leftovers removed."""
        store = self.method.store_class(self.out)
        if store.method != self.method.name:
            raise StoreError(f"--resume: {self.out} holds a run of method {store.method}, not {self.method.name}")
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        stored = store.manifest.setdefault("config", current)  # a store written from Python may not record it
        stored_config(stored, f"--resume: {self.out}'s config")  # refuses settings nws no longer has
        differ = config_differences(stored, current)
        if differ:
            raise StoreError(f"--resume: {self.out} was run with other settings ({'; '.join(differ[:3])}); "
                             "resume with the same config or choose another output directory")
        store.check()
        done = [t["index"] for t in store.tasks()]
        if done != list(range(len(done))) or len(done) > len(self.ctx.benchmark.tasks):
            raise StoreError(f"--resume: {self.out} holds tasks {done}, not a first part of this run's "
                             f"{len(self.ctx.benchmark.tasks)} tasks")
        store.remove_temporaries()
        store.keep_only(self._needed(store))
        if done:
            self.ctx.say(f"[resume] {len(done)} of {len(self.ctx.benchmark.tasks)} tasks already learned in {self.out}")
        return store

    def _needed(self, store: RunStore) -> set[str]:
        """The files the listed tasks and the next one need: the source files, the shared files, the tasks'."""
        return {*self.method.source_files, *store.shared_files(), *(t["file"] for t in store.tasks())}

    def _learn(self, store: RunStore, index: int) -> None:
        """Learn task ``index``, store it, rebuild it from storage alone and record its accuracy from there."""
        task = self.ctx.benchmark.tasks[index]
        seed_everything(task_seed(self.config.seed, index))
        wall, cpu = time.perf_counter(), time.process_time()
        model = self.method.learn(index)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        acc = self.ctx.evaluate(model, task.test)
        saved = self.method.save(store, index, model)
        entry = {"index": index, "name": task.name, "classes": list(task.classes), **saved.record,
                 "acc_after_training": acc, "float32_model": float32_bytes(model),
                 "train_seconds": round(wall, 3), "train_cpu_seconds": round(cpu, 3)}
        skipped = sum(n for stage, n in self.ctx.skipped_steps.items() if stage.startswith(f"task_{index:03d}"))
        if skipped:
            entry["skipped_steps"] = skipped
        store.add_task(entry, saved.files)
        store.keep_only(self._needed(store))  # e.g. the network the new one supersedes
        store.update_task(index, memory_after=store.size(store.shared_files() + [t["file"] for t in store.tasks()]))
        self._record_from_storage(store, index)
        self.ctx.drop_checkpoints(f"task_{index:03d}")

    def _record_from_storage(self, store: RunStore, index: int) -> None:
        rebuilt = self.method.store_class(self.out).model(index)
        store.update_task(index, acc_from_storage=self.ctx.evaluate(rebuilt, self.ctx.benchmark.tasks[index].test),
                          **self.method.describe(rebuilt))

    def _follow(self, resume: bool) -> dict[str, Any]:
        """A distributed rank other than 0: takes part in every training and writes nothing.

        It decides what to train from the run directory as rank 0 does (read only: on resume rank 0 changes
        nothing that decides it), and waits at a barrier while rank 0 stores each stage.
        """
        if not self.method.distributed:
            raise ConfigError(f"method {self.method.name} trains in one process")
        existing = RunStore(self.out) if resume and (self.out / MANIFEST).exists() else None
        files = set(existing.manifest["files"]) if existing else set()
        done = {t["index"] for t in existing.tasks()} if existing else set()
        if not set(self.method.source_files) <= files:
            seed_everything(self.config.seed)
            self.method.pretrain(None)
            barrier()
        for index in range(len(self.ctx.benchmark.tasks)):
            if index not in done:
                seed_everything(task_seed(self.config.seed, index))
                self.method.learn(index)
                barrier()
        return {}

    def finish(self) -> dict[str, Any]:
        """Evaluate every task from storage now (a fresh reader) and write ``results.json``."""
        results = collect_results(self.method.store_class(self.out), self.ctx.benchmark,
                                  num_workers=self.config.data.num_workers, device=self.ctx.device)
        atomic_write(self.out / RESULTS, json.dumps(results, indent=1).encode())
        return results


def collect_results(store: RunStore, benchmark: Benchmark, num_workers: int = 0, device: Any = None) -> dict[str, Any]:
    """The ``results.json`` contract, the same for every method: per task what its manifest entry records plus
    ``acc_final`` (rebuilt from storage and evaluated now); continual metrics; memory, and where the reader
    provides it (NWS) ``memory.reference_equivalent``, what the reference implementation would store."""
    tasks = []
    for entry in store.tasks():
        test = benchmark.tasks[entry["index"]].test
        task = {k: v for k, v in entry.items() if k not in ("index", "file", "memory_after")}
        task["acc_final"] = evaluate(store.model(entry["index"]), test, num_workers=num_workers, device=device)
        tasks.append(task)
    shared = store.shared_files()
    sizes = [sum(t["bytes"].values()) for t in tasks]
    after = [t.get("memory_after") for t in store.tasks()]
    if None in after:  # a run begun before nws recorded it: shared files (never changed) plus the tasks so far
        after = [store.size(shared) + sum(sizes[: i + 1]) for i in range(len(sizes))]
    config = store.manifest.get("config") or {}
    memory = {"shared": store.size(shared), "shared_files": {name: store.size([name]) for name in shared},
              "tasks_total": sum(sizes), "float32_model": max((t["float32_model"] for t in tasks), default=0)}
    figures = store.reference_equivalent()  # what the reference implementation would store (NWS runs)
    if figures is not None:
        memory["reference_equivalent"] = figures
    return {"method": store.method, "seed": config.get("seed"), "config": config,
            **continual_metrics(tasks), "tasks": tasks, "memory": memory,
            "memory_after_task": after, "source": store.manifest.get("source")}


def run(config: RunConfig, benchmark: Benchmark | None = None, resume: bool = False, progress: bool = True,
        **method_options: Any) -> dict[str, Any]:
    """Run ``config`` (see :class:`Runner`); returns the results."""
    return Runner(config, benchmark, progress, **method_options).run(resume)
