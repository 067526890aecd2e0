"""Run settings: typed dataclasses, one per group of settings (``--group.key value``, as in the config files).

The defaults are the embedded demo: a small convnet on the split-digits benchmark. Every setting's type says
what is allowed (``Literal`` choices, constrained numbers, registered names; :mod:`nws.config_types`), so the
jsonargparse parser (:mod:`nws.config_parser`) itself refuses a bad value, and ``--help`` shows what each
setting allows; :func:`nws.config_parser.validate` adds the checks that span several settings. Every problem
is a :class:`ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from jsonargparse import set_parsing_settings
from jsonargparse.typing import NonNegativeInt, NotEmptyStr, OpenUnitInterval, PositiveInt

from nws.config_types import (DeviceCount, DeviceList, Fraction, HalfOpenUnit, ImageSide, NonNegativeNumber, Number,
                              PositiveNumber, registered_name)
from nws.errors import NWSError

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each setting's help: its docstring below


class ConfigError(NWSError):
    """A setting that is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------------- the choices

ModelName = registered_name("model", "nws.models:list_models")
BenchmarkName = registered_name("benchmark", "nws.data:list_benchmarks")

Optimizer = Literal["sgd", "adam"]
PoolInit = Literal["kernels", "normal", "kmeans"]
CodeReference = Literal["source", "previous"]
TaskStart = Literal["previous", "source"]
BNDtype = Literal["float32", "float16", "bfloat16", "int8"]
# Precisions that keep parameters and buffers (pools) in fp32; "16-mixed"/"bf16-mixed" autocast the convs.
Precision = Literal["32-true", "32", "16-mixed", "bf16-mixed", "64-true", "64"]
Logger = Literal["csv", "tensorboard", "wandb", "none"]
Augment = Literal["auto", "none", "light", "standard"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
LOGGERS: tuple[str, ...] = typing.get_args(Logger)


# ----------------------------------------------------------------------------------- the settings


@dataclass
class ModelConfig:
    """The network and how it is made searchable (nws.convert)."""

    name: ModelName = "convnet"
    """registered model builder (nws.models)"""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """the builder's arguments, e.g. '{widths: [8, 16]}'"""
    pool_size: PositiveInt = 512
    """K, entries per pool (>= 2 with zero_entry)"""
    group_size: PositiveInt = 1
    """g, input channels per grouped kernel"""
    exclude: list[str] = field(default_factory=list)
    """module-name patterns left unsearched (plain weights)"""
    init: PoolInit = "kernels"
    """where the pools come from: EMA pretraining from entries sampled from the layer's kernels (kernels) or
    from N(0, 1) (normal, the reference); or kmeans of the plain network's kernels after training it"""
    decay: OpenUnitInterval = 0.99
    """EMA decay of the pools during pretraining"""
    eps: PositiveNumber = 1e-5
    """EMA smoothing of the entry counts"""
    zero_entry: bool = False
    """entry 0 of every pool is all zero: a searched network is also sparse"""
    code_reference: CodeReference = "source"
    """what a task's indices are coded against: source (the source network's, stored once) or previous (the
    previous task's, a key task every key_every tasks: smaller, but a damaged task breaks the chain up to the
    next key task)"""
    task_start: TaskStart = "previous"
    """what a task's training starts from: previous (the previous task rebuilt from its files, as in the
    paper) or source (the source network, as the first task: every task then depends only on the source, and
    with code_reference source its kernels start on the entries they are coded against, so a kernel that
    does not help this task costs nothing; docs/rate.md)"""
    key_every: PositiveInt = 10
    """with code_reference previous: a task coded against the source every this many tasks"""
    rate: NonNegativeNumber = 0.0
    """lambda of the rate-aware search: each kernel takes the entry minimising its squared distance plus lambda
    times the bits its choice costs in the task file (in units of the pool's typical squared gap between
    neighbouring entries; docs/rate.md); 0: the nearest entry, as in the paper"""
    rate_warmup: HalfOpenUnit = 0.0
    """fraction of a task's optimizer steps over which the rate's lambda rises from 0 to model.rate, in 16
    equal steps: kernels first move as at lambda 0, then go back to their reference unless their move pays;
    fewer kernels end off it, fewer bytes at the same accuracy (docs/rate.md). 0: lambda from the first step"""
    bn_stats: NonNegativeInt = 0
    """training images (of the task, seeded random) over which every BatchNorm layer's running statistics are
    computed afresh at the end of a task, with its final weights, before it is folded, evaluated and stored;
    every method. 0: the running averages of training, which mix the statistics of every weight the last
    steps had (NWS's kernels and Piggyback's masks jump between steps); docs/reliability.md"""
    bn_dtype: BNDtype = "float32"
    """how a task file stores BatchNorm: float32 (lossless); float16 / bfloat16 (lossy, half the bytes; tasks
    are evaluated from what is stored); or int8: each layer folded into one scale and shift per channel on a
    255-level grid at the end of a task's training, so the task is exactly what is stored (an eighth of the
    bytes; every method; docs/reliability.md)"""


@dataclass
class TrainConfig:
    """One training stage: the optimiser with multi-step decay at fractions of the epochs, and the NWS loss
    weights."""

    epochs: NonNegativeInt = 20
    """passes over the training data"""
    batch_size: PositiveInt = 32
    """images per step (over all devices)"""
    optimizer: Optimizer = "sgd"
    """sgd (momentum, nesterov, weight decay) or adam (learning rate and weight decay)"""
    lr: PositiveNumber = 0.01
    """learning rate"""
    momentum: HalfOpenUnit = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum (SGD; needs momentum > 0)"""
    weight_decay: NonNegativeNumber = 4e-5
    """L2 weight decay"""
    milestones: list[Fraction] = field(default_factory=lambda: [0.5, 0.8])
    """fractions of the epochs after which the learning rate is multiplied by gamma"""
    gamma: PositiveNumber = 0.1
    """learning-rate factor at each milestone"""
    beta: NonNegativeNumber = 0.5
    """weight of the NWS commitment loss"""
    sparsity: NonNegativeNumber = 0.0
    """weight of the group-lasso pull of kernels towards zero (nws.sparsity_loss)"""


@dataclass
class DataConfig:
    """Which benchmark, where its files are, how it is loaded."""

    name: BenchmarkName = "digits"
    """benchmark (nws data check --help describes each)"""
    root: Optional[str] = None
    """where the benchmark's files are"""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes"""
    source: Optional[str] = None
    """pool-pretraining source: null (the benchmark's default: digits its source split; split_cifar100 and
    cub2sketches imagenet; split_fashion_mnist the embedded digits), imagenet (folders at source_root),
    cifar100, mnist (files at source_root), digits, none; for folders, a folder of the tasks' layout"""
    source_root: Optional[str] = None
    """where the source's files are (imagenet, mnist)"""
    num_tasks: Optional[NonNegativeInt] = None
    """learn only the first N tasks (null: all)"""
    image_size: Optional[ImageSide] = None
    """input side: image folders (null: the images' own side when they all have one size, else 224),
    split_fashion_mnist (null: 28; larger pads)"""
    tasks: Union[list[str], str, None] = None
    """folders: the task folders, in order, or one folder (each DIR/{train,test}/<class>/<image>)"""
    augment: Augment = "auto"
    """folders: training augmentation: none, light (pad-and-crop by 1/8, flip), standard (random-resized crop,
    flip); auto: standard from 64 px, light below"""


@dataclass
class TrainerConfig:
    """Where and how Lightning runs the training."""

    accelerator: NotEmptyStr = "auto"
    """Lightning accelerator: auto, cpu, gpu, ..."""
    devices: Union[DeviceCount, DeviceList] = 1
    """devices per node: how many, or which"""
    precision: Precision = "32-true"
    """Lightning precision; the pools stay fp32"""
    logger: Logger = "csv"
    """where training curves go (<out>/logs)"""
    strategy: NotEmptyStr = "auto"
    """Lightning strategy: auto, ddp, ..."""
    num_nodes: PositiveInt = 1
    """machines"""
    sync_batchnorm: bool = False
    """synchronise BatchNorm statistics across devices"""
    checkpoint: bool = True
    """write <out>/checkpoints/<stage>/last.ckpt after every epoch (what --resume continues from)"""
    progress_bar: bool = True
    """show a progress bar on a terminal (elsewhere, such as a log file: one line per epoch)"""
    max_skipped_steps: NonNegativeInt = 100
    """under a gradient scaler (16-mixed), this many steps skipped in a row for overflowing gradients stop
    the run"""
    threads: Optional[PositiveInt] = None
    """compute threads; null: OMP_NUM_THREADS if set, else the CPUs this process may use (its affinity mask,
    SLURM's CPUs per task), so runs sharing a machine or an allocation do not oversubscribe it"""


@dataclass
class BaselineConfig:
    """Settings of the baselines (method other than nws); the papers' values by default."""

    prune_ratio: HalfOpenUnit = 0.75
    """PackNet: fraction of each layer's free weights pruned after a task"""
    retrain_epochs: NonNegativeInt = 10
    """PackNet: epochs retraining the kept weights, at a tenth of the task's learning rate"""
    mask_init: Number = 1e-2
    """Piggyback: initial mask score"""
    mask_threshold: Number = 5e-3
    """Piggyback: a weight is masked out at or below this score"""
    mask_lr: PositiveNumber = 1e-4
    """Piggyback: Adam learning rate of the mask scores"""


@dataclass
class RunConfig:
    """A whole task-incremental run: pretrain pools on the source task, then learn every task."""

    seed: int = 1993
    """seeds everything (task i: seed and i alone)"""
    out: NotEmptyStr = "runs/demo"
    """run directory (the task store)"""
    pretrained: Optional[str] = None
    """a pool-pretraining run directory whose pools and network this run starts from"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=0.05))
    task: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=0.01))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    method: str = "nws"
    """nws, or a baseline"""
    # The demo's tasks train for about 60 steps: PackNet retrains for half the task's epochs, and Piggyback's
    # masks learn at 1e-2 (at the paper's 1e-4 no score reaches the threshold in so few steps).
    baseline: BaselineConfig = field(default_factory=lambda: BaselineConfig(retrain_epochs=7, mask_lr=1e-2))


GROUPS = {"model": ModelConfig, "data": DataConfig, "pretrain": TrainConfig, "task": TrainConfig,
          "trainer": TrainerConfig, "baseline": BaselineConfig}
TITLES = {"model": "model: the network and its pools", "data": "data: the benchmark and how it is loaded",
          "pretrain": "pretrain: the pool-pretraining stage", "task": "task: how each task is trained",
          "trainer": "trainer: where and how Lightning runs",
          "baseline": "baseline: the baselines' settings (--method other than nws)"}
TOP = ("seed", "out", "pretrained", "method")


@functools.lru_cache(maxsize=None)
def setting_types() -> dict[str, Any]:
    """Every setting's dotted key and its type."""
    hints = typing.get_type_hints(RunConfig)
    out = {key: hints[key] for key in TOP}
    for group, cls in GROUPS.items():
        out.update({f"{group}.{k}": t for k, t in typing.get_type_hints(cls).items()})
    return out
