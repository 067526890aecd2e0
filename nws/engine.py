"""Training with Lightning, for every method: the loss, the optimizers, the pool EMA, checkpoints, evaluation.

One training module serves every method. Its loss is the cross-entropy, plus ``beta`` times the commitment
term when the model has NWS layers (and the sparsity pull when asked); with ``pretrain`` the pools follow
the kernels by EMA after every optimizer step. A method may add an Adam optimizer for mask scores
(Piggyback) and a hook after every step (PackNet puts earlier tasks' weights back exactly).

One device, several GPUs with DDP, several nodes, SLURM (Lightning's own cluster environment) and
bf16/fp16 mixed precision all come from the :class:`~nws.config.TrainerConfig`. Under mixed precision only
the network's convolutions run in half precision: the search always runs in fp32 and the pools, their EMA
statistics and the EMA update stay fp32. Under ``16-mixed`` a gradient scaler skips a step whose gradients
overflow, as the reference does; skipped steps are counted and logged, and ``trainer.max_skipped_steps`` of
them in a row stop the run. Without a scaler a non-finite loss stops the run at once, and so does a
non-finite weight in any case. Under DDP the pools' per-step statistics are averaged over the ranks before
every update (:func:`nws.pool.all_reduce_step_statistics`), so all ranks hold identical pools, equal to a
single process's on the same global batch.

``cfg.batch_size`` is the *global* batch: each of ``W`` processes loads ``batch_size / W`` samples per step
from its own shard of a seeded, epoch-dependent shuffle, so a run resumed from a checkpoint sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from nws.config import LOGGERS, PRECISIONS, TrainConfig, TrainerConfig
from nws.convert import commitment_loss, nws_layers, update_pools
from nws.errors import NWSError
from nws import interrupts
from nws.pool import all_reduce_step_statistics
from nws.sparsity import sparsity_loss
from nws.store import atomic_write

LAST_CHECKPOINT = "last.ckpt"


class NonFiniteError(NWSError):
    """Training produced a NaN or infinite loss or weight, or too many overflowing steps in a row."""


def quiet_lightning() -> None:
    """Keep Lightning's banners and hints out of the console; progress bars stay."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")


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
    """Trains ``model`` on ``CE (+ beta * commitment + sparsity * group lasso)``; see the module docstring.

    Manual optimization, so that a method's mask optimizer steps together with the main one and
    ``after_step`` runs after both.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, pretrain: bool = False,
                 params: Sequence[nn.Parameter] | None = None, mask_params: Sequence[nn.Parameter] = (),
                 mask_lr: float = 0.0, after_step: Callable[[], None] | None = None, max_skipped: int = 100):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.cfg, self.pretrain = model, cfg, pretrain
        self.searched = any(True for _ in nws_layers(model))
        self._params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        self._mask_params, self.mask_lr, self.after_step = list(mask_params), mask_lr, after_step
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
        if self.searched:
            logs["commit"] = commitment_loss(self.model)
            loss = loss + self.cfg.beta * logs["commit"]
        if self.cfg.sparsity:
            loss = loss + self.cfg.sparsity * sparsity_loss(self.model)
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
        with torch.no_grad():
            if self.after_step is not None:
                self.after_step()
            if self.pretrain:
                all_reduce_step_statistics(layer.pool for _, layer in nws_layers(self.model) if layer.pool.trainable)
                update_pools(self.model)
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
        params = self._params + self._mask_params
        if not params:
            return
        finite = torch.stack([torch.isfinite(p).all() for p in params])
        if not bool(finite.all()):
            bad = params[int((~finite).nonzero()[0])]
            name = next((n for n, p in self.model.named_parameters() if p is bad), "a mask score")
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
        if self._mask_params:
            optimizers.append(torch.optim.Adam(self._mask_params, lr=self.mask_lr))
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


class StageProgressBar(TQDMProgressBar):
    """The progress bar, named after the stage (``pretrain``, ``task_003``, ...) instead of a logger version."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.stage} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class EpochLines(L.Callback):
    """One short line per epoch (stage, epoch, mean loss, seconds) for output that is not a terminal, where a
    progress bar's carriage returns would make one endless line."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.losses = time.perf_counter(), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(loss.detach())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        loss = f"loss {torch.stack(self.losses).mean().item():.4f}, " if self.losses else ""
        print(f"[{self.stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {loss}"
              f"{time.perf_counter() - self.start:.1f} s", flush=True)


def progress_callbacks(trainer_cfg: TrainerConfig, stage: str) -> list[L.Callback]:
    """``trainer.progress_bar``: a bar on a terminal, one line per epoch otherwise (a log file); none if off."""
    if not trainer_cfg.progress_bar:
        return []
    return [StageProgressBar(stage) if sys.stdout.isatty() else EpochLines(stage)]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Epoch checkpoints written atomically (a temporary file renamed over the last one), so that a run stopped
    while one is written (a signal, a kill, a power cut) still resumes from the previous one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getbuffer())


def check_precision(precision: str) -> str:
    """``precision`` if it keeps pools and weights in fp32; :class:`NWSError` otherwise."""
    if str(precision) not in PRECISIONS:
        raise NWSError(f"trainer.precision must be one of {', '.join(PRECISIONS)} (the pools stay fp32), got "
                       f"{precision!r}")
    return str(precision)


def uses_cuda(trainer_cfg: TrainerConfig) -> bool:
    """Whether training runs on CUDA GPUs: asked for (or ``auto``) and available."""
    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def precision_plugins(trainer_cfg: TrainerConfig) -> list:
    """``16-mixed`` as a real fp16 autocast with a gradient scaler on every device (Lightning alone would turn
    it into bf16 on the CPU); nothing for the other precisions."""
    if check_precision(trainer_cfg.precision) != "16-mixed":
        return []
    return [MixedPrecision("16-mixed", "cuda" if uses_cuda(trainer_cfg) else "cpu")]


class _ResumedWriter(ExperimentWriter):
    """Lightning's CSV writer, but it keeps the rows of the epochs up to ``keep_epochs`` of an earlier attempt
    at the stage (Lightning deletes the file), so a resumed stage appends to its own metrics.csv."""

    def __init__(self, log_dir: str, keep_epochs: int):
        self.keep_epochs = keep_epochs
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            rows = [r for r in reader if r.get("epoch") not in (None, "") and float(r["epoch"]) < self.keep_epochs]
            keys = list(reader.fieldnames or [])
        if not rows:
            os.remove(self.metrics_file_path)
            return
        self.metrics_keys = sorted(keys)
        with open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class StageCSVLogger(L.pytorch.loggers.CSVLogger):
    """CSV logger of one stage; resumed from a checkpoint after ``keep_epochs`` epochs, it appends to the rows
    of those epochs instead of replacing the file."""

    def __init__(self, *args, keep_epochs: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_epochs = keep_epochs

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self.keep_epochs)
        return self._experiment


def make_logger(trainer_cfg: TrainerConfig, log_dir: Path, name: str, keep_epochs: int = 0):
    """CSV (default), TensorBoard or W&B logger writing under ``log_dir/logs/<name>``, or ``False``. A stage
    resumed after ``keep_epochs`` finished epochs keeps their rows in its CSV log."""
    kind = trainer_cfg.logger
    if kind == "csv":
        return StageCSVLogger(log_dir, name="logs", version=name, keep_epochs=keep_epochs)
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


def checkpoint_epochs(path: str | os.PathLike) -> int:
    """How many epochs the checkpoint at ``path`` has finished."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise NWSError(f"checkpoint {path} is unreadable ({str(err).splitlines()[0]})") from None
    return int(state.get("epoch", -1)) + 1


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
        pretrain: bool = False, params: Sequence[nn.Parameter] | None = None,
        mask_params: Sequence[nn.Parameter] = (), mask_lr: float = 0.0,
        after_step: Callable[[], None] | None = None, num_workers: int = 0,
        checkpoint_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
        seed: int = 0) -> Fitted:
    """Train ``model`` on ``data`` for ``cfg.epochs`` with Lightning; returns the trained model (on the CPU)
    and the number of steps the gradient scaler skipped.

    ``params``: what the main optimizer trains (default: every parameter that requires grad);
    ``mask_params``: trained by Adam at ``mask_lr``; ``after_step``: called after every optimizer step, without
    autograd. ``checkpoint_dir``: where ``last.ckpt`` (model with its pools, optimizers, schedulers, epoch) is
    written after every epoch, when ``trainer_cfg.checkpoint`` is on. ``resume_from``: a checkpoint written so
    (e.g. :func:`last_checkpoint`) to continue from instead of starting at epoch 0; ``model`` must be built as
    for the original start. ``seed`` seeds the data order.
    """
    quiet_lightning()
    if cfg.epochs < 1:
        return Fitted(model.cpu(), 0)
    callbacks: list = progress_callbacks(trainer_cfg, name)
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
    module = TrainModule(model, cfg, pretrain=pretrain, params=params, mask_params=mask_params, mask_lr=mask_lr,
                         after_step=after_step, max_skipped=trainer_cfg.max_skipped_steps)
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


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's or a cluster's CPU set),
    within a SLURM job at most its CPUs per task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if os.environ.get("SLURM_JOB_ID") and per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(1, cpus)


def use_threads(trainer_cfg: TrainerConfig) -> int:
    """Set torch's compute threads to ``trainer.threads``, or by default to :func:`available_cpus`; returns it."""
    threads = trainer_cfg.threads or available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


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

    with warnings.catch_warnings():  # "srun is available but not used": a run may well be started without it
        warnings.simplefilter("ignore")
        slurm = SLURMEnvironment.detect()
    return not (slurm and int(env.get("SLURM_PROCID", "0") or 0) != 0)


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
