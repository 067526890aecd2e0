"""Run configuration: typed dataclasses read from YAML, with any key overridable on the command line.

The defaults are the embedded demo: a small convnet on the split-digits benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The network and how it is made searchable (``nws.convert``)."""

    name: str = "convnet"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pool_size: int = 512
    group_size: int = 1
    exclude: list[str] = field(default_factory=list)
    init: str = "kernels"
    decay: float = 0.99
    eps: float = 1e-5


@dataclass
class TrainConfig:
    """One training stage: SGD with multi-step decay at fractions of the epochs, and the NWS loss weight."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.8])
    gamma: float = 0.1
    beta: float = 0.5


@dataclass
class DataConfig:
    """Which benchmark, where its files are, how it is loaded."""

    name: str = "digits"
    root: str | None = None
    num_workers: int = 0


@dataclass
class TrainerConfig:
    """Where and how Lightning runs the training."""

    accelerator: str = "auto"
    devices: int | str = 1
    precision: str = "32-true"
    logger: str = "csv"


@dataclass
class RunConfig:
    """A whole task-incremental run: pretrain pools on the source task, then learn every task."""

    seed: int = 1993
    out: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    task: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
