"""The task-incremental protocol, one loop for every method.

:func:`run` checks the whole configuration and loads the data before anything is written, then: the source
stage (the method makes and stores the network the first task starts from), every task in order (seeded by
the run seed and its index alone; trained by the method; its files written atomically and listed with how its
inputs are prepared (:mod:`nws.data.preparation`); rebuilt from storage and evaluated, and every earlier task
too, rebuilt from storage as it stands now: a row of the accuracy matrix), and finally every task evaluated
from storage again, into ``results.json`` and ``results.md`` (:mod:`nws.results`), whoever calls it.

An interrupted run continues with ``resume``: its files are verified, it must be this config's run,
finished tasks are kept byte for byte, the method's state after the last one is read back from the files,
and the first unfinished task is learned again (from its last epoch checkpoint, if any). Since every task is
seeded by its index alone and starts from what is stored, a resumed run writes the same files as an
uninterrupted one. In a distributed run every rank trains; rank 0 alone writes, the others follow it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from nws import interrupts
from nws.config import ConfigError, RunConfig
from nws.config_parser import stored_config, validate
from nws.data import Benchmark, benchmark_from_config
from nws.devices import barrier, eval_device, is_global_zero, use_threads
from nws.engine import seed_everything, task_seed
from nws.errors import StoreError
from nws.methods import Context, Method, method_class
from nws.metrics import float32_bytes
from nws.results import RESULTS, collect_results, write_results
from nws.store import MANIFEST, RunStore

# Settings that may differ when a run is resumed: where it runs and logs, not what it learns.
RESUME_MAY_DIFFER = ("out", "data.root", "data.num_workers", "trainer.accelerator", "trainer.devices",
                     "trainer.logger", "trainer.num_nodes", "trainer.strategy", "trainer.progress_bar",
                     "trainer.checkpoint", "trainer.threads", "data.source_root")


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
    requirements (:meth:`~nws.methods.Method.check`, its constructor), the data (its folders and files).
    ``shared_source``: a source network made by another method of the same
    :meth:`~nws.methods.Method.source_key`, which the method stores instead of making its own. After the
    source stage, ``source`` is a copy of the source network when the method's may be shared, else None.
    """

    def __init__(self, config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True,
                 shared_source: nn.Module | None = None):
        self.config = validate(config)
        use_threads(config.trainer)
        self.method_class = method_class(config.method)
        self.method_class.check(config)
        benchmark = benchmark or benchmark_from_config(config.data, config.seed)
        self.ctx = Context(config, benchmark, eval_device(config.trainer), writer=is_global_zero(), progress=progress)
        self.method: Method = self.method_class(self.ctx, shared_source=shared_source)
        self.out = Path(config.out)
        self.source: nn.Module | None = None

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
        if self.method_class.source_key(self.config) is not None:
            self.source = copy.deepcopy(source)
        method.start(store, source)
        done = [t["index"] for t in store.tasks()]
        for index in done:  # a run interrupted right after listing its last task
            if "memory_after" not in store.task_entry(index):
                store.record_memory(index)
            if "acc_from_storage" not in store.task_entry(index) or (
                    index == done[-1] and "acc_so_far" not in store.task_entry(index)):
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
        return self.method.store_class(self.out, create=True, method=self.method.name,
                                       config=dataclasses.asdict(self.config), **self.method.manifest_fields())

    def _reopen(self) -> RunStore:
        """The interrupted run in ``out``, verified and checked to be this config's run, its leftovers removed."""
        store = self.method.store_class(self.out)
        if store.method != self.method.name:
            raise StoreError(f"--resume: {self.out} holds a run of method {store.method}, not {self.method.name}")
        current = json.loads(json.dumps(dataclasses.asdict(self.config)))
        stored = store.manifest.get("config")
        if stored is None:
            raise StoreError(f"--resume: {self.out} does not record the settings it was run with (it was not written "
                             "by a run); choose another output directory")
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
        task, name = self.ctx.benchmark.tasks[index], f"task_{index:03d}"
        with interrupts.stage(name) as complete:  # until listed, an interrupt stops this task (not the run)
            seed_everything(task_seed(self.config.seed, index))
            wall, cpu = time.perf_counter(), time.process_time()
            model = self.method.finish(self.method.learn(index), index)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            acc = self.ctx.evaluate(model, task.test)
            saved = self.method.save(store, index, model)
            entry = {"index": index, "name": task.name, "classes": list(task.classes), **saved.record,
                     "acc_after_training": acc, "float32_model": float32_bytes(model),
                     "train_seconds": round(wall, 3), "train_cpu_seconds": round(cpu, 3)}
            preparation = task.input_preparation()
            if preparation is not None:
                entry["preparation"] = preparation.to_json()
            skipped = sum(n for stage, n in self.ctx.skipped_steps.items() if stage.startswith(name))
            if skipped:
                entry["skipped_steps"] = skipped
            complete()
            store.add_task(entry, saved.files)
        store.keep_only(self._needed(store))  # e.g. the network the new one supersedes
        store.record_memory(index)
        self._record_from_storage(store, index)
        self.ctx.drop_checkpoints(name)

    def _record_from_storage(self, store: RunStore, index: int) -> None:
        """Task ``index`` (the last listed) rebuilt from storage and evaluated, and every earlier task as storage
        serves it now (``acc_so_far``: row ``index`` of the accuracy matrix)."""
        fresh = self.method.store_class(self.out)
        rebuilt = fresh.model(index)
        tests = [t.test for t in self.ctx.benchmark.tasks]
        acc = self.ctx.evaluate(rebuilt, tests[index])
        earlier = []
        for i in range(index):
            earlier.append(self.ctx.evaluate(fresh.plain_model(i), tests[i]))
            fresh.drop(i)
        store.update_task(index, acc_from_storage=acc, acc_so_far=[*earlier, acc], **self.method.describe(rebuilt))

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
                self.method.finish(self.method.learn(index), index)
                barrier()
        return {}

    def finish(self) -> dict[str, Any]:
        """Evaluate every task from storage now (a fresh reader) and write ``results.json`` and ``results.md``."""
        results = collect_results(self.method.store_class(self.out), self.ctx.benchmark,
                                  num_workers=self.config.data.num_workers, device=self.ctx.device)
        write_results(self.out, results)
        return results


def run(config: RunConfig, benchmark: Benchmark | None = None, resume: bool = False, progress: bool = True,
        shared_source: nn.Module | None = None) -> dict[str, Any]:
    """Run ``config`` (see :class:`Runner`); returns the results."""
    return Runner(config, benchmark, progress, shared_source).run(resume)
