"""Neural Weight Search as a method: pools pretrained once, each task searched in them and stored as indices.

Source stage: the network is converted to NWS layers and trained on the source task while every pool follows
its kernels by EMA (``model.init``: entries start as sampled kernels or from N(0, 1)); or ``kmeans``: the plain
network is trained, then each pool is the k-means of its layer's kernels; or the pools and network of a
``pretrained`` run are copied. Stored once: ``pools.safetensors`` (shared memory) and ``source.safetensors``
(the first task's start), and ``reference.safetensors`` (shared memory): the source network's indices, which
every task's indices are coded against. Task ``t`` starts from task ``t-1`` rebuilt from its indices (task 0,
and every task with ``model.task_start: source``, from the source network), its classifier resized, and
trains against the frozen pools; its file holds the indices coded against the reference (or, with
``model.code_reference: previous``, against task ``t-1``'s indices, with a key task coded against the
reference every ``model.key_every`` tasks), BatchNorm and biases (:mod:`nws.taskfile`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from nws.config import ConfigError, RunConfig, TrainConfig
from nws.convert import commitment_loss, convert, freeze_pools, nws_layers, update_pools
from nws.engine import LossTerm, task_seed
from nws.errors import StoreError
from nws.methods.base import Context, Method, Saved
from nws.models import create_model
from nws.pool import all_reduce_step_statistics
from nws.pool_sources import pools_from_model
from nws.rate import reprice, set_rate
from nws.sparsity import has_zero_entry, kernel_sparsity, sparsity_loss
from nws.methods.nws_store import POOLS, REFERENCE, TaskStore, save_pools_run
from nws.store import SOURCE, task_file
from nws.spec import ModelSpec
from nws.taskfile import SOURCE_REFERENCE, reference_task_bytes


class PoolEMA(L.Callback):
    """Pool pretraining: after every optimizer step every trainable pool follows its kernels by EMA. Under DDP
    the pools' per-step statistics are first averaged over the ranks
    (:func:`nws.pool.all_reduce_step_statistics`), so all ranks hold identical pools, equal to a single
    process's on the same global batch. The pools, their statistics and the update stay fp32 under mixed
    precision."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            all_reduce_step_statistics(layer.pool for _, layer in nws_layers(pl_module.model) if layer.pool.trainable)
            update_pools(pl_module.model)


class RateWarmup(L.Callback):
    """The rate's lambda rising from 0 to ``lam`` over the first ``fraction`` of a task's optimizer steps, in
    :attr:`LEVELS` equal steps, then held. Kernels first move as at lambda 0; as the price rises each goes back
    to its reference unless its move pays; far fewer end off their reference than at ``lam`` from the first
    step, at the same accuracy (docs/rate.md). The first level is a new penalty (a full search), the others the
    same at a higher price (:func:`nws.rate.reprice`: the search keeps its bounds). Set from the step count, so
    a resumed task takes up the level where it stopped."""

    LEVELS = 16

    def __init__(self, reference: dict[str, torch.Tensor], lam: float, fraction: float):
        self.reference, self.lam, self.fraction = reference, lam, fraction
        self.level: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        warm = self.fraction * trainer.estimated_stepping_batches
        level = self.LEVELS if trainer.global_step >= warm else int(self.LEVELS * trainer.global_step / warm)
        if level != self.level:
            lam = self.lam * level / self.LEVELS
            if self.level and level > self.level:
                reprice(pl_module.model, lam)  # the search keeps its bounds
            else:
                set_rate(pl_module.model, self.reference, lam)
            self.level = level


def nws_loss_terms(model: nn.Module, cfg: TrainConfig) -> list[LossTerm]:
    """NWS's terms for a model with NWS layers: ``beta`` times the commitment term, and with ``sparsity`` the
    group-lasso pull towards the pools' zero entries; none for a plain model (k-means pools' first stage)."""
    if not any(True for _ in nws_layers(model)):
        return []
    terms = [LossTerm("commit", cfg.beta, commitment_loss)]
    if cfg.sparsity:
        terms.append(LossTerm("sparsity", cfg.sparsity, sparsity_loss))
    return terms


def pretrained_spec(path: str, name: str, kwargs: dict[str, Any], pool_size: int, group_size: int,
                    exclude: list[str]) -> ModelSpec:
    """The model spec of the pool-pretraining run at ``path``, checked against this run's model settings."""
    try:
        spec = TaskStore(path).spec()
    except StoreError as err:
        raise ConfigError(f"pretrained: {err}") from None
    want = (name, kwargs, pool_size, group_size, tuple(exclude))
    have = (spec.name, spec.kwargs, spec.pool_size, spec.group_size, spec.exclude)
    if want != have:
        raise ConfigError(f"pretrained: run {path} has model {have[0]} {have[1]} with pools K={have[2]} g={have[3]} "
                          f"exclude={list(have[4])}; this config asks for {want[0]} {want[1]} K={want[2]} "
                          f"g={want[3]} exclude={list(want[4])}")
    return spec


class NWS(Method):
    name = "nws"
    store_class = TaskStore
    distributed = True
    source_files = (POOLS, SOURCE)
    colour, marker = "#d62728", "o"

    def __init__(self, ctx: Context, shared_source: nn.Module | None = None):
        super().__init__(ctx, shared_source)
        m, bench = self.config.model, ctx.benchmark
        kwargs = {"in_channels": bench.in_channels, **m.kwargs}
        if self.config.pretrained:
            self.spec = pretrained_spec(self.config.pretrained, m.name, kwargs, m.pool_size, m.group_size, m.exclude)
        elif bench.source is None:
            raise ConfigError("data.source is none: set pretrained: RUN_DIR (pools pretrained by "
                              "configs/pretrain_pools_imagenet_resnet18.yaml) or choose a data.source")
        else:
            self.spec = ModelSpec(m.name, len(bench.source.classes), kwargs, m.pool_size, m.group_size,
                                  tuple(m.exclude))

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.pretrained and config.model.init == "kmeans":
            raise ConfigError("model.init kmeans builds pools here; unset pretrained (it brings its own pools)")

    @classmethod
    def pool_usage(cls, path: str) -> dict[str, Any]:
        return TaskStore(path).pool_usage()

    def loss_terms(self, model: nn.Module, cfg: TrainConfig) -> list[LossTerm]:
        return nws_loss_terms(model, cfg)

    # -- the source stage
    def pretrain(self, store: TaskStore | None) -> nn.Module:
        """Pretrain the pools (EMA) and the network on the source task, or build k-means pools, or take both
        from the ``pretrained`` run; store both."""
        if self.config.pretrained:
            return self._copy_pretrained(store)
        m, source = self.config.model, self.ctx.benchmark.source
        model = create_model(m.name, num_classes=self.spec.num_classes, **self.spec.kwargs)
        if m.init == "kmeans":
            model = self.fit(model, source, self.config.pretrain, "pretrain", self.config.seed,
                             what="training the plain network (then k-means pools) on")
            plain_accuracy = self.ctx.evaluate(model, source.test)
            model, report = pools_from_model(model, m.pool_size, m.group_size, seed=self.config.seed,
                                             exclude=list(m.exclude), zero_entry=m.zero_entry)
        else:
            model = convert(model, pool_size=m.pool_size, group_size=m.group_size, exclude=list(m.exclude),
                            decay=m.decay, eps=m.eps, seed=self.config.seed, init=m.init, zero_entry=m.zero_entry)
            model = self.fit(model, source, self.config.pretrain, "pretrain", self.config.seed,
                             what="pretraining pools on", callbacks=[PoolEMA()])
            freeze_pools(model)
        if store is not None:
            store.save_pools(model, self.spec)
            store.save_source(model, self.spec)
            self.record_source(store, model)
            if m.init == "kmeans":
                store.manifest["source"].update(accuracy_plain=plain_accuracy, pools="kmeans",
                                                quantisation=[r.to_json() for r in report])
                store.write_manifest()
        return model

    def _copy_pretrained(self, store: TaskStore | None) -> nn.Module:
        """The pools and network of the ``pretrained`` run, copied byte for byte into this run."""
        source = TaskStore(self.config.pretrained)
        model = source.load_source()
        if store is not None:
            store.write(POOLS, source.read(POOLS))
            store.manifest["spec"] = source.spec().to_json()
            store.write(SOURCE, source.read(SOURCE))
            self.record_source(store, model)
        return model

    def load_source(self, store: TaskStore) -> nn.Module:
        return TaskStore(store.root).load_source()

    def record_source(self, store: TaskStore, source: nn.Module) -> None:
        if not self.config.pretrained:
            return super().record_source(store, source)
        record = dict(TaskStore(self.config.pretrained).manifest.get("source") or {})
        store.manifest["source"] = {**record, "pretrained": str(self.config.pretrained)}
        store.write_manifest()

    # -- tasks
    def learn(self, index: int) -> nn.Module:
        """Task ``index`` from its predecessor rebuilt from storage (task 0, and every task with
        ``model.task_start: source``: the source network)."""
        task = self.ctx.benchmark.tasks[index]
        if index == 0 or self.config.model.task_start == "source":
            start = TaskStore(self.config.pretrained or self.ctx.out).load_source()
        else:
            start = self.unfolded(TaskStore(self.ctx.out).model(index - 1), index)
        model = self.head_for(start.train(), index)
        for p in model.parameters():
            p.requires_grad_(True)
        m, callbacks = self.config.model, []
        if m.rate and m.rate_warmup:
            callbacks.append(RateWarmup(self.reference_for(index), m.rate, m.rate_warmup))
        elif m.rate:
            set_rate(model, self.reference_for(index), m.rate)
        return self.fit(model, task, self.config.task, f"task_{index:03d}", task_seed(self.config.seed, index),
                        callbacks=callbacks)

    def reference_for(self, index: int) -> dict[str, torch.Tensor]:
        """The indices task ``index`` is coded against (:meth:`against`), read from the run's files."""
        store = TaskStore(self.ctx.out)
        against = self.against(index)
        return store.reference_codes() if against == SOURCE_REFERENCE else store.codes(int(against))

    def start(self, store: TaskStore, source: nn.Module) -> None:
        """Store the run's reference (the source network's indices, read back from its file) once."""
        if REFERENCE not in store.manifest["files"]:
            store.save_reference()

    def against(self, index: int) -> str | int:
        """What task ``index`` is coded against: the run's reference, or with ``model.code_reference:
        previous`` the previous task, except on key tasks (every ``model.key_every``-th, from task 0)."""
        m = self.config.model
        if m.code_reference == "previous" and index % m.key_every:
            return index - 1
        return SOURCE_REFERENCE

    def save(self, store: TaskStore, index: int, model: nn.Module) -> Saved:
        task = self.ctx.benchmark.tasks[index]
        data, sizes = store.task_bytes(index, model, task.name, list(task.classes), self.against(index),
                                       self.config.model.bn_dtype)
        return Saved({task_file(index): data}, {"file": task_file(index), "bytes": sizes,
                                                "reference_bytes": reference_task_bytes(model)})

    def describe(self, rebuilt: nn.Module) -> dict[str, Any]:
        return {"sparsity": kernel_sparsity(rebuilt)} if has_zero_entry(rebuilt) else {}


__all__ = ["NWS", "POOLS", "REFERENCE", "PoolEMA", "RateWarmup", "TaskStore", "nws_loss_terms", "pretrained_spec",
           "save_pools_run"]
