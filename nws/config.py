"""Run configuration: typed dataclasses read from YAML, any key overridable on the command line, and every
value checked before a run writes anything.

The defaults are the embedded demo: a small convnet on the split-digits benchmark. :func:`parse_run_args`
reads ``--config FILE.yaml`` and ``--group.key value`` overrides (jsonargparse checks names and types);
:func:`validate` checks the values (ranges, names, the model builder's arguments) and raises
:class:`ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nws.errors import NWSError

OPTIMIZERS = ("sgd", "adam")
POOL_INITS = ("kernels", "normal", "kmeans")
CODE_REFERENCES = ("source", "previous")
BN_DTYPES = ("float32", "float16", "bfloat16")
# Precisions that keep parameters and buffers (pools) in fp32; "16-mixed"/"bf16-mixed" autocast the convs.
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true", "64")
LOGGERS = ("csv", "tensorboard", "wandb", "none")


class ConfigError(NWSError):
    """A setting that is missing, unknown, of the wrong type or out of range."""


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
    # What a task's stored indices are coded against: `source` (the source network's indices, stored once: every
    # task decodes from the shared files and its own file) or `previous` (the previous task's indices, with a key
    # task coded against the source every `key_every` tasks: smaller, but a damaged task breaks the chain of
    # every later task up to the next key task).
    code_reference: str = "source"
    key_every: int = 10
    # How a task file stores BatchNorm's parameters and statistics: `float32` (lossless) or, lossy and half the
    # bytes, `float16` / `bfloat16`. Every task is evaluated and continued from what is stored, so the run's
    # "acc. from storage" measures what the rounding costs.
    bn_dtype: str = "float32"


@dataclass
class TrainConfig:
    """One training stage: the optimizer with multi-step decay at fractions of the epochs, and the NWS loss
    weights. ``sgd`` uses momentum, nesterov and weight decay; ``adam`` uses the learning rate and weight
    decay (the reference's Adam recipes set it to 0)."""

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"
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
    # cub2sketches: imagenet; split_fashion_mnist: the embedded digits), or imagenet (folders at source_root),
    # cifar100 (all 100 classes), mnist (files at source_root), digits, none; for `folders`, a folder of the
    # tasks' layout.
    source: str | None = None
    source_root: str | None = None
    num_tasks: int | None = None  # learn only the first N tasks (null: all)
    image_size: int | None = None  # input side: image folders (null: 224), split_fashion_mnist (null: 28, larger pads)
    tasks: list[str] | None = None  # `folders`: the task folders, in order (DIR/{train,test}/<class>/<image>)


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
    # Under a gradient scaler (16-mixed), a step whose gradients overflow is skipped; this many skipped in a
    # row stop the run.
    max_skipped_steps: int = 100
    # Compute threads: null follows the CPUs this process may use (its affinity mask, and SLURM's CPUs per task
    # inside a job), so runs sharing a machine or an allocation do not oversubscribe it.
    threads: Optional[int] = None


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


GROUPS = {"model": ModelConfig, "data": DataConfig, "pretrain": TrainConfig, "task": TrainConfig,
          "trainer": TrainerConfig, "baseline": BaselineConfig}

# ----------------------------------------------------------------------------------- reading


def one_line(text: object) -> str:
    """``text`` on one line, with jsonargparse's type names made readable."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", line)


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(path: str) -> None:
    """``path`` must be a readable YAML mapping; :class:`ConfigError` with one short line otherwise (never the
    file's content)."""
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path} cannot be read as text ({getattr(err, 'strerror', None) or err})") \
            from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: cannot parse it as YAML{where}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path} is not a YAML mapping of settings (see configs/ for examples)")


def config_parser(prog: str, require_config: bool):
    """jsonargparse parser of a :class:`RunConfig`: ``--config FILE.yaml`` then ``--group.key value`` overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, default_meta=False,
                            description="Pretrain pools, learn every task, report accuracy and memory.")
    parser.add_argument("--config", action=ActionConfigFile, required=require_config,
                        help="YAML file of settings (see configs/)")
    defaults = RunConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=str, default=defaults.out, help="run directory (the task store)")
    parser.add_argument("--pretrained", type=Optional[str], default=defaults.pretrained,
                        help="pool-pretraining run directory whose pools and network this run starts from")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out: finished tasks are kept, the rest learned")
    parser.add_argument("--method", type=str, default=defaults.method,
                        help="nws, or a baseline: finetune, individual, packnet, piggyback")
    for key, cls in GROUPS.items():
        parser.add_class_arguments(cls, key, default=getattr(defaults, key))
    return parser


def parse_run_args(argv: Sequence[str], prog: str = "nws run",
                   require_config: bool = True) -> tuple[RunConfig, bool]:
    """A validated :class:`RunConfig` from ``--config`` and overrides, and whether ``--resume`` was given;
    :class:`ConfigError` with one line otherwise."""
    from jsonargparse import ArgumentError

    for path in _config_files(argv):
        check_config_file(path)
    parser = config_parser(prog, require_config)
    try:
        ns = parser.parse_args(list(argv))
    except ArgumentError as err:
        raise ConfigError(one_line(err)) from None
    except SystemExit as err:  # --help
        raise SystemExit(err.code) from None
    d = ns.as_dict()
    d.pop("config", None)
    resume = bool(d.pop("resume", False))
    return config_from_dict(d), resume


def parse_run_config(argv: Sequence[str], prog: str = "nws run", require_config: bool = True) -> RunConfig:
    """:func:`parse_run_args` without the ``--resume`` flag."""
    return parse_run_args(argv, prog, require_config)[0]


def config_from_dict(d: Any, what: str = "config") -> RunConfig:
    """A validated :class:`RunConfig` from its dict form (as ``dataclasses.asdict`` writes it, e.g. in a run's
    manifest); missing settings take their defaults, unknown ones are refused."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} is not a mapping of settings")
    defaults = RunConfig()
    top = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - top)
    if unknown:
        raise ConfigError(f"{what}: unknown setting {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name in top:
        default = getattr(defaults, name)
        if name in GROUPS:
            group = d.get(name, {})
            if not isinstance(group, dict):
                raise ConfigError(f"{what}: {name} must be a mapping of settings")
            try:
                values[name] = dataclasses.replace(default, **group)
            except TypeError as err:
                raise ConfigError(f"{what}: {name}: {one_line(err)}") from None
        else:
            values[name] = d.get(name, default)
    return validate(RunConfig(**values))


# ----------------------------------------------------------------------------------- checking values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed ({allowed})")


def _check_stage(cfg: TrainConfig, group: str) -> None:
    _check(_integer(cfg.epochs) and cfg.epochs >= 0, f"{group}.epochs", cfg.epochs, "an integer >= 0")
    _check(_integer(cfg.batch_size) and cfg.batch_size >= 1, f"{group}.batch_size", cfg.batch_size,
           "an integer >= 1")
    _check(cfg.optimizer in OPTIMIZERS, f"{group}.optimizer", cfg.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    _check(_number(cfg.lr) and cfg.lr > 0, f"{group}.lr", cfg.lr, "a number > 0")
    _check(_number(cfg.momentum) and 0 <= cfg.momentum < 1, f"{group}.momentum", cfg.momentum, "0 <= momentum < 1")
    _check(not (cfg.nesterov and cfg.optimizer == "sgd" and cfg.momentum == 0), f"{group}.nesterov",
           cfg.nesterov, "nesterov needs momentum > 0")
    _check(_number(cfg.weight_decay) and cfg.weight_decay >= 0, f"{group}.weight_decay", cfg.weight_decay,
           "a number >= 0")
    _check(isinstance(cfg.milestones, list) and all(_number(m) and 0 < m <= 1 for m in cfg.milestones),
           f"{group}.milestones", cfg.milestones, "fractions of the epochs, each in (0, 1]")
    _check(_number(cfg.gamma) and cfg.gamma > 0, f"{group}.gamma", cfg.gamma, "a number > 0")
    _check(_number(cfg.beta) and cfg.beta >= 0, f"{group}.beta", cfg.beta, "a number >= 0")
    _check(_number(cfg.sparsity) and cfg.sparsity >= 0, f"{group}.sparsity", cfg.sparsity, "a number >= 0")


def _check_model(m: ModelConfig) -> None:
    import torch

    from nws.models import create_model, list_models

    _check(m.name in list_models(), "model.name", m.name, f"one of {', '.join(list_models())}")
    _check(isinstance(m.kwargs, dict), "model.kwargs", m.kwargs, "a mapping of the builder's arguments")
    _check(_integer(m.pool_size) and m.pool_size >= 1 + m.zero_entry, "model.pool_size", m.pool_size,
           "an integer >= 1, >= 2 with model.zero_entry")
    _check(_integer(m.group_size) and m.group_size >= 1, "model.group_size", m.group_size, "an integer >= 1")
    _check(isinstance(m.exclude, list) and all(isinstance(p, str) for p in m.exclude), "model.exclude", m.exclude,
           "a list of module-name patterns")
    _check(m.init in POOL_INITS, "model.init", m.init, f"one of {', '.join(POOL_INITS)}")
    _check(_number(m.decay) and 0 < m.decay < 1, "model.decay", m.decay, "0 < decay < 1")
    _check(_number(m.eps) and m.eps > 0, "model.eps", m.eps, "a number > 0")
    _check(m.code_reference in CODE_REFERENCES, "model.code_reference", m.code_reference,
           f"one of {', '.join(CODE_REFERENCES)}")
    _check(_integer(m.key_every) and m.key_every >= 1, "model.key_every", m.key_every, "an integer >= 1")
    _check(m.bn_dtype in BN_DTYPES, "model.bn_dtype", m.bn_dtype, f"one of {', '.join(BN_DTYPES)}")
    try:  # the builder itself says which arguments it takes; on the meta device nothing is allocated
        with torch.device("meta"):
            create_model(m.name, num_classes=2, **m.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.kwargs: {one_line(err)}") from None


def _check_data(d: DataConfig) -> None:
    from nws.data import BENCHMARKS

    _check(d.name in BENCHMARKS, "data.name", d.name, f"one of {', '.join(BENCHMARKS)}")
    _check(_integer(d.num_workers) and d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _check(d.num_tasks is None or (_integer(d.num_tasks) and d.num_tasks >= 0), "data.num_tasks", d.num_tasks,
           "null or an integer >= 0")
    _check(d.image_size is None or (_integer(d.image_size) and d.image_size >= 8), "data.image_size",
           d.image_size, "null or an integer >= 8")
    _check(d.tasks is None or (isinstance(d.tasks, list) and all(isinstance(t, str) for t in d.tasks)),
           "data.tasks", d.tasks, "null or a list of task folders")
    _check(d.name == "folders" or d.tasks is None, "data.tasks", d.tasks, "only with data.name folders")
    if d.name == "folders":
        _check(bool(d.tasks), "data.tasks", d.tasks, "a list of task folders, each holding train/<class>/<image> "
               "and test/<class>/<image>")
        for key, path in [*(("data.tasks", t) for t in d.tasks),
                          *([("data.source", d.source)] if d.source not in (None, "none") else [])]:
            if not Path(path).expanduser().is_dir():
                raise ConfigError(f"{key}: {path} does not exist or is not a folder (DIR/train/<class>/<image>, "
                                  "DIR/test/<class>/<image>)")


def _check_trainer(t: TrainerConfig) -> None:
    _check(str(t.precision) in PRECISIONS, "trainer.precision", t.precision,
           f"one of {', '.join(PRECISIONS)}; the pools stay fp32")
    _check(t.logger in LOGGERS, "trainer.logger", t.logger, f"one of {', '.join(LOGGERS)}")
    _check(_integer(t.num_nodes) and t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "an integer >= 1")
    _check((_integer(t.devices) and (t.devices >= 1 or t.devices == -1)) or (isinstance(t.devices, str) and
           bool(t.devices.strip())), "trainer.devices", t.devices, "an integer >= 1, -1, 'auto' or a device list")
    _check(_integer(t.max_skipped_steps) and t.max_skipped_steps >= 0, "trainer.max_skipped_steps",
           t.max_skipped_steps, "an integer >= 0")
    _check(t.threads is None or (_integer(t.threads) and t.threads >= 1), "trainer.threads", t.threads,
           "null (the CPUs this process may use) or an integer >= 1")


def _check_baseline(b: BaselineConfig) -> None:
    _check(_number(b.prune_ratio) and 0 <= b.prune_ratio < 1, "baseline.prune_ratio", b.prune_ratio,
           "0 <= prune_ratio < 1")
    _check(_integer(b.retrain_epochs) and b.retrain_epochs >= 0, "baseline.retrain_epochs", b.retrain_epochs,
           "an integer >= 0")
    _check(_number(b.mask_init), "baseline.mask_init", b.mask_init, "a number")
    _check(_number(b.mask_threshold), "baseline.mask_threshold", b.mask_threshold, "a number")
    _check(_number(b.mask_lr) and b.mask_lr > 0, "baseline.mask_lr", b.mask_lr, "a number > 0")


def validate(config: RunConfig) -> RunConfig:
    """``config`` if every value is allowed; :class:`ConfigError` naming the first bad key otherwise.

    Checks ranges and names, and that the model builder accepts ``model.kwargs`` (by building the model on
    the meta device, which allocates nothing). Paths that must exist are checked where their meaning is
    known: task folders here, data roots when the benchmark is loaded, before a run writes anything.
    """
    _check(_integer(config.seed), "seed", config.seed, "an integer")
    _check(isinstance(config.out, str) and bool(config.out), "out", config.out, "a directory")
    _check(isinstance(config.method, str), "method", config.method, "a method name")
    _check_model(config.model)
    _check_data(config.data)
    _check_stage(config.pretrain, "pretrain")
    _check_stage(config.task, "task")
    _check_trainer(config.trainer)
    _check_baseline(config.baseline)
    return config
