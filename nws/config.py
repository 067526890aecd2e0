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
    # Where the pools come from: EMA pretraining from entries sampled from the layer's kernels (`kernels`) or
    # from N(0, 1) (`normal`, the reference); or `kmeans`: train the plain network on the source task, then
    # k-means of each layer's kernels (nws.pool_sources).
    init: str = "kernels"
    decay: float = 0.99
    eps: float = 1e-5
    zero_entry: bool = False  # entry 0 of every pool is all zero: a searched network is also sparse


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
    sparsity: float = 0.0  # weight of the group-lasso pull of kernels towards zero (nws.sparsity_loss)


@dataclass
class DataConfig:
    """Which benchmark, where its files are, how it is loaded."""

    name: str = "digits"
    root: str | None = None
    num_workers: int = 0
    # Pool-pretraining source: null = the benchmark's default (digits: its source split; split_cifar100 and
    # cub2sketches: imagenet), or imagenet (folders at source_root), cifar100 (all 100 classes), none.
    source: str | None = None
    source_root: str | None = None
    num_tasks: int | None = None  # learn only the first N tasks (null: all)
    image_size: int | None = None  # input side for image-folder data (null: 224)


@dataclass
class TrainerConfig:
    """Where and how Lightning runs the training."""

    accelerator: str = "auto"
    devices: int | str = 1
    precision: str = "32-true"
    logger: str = "csv"
    strategy: str = "auto"
    num_nodes: int = 1
    sync_batchnorm: bool = False
    checkpoint: bool = True  # write <out>/checkpoints/<stage>/last.ckpt after every epoch
    progress_bar: bool = True


@dataclass
class BaselineConfig:
    """Settings of the baselines (``method`` other than ``nws``); the papers' values by default.

    PackNet prunes ``prune_ratio`` of each layer's free weights after a task, then retrains the kept ones
    for ``retrain_epochs`` at a tenth of the task's learning rate. Piggyback's mask scores start at
    ``mask_init``, mask a weight out at or below ``mask_threshold`` and learn with Adam at ``mask_lr``.
    """

    prune_ratio: float = 0.75
    retrain_epochs: int = 10
    mask_init: float = 1e-2
    mask_threshold: float = 5e-3
    mask_lr: float = 1e-4


@dataclass
class RunConfig:
    """A whole task-incremental run: pretrain pools on the source task, then learn every task."""

    seed: int = 1993
    out: str = "runs/demo"
    # A pool-pretraining run directory (e.g. from configs/pretrain_pools_imagenet_resnet18.yaml): its pools and
    # network are used instead of pretraining here.
    pretrained: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    task: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    method: str = "nws"
    # The demo's tasks train for about 60 steps: PackNet retrains for half the task's epochs, and Piggyback's
    # masks learn at 1e-2 (at the paper's 1e-4 no score reaches the threshold in so few steps).
    baseline: BaselineConfig = field(default_factory=lambda: BaselineConfig(retrain_epochs=7, mask_lr=1e-2))
