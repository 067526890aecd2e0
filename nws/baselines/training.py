"""Training a plain (unsearched) network with Lightning, as the baselines need it.

Cross-entropy only, the same SGD schedule as NWS (``TrainConfig``), plus what the baselines add: an Adam
optimizer for real-valued mask scores (Piggyback) and a hook after every optimizer step (PackNet puts the
weights of earlier tasks back exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from nws.config import TrainConfig, TrainerConfig
from nws.engine import NonFiniteError, TrainData, check_precision, make_logger, quiet_lightning
from nws.errors import NWSError


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


class PlainModule(L.LightningModule):
    """Trains ``params`` of ``model`` with SGD on the cross-entropy (and ``mask_params`` with Adam).

    Manual optimization, so that two optimizers step together and ``after_step`` runs after both.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, params: Sequence[nn.Parameter],
                 mask_params: Sequence[nn.Parameter] = (), mask_lr: float = 0.0,
                 after_step: Callable[[], None] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.cfg = model, cfg
        self._params, self._mask_params = list(params), list(mask_params)
        self.mask_lr, self.after_step = mask_lr, after_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at epoch {self.current_epoch} step {self.global_step}; "
                                 "nothing of this task was saved")
        optimizers = _as_list(self.optimizers())
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step()
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        for sched in _as_list(self.lr_schedulers()):
            sched.step()

    def configure_optimizers(self):
        c = self.cfg
        milestones = sorted({max(1, math.floor(f * c.epochs)) for f in c.milestones})
        optimizers = []
        if self._params:
            optimizers.append(torch.optim.SGD(self._params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                              weight_decay=c.weight_decay))
        if self._mask_params:
            optimizers.append(torch.optim.Adam(self._mask_params, lr=self.mask_lr))
        scheds = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=milestones, gamma=c.gamma) for o in optimizers]
        return optimizers, scheds


def fit_plain(model: nn.Module, data: Dataset, cfg: TrainConfig, trainer_cfg: TrainerConfig, log_dir: Path,
              name: str, params: Sequence[nn.Parameter] | None = None, mask_params: Sequence[nn.Parameter] = (),
              mask_lr: float = 0.0, after_step: Callable[[], None] | None = None, num_workers: int = 0,
              seed: int = 0) -> nn.Module:
    """Train ``model`` (``params``: default all that require grad) for ``cfg.epochs`` in one process, with the
    engine's logger, precision and seeded data order; returns it on the CPU."""
    quiet_lightning()
    if str(trainer_cfg.devices) not in ("1", "auto") or trainer_cfg.num_nodes != 1:
        raise NWSError("the baselines train in one process; set trainer.devices 1 and trainer.num_nodes 1")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if cfg.epochs < 1:
        return model.cpu()
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=trainer_cfg.accelerator, devices=1,
                        precision=check_precision(trainer_cfg.precision),
                        logger=make_logger(trainer_cfg, Path(log_dir), name), enable_checkpointing=False,
                        enable_progress_bar=trainer_cfg.progress_bar, enable_model_summary=False,
                        log_every_n_steps=10, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=log_dir)
    module = PlainModule(model, cfg, params, mask_params, mask_lr, after_step)
    trainer.fit(module, datamodule=TrainData(data, cfg.batch_size, num_workers=num_workers, seed=seed))
    return module.model.cpu()
