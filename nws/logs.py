"""What a training stage shows and keeps: a progress bar on a terminal, one line per epoch elsewhere (a log
file); its CSV, TensorBoard or W&B log under ``<out>/logs/<stage>`` (a resumed stage appends to its CSV log);
its epoch checkpoints, written atomically so that a run stopped at any moment resumes from the last one."""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nws import interrupts
from nws.config import LOGGERS, TrainerConfig
from nws.errors import NWSError
from nws.store import atomic_write

LAST_CHECKPOINT = "last.ckpt"


def quiet_lightning() -> None:
    """Keep Lightning's banners and hints out of the console; progress bars stay."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")


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


class EpochEnd(L.Callback):
    """The end of an epoch is one step for an interrupt: signals are held from the epoch's last batch until its
    checkpoint and its log rows are both on disk (the next epoch starts or training ends), so that a resumed
    stage's log holds every epoch its checkpoint counts."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        interrupts.hold()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._written(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._written(trainer)

    @staticmethod
    def _written(trainer) -> None:
        """The previous epoch's rows on disk (loggers buffer them), then signals are let through."""
        for logger in trainer.loggers:
            logger.save()
        interrupts.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        interrupts.release(raise_held=False)


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
        project = os.environ.get("WANDB_PROJECT", __package__)  # by default the package's name
        return L.pytorch.loggers.WandbLogger(save_dir=str(log_dir), name=f"{Path(log_dir).name}/{name}",
                                             group=Path(log_dir).name, project=project)
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

