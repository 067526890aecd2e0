"""Training with Lightning: the NWS loss, the pool EMA after each optimizer step, and evaluation."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nws.config import TrainConfig, TrainerConfig
from nws.convert import commitment_loss, nws_layers, update_pools
from nws.errors import NWSError


class NonFiniteError(NWSError):
    """Training produced a NaN or infinite loss or weight."""


def quiet_lightning() -> None:
    """Keep Lightning's banners and hints out of the console; progress bars stay."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


class NWSModule(L.LightningModule):
    """Trains a searchable model with ``CE + beta * commitment``; with ``pretrain=True`` the pools follow
    the kernels by EMA after every optimizer step, otherwise they stay frozen."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, pretrain: bool = False):
        super().__init__()
        self.model, self.cfg, self.pretrain = model, cfg, pretrain

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(self.model(x), y)
        commit = commitment_loss(self.model)
        loss = ce + self.cfg.beta * commit
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss (ce {ce.item():g}, commitment {commit.item():g}) at epoch "
                                 f"{self.current_epoch} step {self.global_step}; nothing of this task was saved")
        self.log_dict({"loss": loss, "ce": ce, "commit": commit}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=len(y))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for name, layer in nws_layers(self.model):
            if not torch.isfinite(layer.weight).all():
                raise NonFiniteError(f"non-finite weight in layer {name} at step {self.global_step}; nothing of "
                                     "this task was saved")
        if self.pretrain:
            update_pools(self.model)

    def configure_optimizers(self):
        c = self.cfg
        opt = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                              weight_decay=c.weight_decay)
        milestones = sorted({max(1, math.floor(f * c.epochs)) for f in c.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=c.gamma)
        return {"optimizer": opt, "lr_scheduler": sched}


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, trainer_cfg: TrainerConfig, pretrain: bool,
        log_dir: Path, name: str, num_workers: int = 0) -> nn.Module:
    """Train ``model`` on ``data`` for ``cfg.epochs`` with Lightning; returns the trained model."""
    quiet_lightning()
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=len(data) > cfg.batch_size, persistent_workers=num_workers > 0)
    if trainer_cfg.logger == "csv":
        logger = L.pytorch.loggers.CSVLogger(log_dir, name="logs", version=name)
    elif trainer_cfg.logger == "tensorboard":
        logger = L.pytorch.loggers.TensorBoardLogger(log_dir, name="logs", version=name)
    elif trainer_cfg.logger == "none":
        logger = False
    else:
        raise NWSError(f"trainer.logger must be csv, tensorboard or none, got {trainer_cfg.logger!r}")
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
                        precision=trainer_cfg.precision, logger=logger, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
    module = NWSModule(model, cfg, pretrain=pretrain)
    trainer.fit(module, loader)
    return module.model.cpu()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data``, in a fixed order."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
