"""What a method is under the common protocol, and what the runner hands it.

The runner (:mod:`nws.runner`) owns the protocol: the source stage, the task order, per-task seeds, resume,
evaluation from storage, results. A :class:`Method` supplies only what differs, through the hooks below
(``docs/architecture.md`` has the table): how the source network is made and stored, how a task is trained
(extra loss terms, parameter groups with optimizers of their own, Lightning callbacks), which files are
written for it and what its manifest records, and (through its reader, a :class:`~nws.store.RunStore`
subclass) how a task is rebuilt from them and what the run's memory is besides its files.
"""

from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from nws.batchnorm import fold_batchnorm, recompute_statistics, unfold_batchnorm
from nws.config import RunConfig, TrainConfig
from nws.data import Benchmark, Task
from nws.engine import LossTerm, evaluate, fit, seed_everything, task_seed
from nws.logs import last_checkpoint
from nws.errors import StoreError
from nws.store import RunStore


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


def classifier_name(model: nn.Module) -> str:
    name = getattr(model, "classifier_name", None)
    if name is None:
        raise StoreError(f"model {type(model).__name__} has no classifier_name attribute")
    return name


@dataclass
class Context:
    """What the runner gives a method: the settings and data, whether this process writes the run (rank 0 of
    a distributed run), and how to train and evaluate within the protocol."""

    config: RunConfig
    benchmark: Benchmark
    device: torch.device
    writer: bool = True
    progress: bool = True
    resume: bool = False
    skipped_steps: dict[str, int] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def say(self, text: str) -> None:
        if self.progress and self.writer:
            print(text, flush=True)

    def evaluate(self, model: nn.Module, data: Dataset) -> float:
        return evaluate(model, data, num_workers=self.config.data.num_workers, device=self.device)

    def fit(self, model: nn.Module, task: Task, cfg: TrainConfig, stage: str, seed: int, what: str = "learning",
            **kwargs: Any) -> nn.Module:
        """Train one stage (seeded by ``seed``: weights drawn and data order). Epoch checkpoints go to
        ``out/checkpoints/<stage>/``; when resuming, the stage continues from its last one."""
        checkpoints = self.out / "checkpoints" / stage
        resume_from = last_checkpoint(checkpoints) if self.resume else None
        again = f", continuing from {resume_from}" if resume_from else ""
        self.say(f"[{stage}] {what} {task.name} ({len(task.classes)} classes, {cfg.epochs} epochs{again})")
        seed_everything(seed)
        fitted = fit(model, task.train, cfg, self.config.trainer, log_dir=self.out, name=stage,
                     num_workers=self.config.data.num_workers, checkpoint_dir=checkpoints, resume_from=resume_from,
                     seed=seed, **kwargs)
        if fitted.skipped_steps:
            self.skipped_steps[stage] = fitted.skipped_steps
            self.say(f"[{stage}] {fitted.skipped_steps} steps skipped by the gradient scaler (overflow)")
        return fitted.model

    def drop_checkpoints(self, prefix: str) -> None:
        """Remove the epoch checkpoints of the stages named ``prefix*`` once their result is stored."""
        root = self.out / "checkpoints"
        if root.is_dir():
            for stage in root.iterdir():
                if stage.name.startswith(prefix):
                    shutil.rmtree(stage, ignore_errors=True)
            try:
                root.rmdir()  # only when no other stage's checkpoints are left
            except OSError:
                pass


@dataclass
class Saved:
    """A task's files (name -> bytes, written and listed by the runner) and what its manifest entry records:
    ``file`` (the task's own file), ``bytes`` (its size by kind, summing to the file's size) and extras."""

    files: dict[str, bytes]
    record: dict[str, Any]


class Method:
    """A task-incremental method under the protocol. Subclasses set ``name``, ``store_class`` and
    ``source_files`` and implement :meth:`pretrain`, :meth:`load_source`, :meth:`learn` and :meth:`save`;
    every other hook has a default that does nothing.

    ``shared_source``: a source network another method made under :meth:`source_key`'s key (``nws demo
    --compare`` trains it once for all the methods that share it); :meth:`pretrain` then stores it instead of
    making its own.
    """

    name: ClassVar[str]
    store_class: ClassVar[type[RunStore]]
    distributed: ClassVar[bool] = False  # may train with several processes (DDP)
    source_files: ClassVar[tuple[str, ...]]  # written by the source stage
    colour: ClassVar[str | None] = None  # in the report's plots (None: the next of matplotlib's cycle)
    marker: ClassVar[str] = "o"

    def __init__(self, ctx: Context, shared_source: nn.Module | None = None):
        self.ctx = ctx
        self.config = ctx.config
        self.shared_source = shared_source

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Refuse settings this method cannot run (:class:`~nws.config.ConfigError`), before anything is written."""

    @classmethod
    def source_key(cls, config: RunConfig) -> str | None:
        """Methods that return the same key make the same source network from the same settings, so one may
        be made once and handed to the others as ``shared_source``; None: this method's is its own."""
        return None

    @classmethod
    def pool_usage(cls, path: str) -> dict[str, Any] | None:
        """For a method whose layers share pools of entries: how much of each pool each task of the run at
        ``path`` uses (the report plots it): a dict of ``layers``, ``tasks``, ``pool_sizes`` and ``kernels``
        (the most entries a task can use) per layer, ``utilisation`` (entries used / pool size, layers x tasks),
        ``task_fraction`` (of all entries, per task), ``all_tasks_fraction`` and ``layer_union``; None (the
        default) when the method has no pools."""
        return None

    def manifest_fields(self) -> dict[str, Any]:
        """What a new run's manifest records besides the method and config (checked by the reader's
        :meth:`~nws.store.RunStore.manifest_problem`)."""
        return {}

    def loss_terms(self, model: nn.Module, cfg: TrainConfig) -> list[LossTerm]:
        """Terms added to the cross-entropy of every stage this method trains ``model`` in (see :meth:`fit`)."""
        return []

    def fit(self, model: nn.Module, task: Task, cfg: TrainConfig, stage: str, seed: int, what: str = "learning",
            **extras: Any) -> nn.Module:
        """Train one stage with this method's :meth:`loss_terms` and ``extras`` (``params``, ``param_groups``,
        ``callbacks``: see :func:`nws.engine.fit`)."""
        return self.ctx.fit(model, task, cfg, stage, seed, what, loss_terms=self.loss_terms(model, cfg), **extras)

    def pretrain(self, store: RunStore | None) -> nn.Module:
        """Make the source network the first task starts from and write the source files (``store`` is None on
        a distributed rank that does not write); returns the source network."""
        raise NotImplementedError

    def load_source(self, store: RunStore) -> nn.Module:
        """The source network of an interrupted run, from its files."""
        raise NotImplementedError

    def record_source(self, store: RunStore, source: nn.Module) -> None:
        """Record the source task and the source network's accuracy on it in the manifest."""
        task = self.ctx.benchmark.source
        store.manifest["source"] = {"name": task.name, "accuracy": self.ctx.evaluate(source, task.test)}
        store.write_manifest()

    def start(self, store: RunStore, source: nn.Module) -> None:
        """Set up after the source stage (e.g. write a frozen backbone once)."""

    def restore(self, store: RunStore, index: int) -> None:
        """The method's state after task ``index``, read back from the files, to continue an interrupted run."""

    def learn(self, index: int) -> nn.Module:
        """Train task ``index``; returns the trained network."""
        raise NotImplementedError

    def unfolded(self, model: nn.Module, index: int, batches: int = 4, batch_size: int = 256) -> nn.Module:
        """``model`` (a folded network: ``model.bn_dtype: int8``) ready to start task ``index``: its BatchNorm
        unfolded on the first ``batches`` batches of the task's training data (:func:`nws.batchnorm.unfold_batchnorm`);
        unchanged if not folded."""
        data = DataLoader(self.ctx.benchmark.tasks[index].train, batch_size=batch_size, shuffle=False)
        unfold_batchnorm(model, itertools.islice((x for x, _ in data), batches))
        return model

    def finish(self, model: nn.Module, index: int) -> nn.Module:
        """The network of task ``index`` as it is evaluated and stored, once trained (in place), for every
        method: with ``model.bn_stats`` its BatchNorm statistics computed afresh on that many of the task's
        training images (:func:`nws.batchnorm.recompute_statistics`), with ``model.bn_dtype: int8`` its
        BatchNorm folded onto its grid (:mod:`nws.batchnorm`)."""
        train = self.ctx.benchmark.tasks[index].train
        images = min(self.config.model.bn_stats, len(train))
        if images:
            order = torch.Generator().manual_seed(task_seed(self.config.seed, index))
            data = DataLoader(train, batch_size=min(images, 256),
                              sampler=RandomSampler(train, num_samples=images, generator=order),
                              num_workers=self.config.data.num_workers)
            recompute_statistics(model, (x for x, _ in data))
        if self.config.model.bn_dtype == "int8":
            fold_batchnorm(model)
        return model

    def save(self, store: RunStore, index: int, model: nn.Module) -> Saved:
        """The files of task ``index`` (and any shared file it changes), and its manifest record."""
        raise NotImplementedError

    def describe(self, rebuilt: nn.Module) -> dict[str, Any]:
        """Extras recorded for a task from its network rebuilt from storage (e.g. sparsity)."""
        return {}

    def head_for(self, model: nn.Module, index: int) -> nn.Module:
        """``model`` with its classifier resized to task ``index`` (rows kept, new rows seeded)."""
        resize_classifier(model, classifier_name(model), len(self.ctx.benchmark.tasks[index].classes),
                          seed=self.config.seed + index)
        return model
