"""Training with Lightning: the NWS loss, the pool EMA after each optimizer step, checkpoints, evaluation.

One device, several GPUs with DDP, several nodes, SLURM (Lightning's own cluster environment) and
bf16/fp16 mixed precision all come from the :class:`~nws.config.TrainerConfig`. Under mixed precision only
the network's convolutions run in half precision: the search always runs in fp32 and the pools, their EMA
statistics and the EMA update stay fp32 (half-precision *weights*, ``16-true``/``bf16-true``, are refused).
Under DDP the pools' per-step statistics are averaged over the ranks before every update
(:func:`nws.pool.all_reduce_step_statistics`), so all ranks hold identical pools, equal to a single
process's on the same global batch.

``cfg.batch_size`` is the *global* batch: each of ``W`` processes loads ``batch_size / W`` samples per step
from its own shard of a seeded, epoch-dependent shuffle, so a run resumed from a checkpoint sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from nws.config import TrainConfig, TrainerConfig
from nws.convert import commitment_loss, nws_layers, update_pools
from nws.errors import NWSError
from nws.pool import all_reduce_step_statistics
from nws.sparsity import sparsity_loss

# Precisions that keep parameters and buffers (pools) in fp32; "16-mixed"/"bf16-mixed" autocast the convs.
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true", "64")
LOGGERS = ("csv", "tensorboard", "wandb", "none")
LAST_CHECKPOINT = "last.ckpt"


class NonFiniteError(NWSError):
    """Training produced a NaN or infinite loss or weight."""


def quiet_lightning() -> None:
    """Keep Lightning's banners and hints out of the console; progress bars stay."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")


class NWSModule(L.LightningModule):
    """Trains a searchable model with ``CE + beta * commitment``; with ``pretrain=True`` the pools follow
    the kernels by EMA after every optimizer step (statistics averaged over DDP ranks first), otherwise
    they stay frozen."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, pretrain: bool = False):
        super().__init__()
        self.model, self.cfg, self.pretrain = model, cfg, pretrain

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(self.model(x), y)
        commit = commitment_loss(self.model)
        loss = ce + self.cfg.beta * commit
        if self.cfg.sparsity:
            loss = loss + self.cfg.sparsity * sparsity_loss(self.model)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss (ce {ce.item():g}, commitment {commit.item():g}) at epoch "
                                 f"{self.current_epoch} step {self.global_step}; nothing of this task was saved")
        self.log_dict({"loss": loss, "ce": ce, "commit": commit}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=len(y))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        layers = list(nws_layers(self.model))
        finite = torch.stack([torch.isfinite(layer.weight).all() for _, layer in layers]) if layers else None
        if finite is not None and not bool(finite.all()):  # one host sync per step; name the layer on failure
            name = layers[int((~finite).nonzero()[0])][0]
            raise NonFiniteError(f"non-finite weight in layer {name} at step {self.global_step}; nothing of "
                                 "this task was saved")
        if self.pretrain:
            all_reduce_step_statistics(layer.pool for _, layer in nws_layers(self.model) if layer.pool.trainable)
            update_pools(self.model)

    def configure_optimizers(self):
        c = self.cfg
        opt = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                              weight_decay=c.weight_decay)
        milestones = sorted({max(1, math.floor(f * c.epochs)) for f in c.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=c.gamma)
        return {"optimizer": opt, "lr_scheduler": sched}


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


def make_logger(trainer_cfg: TrainerConfig, log_dir: Path, name: str):
    """CSV (default), TensorBoard or W&B logger writing under ``log_dir/logs/<name>``, or ``False``."""
    kind = trainer_cfg.logger
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(log_dir, name="logs", version=name)
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise NWSError("trainer.logger tensorboard needs the tensorboard package: pip install tensorboard") \
                from None
        return L.pytorch.loggers.TensorBoardLogger(log_dir, name="logs", version=name)
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise NWSError("trainer.logger wandb needs the wandb package: pip install wandb") from None
        return L.pytorch.loggers.WandbLogger(save_dir=str(log_dir), name=f"{Path(log_dir).name}/{name}",
                                             group=Path(log_dir).name, project=os.environ.get("WANDB_PROJECT", "nws"))
    if kind == "none":
        return False
    raise NWSError(f"trainer.logger must be one of {', '.join(LOGGERS)}, got {kind!r}")


def last_checkpoint(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The checkpoint of the last finished epoch in ``checkpoint_dir``, if there is one."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None


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


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, trainer_cfg: TrainerConfig, pretrain: bool,
        log_dir: Path, name: str, num_workers: int = 0, checkpoint_dir: str | os.PathLike | None = None,
        resume_from: str | os.PathLike | None = None, seed: int = 0) -> nn.Module:
    """Train ``model`` on ``data`` for ``cfg.epochs`` with Lightning; returns the trained model (on the CPU).

    ``checkpoint_dir``: where ``last.ckpt`` (model with its pools, optimizer, scheduler, epoch) is written
    after every epoch, when ``trainer_cfg.checkpoint`` is on. ``resume_from``: a checkpoint written so
    (e.g. :func:`last_checkpoint`) to continue from instead of starting at epoch 0; ``model`` must be built
    as for the original start (same architecture, pools frozen or not). ``seed`` seeds the data order.
    """
    quiet_lightning()
    precision = check_precision(trainer_cfg.precision)
    logger = make_logger(trainer_cfg, Path(log_dir), name)
    callbacks = []
    if checkpoint_dir is not None and trainer_cfg.checkpoint:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir, filename=Path(LAST_CHECKPOINT).stem, every_n_epochs=1, save_top_k=1,
            enable_version_counter=False, save_on_train_epoch_end=True))
    if resume_from is not None and not Path(resume_from).is_file():
        raise NWSError(f"checkpoint {resume_from} does not exist")
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
                        num_nodes=trainer_cfg.num_nodes, strategy=trainer_cfg.strategy, precision=precision,
                        sync_batchnorm=trainer_cfg.sync_batchnorm, logger=logger, callbacks=callbacks,
                        enable_checkpointing=bool(callbacks), enable_progress_bar=trainer_cfg.progress_bar,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0,
                        use_distributed_sampler=False, default_root_dir=log_dir)
    module = NWSModule(model, cfg, pretrain=pretrain)
    datamodule = TrainData(data, cfg.batch_size, num_workers=num_workers, seed=seed)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume_from is None else str(resume_from),
                    weights_only=True)
    except (pickle.UnpicklingError, EOFError) as err:
        raise NWSError(f"checkpoint {resume_from} is unreadable ({str(err).splitlines()[0]})") from None
    return revert_sync_batchnorm(module.model).cpu()


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


def eval_device(trainer_cfg: TrainerConfig) -> torch.device:
    """Where to evaluate after training: this process's GPU when training may use GPUs, else the CPU."""
    if trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its (possibly not yet started) distributed run: the one that writes.

    Before Lightning initialises the process group, the rank comes from the launcher's environment
    (``RANK``, Lightning's ``LOCAL_RANK``/``NODE_RANK``, torchrun's ``GROUP_RANK``, SLURM's ``SLURM_PROCID``).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    env = os.environ
    if any(int(env.get(key, "0") or 0) != 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")):
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return not (SLURMEnvironment.detect() and int(env.get("SLURM_PROCID", "0") or 0) != 0)


def barrier() -> None:
    """Wait for every rank of the distributed run (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """End this process's part of a distributed run: wait for every rank, then destroy the process group.

    Lightning leaves the group alive after ``fit``; a process that exits with it alive can abort in the
    communication backend's thread destructors ("terminate called without an active exception").
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
