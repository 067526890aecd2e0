"""Training with Lightning, for every method: the loss, the optimizers, checkpoints, evaluation, seeds.

One training module serves every method and names none: its loss is the cross-entropy plus the weighted
:class:`LossTerm` s a method adds; the main optimizer trains ``params`` (by default every parameter that
requires grad) and each :class:`ParamGroup` a method adds gets an optimizer of its own, stepped with the main
one and scheduled alike; anything a method does around the steps is a Lightning callback (:class:`StepAction`
runs a function after every optimizer step). The methods' own pieces live in :mod:`nws.methods`.

One device, several GPUs with DDP, several nodes, SLURM (Lightning's own cluster environment) and
bf16/fp16 mixed precision all come from the :class:`~nws.config.TrainerConfig`. Under mixed precision only
the network's own layers autocast; whatever a callback updates keeps its dtype. Under ``16-mixed`` a gradient
scaler skips a step whose gradients overflow, as the reference does; skipped steps are counted and logged,
and ``trainer.max_skipped_steps`` of them in a row stop the run. Without a scaler a non-finite loss stops the
run at once, and so does a non-finite weight in any case.

``cfg.batch_size`` is the *global* batch: each of ``W`` processes loads ``batch_size / W`` samples per step
from its own shard of a seeded, epoch-dependent shuffle, so a run resumed from a checkpoint sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from nws import interrupts
from nws.config import PRECISIONS, TrainConfig, TrainerConfig
from nws.devices import uses_cuda
from nws.errors import NWSError
from nws.logs import (LAST_CHECKPOINT, AtomicCheckpointIO, EpochEnd, checkpoint_epochs, make_logger,
                      progress_callbacks, quiet_lightning)


class NonFiniteError(NWSError):
    """Training produced a NaN or infinite loss or weight, or too many overflowing steps in a row."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every draw of a stage depends on its seed alone)."""
    L.seed_everything(seed, verbose=False)


def task_seed(seed: int, index: int) -> int:
    """The seed of task ``index``'s training: a function of the run seed and the index alone, so a resumed
    run learns every task exactly as an uninterrupted run does."""
    return int.from_bytes(hashlib.sha256(f"nws-task:{seed}:{index}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class LossTerm:
    """A term a method adds to the cross-entropy: ``weight * fn(model)``, logged as ``name``."""

    name: str
    weight: float
    fn: Callable[[nn.Module], Tensor]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained by an optimizer of their own, ``make(params)``, stepped together with the main one and
    decayed at the same milestones."""

    name: str
    params: Sequence[nn.Parameter]
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class StepAction(L.Callback):
    """Calls ``action()`` after every optimizer step (after the weights are checked), without autograd."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.action()


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer``: SGD with momentum, nesterov and weight decay, or Adam with weight decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def milestones(cfg: TrainConfig) -> list[int]:
    """The epochs at which the learning rate is multiplied by ``gamma``."""
    return sorted({max(1, math.floor(f * cfg.epochs)) for f in cfg.milestones})


class TrainModule(L.LightningModule):
    """Trains ``model`` on the cross-entropy plus the ``loss_terms``; see the module docstring.

    Manual optimization, so that every optimizer (the main one and one per :class:`ParamGroup`) steps on the
    same backward pass, and the weights are checked before any callback sees them.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, params: Sequence[nn.Parameter] | None = None,
                 param_groups: Sequence[ParamGroup] = (), loss_terms: Sequence[LossTerm] = (),
                 max_skipped: int = 100):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.cfg = model, cfg
        self._params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        self._groups, self._terms = list(param_groups), list(loss_terms)
        self.max_skipped, self.skipped, self.skipped_in_a_row = max_skipped, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _scaler(self) -> torch.amp.GradScaler | None:
        plugin = self.trainer.precision_plugin
        return plugin.scaler if isinstance(plugin, MixedPrecision) else None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(self.model(x), y)
        loss, logs = ce, {"ce": ce}
        for term in self._terms:
            logs[term.name] = term.fn(self.model)
            loss = loss + term.weight * logs[term.name]
        scaler = self._scaler()
        if scaler is None and not torch.isfinite(loss):
            parts = ", ".join(f"{k} {v.item():g}" for k, v in logs.items())
            raise NonFiniteError(f"non-finite loss ({parts}) at epoch {self.current_epoch} step {self.global_step}; "
                                 "nothing of this stage was saved")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        scale = scaler.get_scale() if scaler is not None else None
        for opt in optimizers:
            opt.step()
        if scaler is not None:
            self._count_skip(scaler.get_scale() < scale)
        self._check_weights()
        self.log_dict({"loss": loss, **logs}, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _count_skip(self, skipped: bool) -> None:
        """A step the gradient scaler skipped (its gradients overflowed): counted; too many in a row stop."""
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        self.log("skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.skipped_in_a_row > self.max_skipped:
            raise NonFiniteError(f"{self.skipped_in_a_row} steps in a row overflowed under the gradient scaler "
                                 f"(trainer.max_skipped_steps {self.max_skipped}) at epoch {self.current_epoch}; "
                                 "nothing of this stage was saved")

    @torch.no_grad()
    def _check_weights(self) -> None:
        """Stop on a non-finite trained weight; one host sync per step, the name only on failure."""
        params = self._params + [p for g in self._groups for p in g.params]
        if not params:
            return
        finite = torch.stack([torch.isfinite(p).all() for p in params])
        if not bool(finite.all()):
            bad = params[int((~finite).nonzero()[0])]
            name = next((n for n, p in self.model.named_parameters() if p is bad), None)
            name = name or next(f"a parameter of {g.name}" for g in self._groups if any(p is bad for p in g.params))
            raise NonFiniteError(f"non-finite weight {name} at epoch {self.current_epoch} step {self.global_step}; "
                                 "nothing of this stage was saved")

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            sched.step()

    def configure_optimizers(self):
        optimizers = []
        if self._params:
            optimizers.append(make_optimizer(self._params, self.cfg))
        optimizers += [group.make(list(group.params)) for group in self._groups]
        scheds = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=milestones(self.cfg), gamma=self.cfg.gamma)
                  for o in optimizers]
        return optimizers, scheds


class TrainData(L.LightningDataModule):
    """The training set, sharded over the ranks: a seeded shuffle that depends only on ``seed`` and the
    epoch, ``batch_size / world_size`` samples per rank and step."""

    def __init__(self, data: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.data, self.batch_size, self.num_workers, self.seed = data, batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if self.batch_size % world:
            raise NWSError(f"batch size {self.batch_size} is the global batch and must be divisible by the "
                           f"{world} processes")
        per_rank = self.batch_size // world
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                     drop_last=len(self.data) >= world)
        return DataLoader(self.data, batch_size=per_rank, sampler=sampler, num_workers=self.num_workers,
                          drop_last=len(sampler) > per_rank, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())


def check_precision(precision: str) -> str:
    """``precision`` if it keeps pools and weights in fp32; :class:`NWSError` otherwise."""
    if str(precision) not in PRECISIONS:
        raise NWSError(f"trainer.precision must be one of {', '.join(PRECISIONS)} (the pools stay fp32), got "
                       f"{precision!r}")
    return str(precision)


def precision_plugins(trainer_cfg: TrainerConfig) -> list:
    """``16-mixed`` as a real fp16 autocast with a gradient scaler on every device (Lightning alone would turn
    it into bf16 on the CPU); nothing for the other precisions."""
    if check_precision(trainer_cfg.precision) != "16-mixed":
        return []
    return [MixedPrecision("16-mixed", "cuda" if uses_cuda(trainer_cfg) else "cpu")]


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``SyncBatchNorm`` (added by ``sync_batchnorm``) by a plain ``BatchNorm2d`` with the same
    parameters and statistics, so the trained network runs anywhere (SyncBatchNorm needs a GPU)."""
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        out = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out


@dataclass
class Fitted:
    """What :func:`fit` returns: the trained model (on the CPU) and the steps the gradient scaler skipped."""

    model: nn.Module
    skipped_steps: int


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, trainer_cfg: TrainerConfig, log_dir: Path, name: str,
        params: Sequence[nn.Parameter] | None = None, param_groups: Sequence[ParamGroup] = (),
        loss_terms: Sequence[LossTerm] = (), callbacks: Sequence[L.Callback] = (), num_workers: int = 0,
        checkpoint_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
        seed: int = 0) -> Fitted:
    """Train ``model`` on ``data`` for ``cfg.epochs`` with Lightning; returns the trained model (on the CPU)
    and the number of steps the gradient scaler skipped.

    ``params``: what the main optimizer trains (default: every parameter that requires grad);
    ``param_groups``: parameters with optimizers of their own; ``loss_terms``: added to the cross-entropy;
    ``callbacks``: Lightning callbacks of this stage (e.g. :class:`StepAction`). ``checkpoint_dir``: where
    ``last.ckpt`` (the model with all its buffers, optimizers, schedulers, epoch) is
    written after every epoch, when ``trainer_cfg.checkpoint`` is on. ``resume_from``: a checkpoint written so
    (e.g. :func:`last_checkpoint`) to continue from instead of starting at epoch 0; ``model`` must be built as
    for the original start. ``seed`` seeds the data order.
    """
    quiet_lightning()
    if cfg.epochs < 1:
        return Fitted(model.cpu(), 0)
    callbacks = [EpochEnd(), *progress_callbacks(trainer_cfg, name), *callbacks]
    if checkpoint_dir is not None and trainer_cfg.checkpoint:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir, filename=Path(LAST_CHECKPOINT).stem, every_n_epochs=1, save_top_k=1,
            enable_version_counter=False, save_on_train_epoch_end=True))
    if resume_from is not None and not Path(resume_from).is_file():
        raise NWSError(f"checkpoint {resume_from} does not exist")
    done_epochs = 0 if resume_from is None else checkpoint_epochs(resume_from)
    precision = precision_plugins(trainer_cfg)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
                        num_nodes=trainer_cfg.num_nodes, strategy=trainer_cfg.strategy,
                        precision=None if precision else check_precision(trainer_cfg.precision),
                        plugins=[*precision, AtomicCheckpointIO()],
                        sync_batchnorm=trainer_cfg.sync_batchnorm,
                        logger=make_logger(trainer_cfg, Path(log_dir), name, done_epochs), callbacks=callbacks,
                        enable_checkpointing=checkpoint_dir is not None and trainer_cfg.checkpoint,
                        enable_progress_bar=any(isinstance(c, TQDMProgressBar) for c in callbacks), enable_model_summary=False,
                        log_every_n_steps=10, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=log_dir)
    module = TrainModule(model, cfg, params=params, param_groups=param_groups, loss_terms=loss_terms,
                         max_skipped=trainer_cfg.max_skipped_steps)
    datamodule = TrainData(data, cfg.batch_size, num_workers=num_workers, seed=seed)
    try:
        with interrupts.stage(name):
            trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume_from is None else str(resume_from),
                        weights_only=True)
    except (pickle.UnpicklingError, EOFError) as err:
        raise NWSError(f"checkpoint {resume_from} is unreadable ({str(err).splitlines()[0]})") from None
    return Fitted(revert_sync_batchnorm(module.model).cpu(), module.skipped)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256, num_workers: int = 0,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode, fp32) on ``data``, in a fixed order, on ``device`` (default:
    where the model is; it is moved back afterwards)."""
    was_training = model.training
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    model.eval().to(device)
    correct = total = 0
    try:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    finally:
        model.to(home).train(was_training)
    return correct / max(total, 1)


