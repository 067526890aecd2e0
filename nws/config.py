"""Run settings: typed dataclasses, and one parser for the command line, config files and stored runs.

The defaults are the embedded demo: a small convnet on the split-digits benchmark. Every setting's type says
what is allowed (``Literal`` choices, constrained numbers, registered names), so the jsonargparse parser
itself refuses a bad value, and ``--help`` shows what each setting allows. :func:`validate` adds the checks
that span several settings (a pool large enough for the zero entry, task folders that exist, the model
builder's arguments). Every problem is a :class:`ConfigError` with one line naming the key and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from argparse import RawDescriptionHelpFormatter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings
from jsonargparse.typing import (NonNegativeInt, NotEmptyStr, OpenUnitInterval, PositiveInt, extend_base_type,
                                 restricted_number_type, restricted_string_type)

from nws.errors import NWSError

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each setting's help: its docstring below


class ConfigError(NWSError):
    """A setting that is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------------- types that say what is allowed

PositiveNumber = restricted_number_type("PositiveNumber", float, [(">", 0.0), ("<", math.inf)])
NonNegativeNumber = restricted_number_type("NonNegativeNumber", float, [(">=", 0.0), ("<", math.inf)])
Number = restricted_number_type("Number", float, [(">", -math.inf), ("<", math.inf)])
Fraction = restricted_number_type("Fraction", float, [(">", 0.0), ("<=", 1.0)])
HalfOpenUnit = restricted_number_type("HalfOpenUnit", float, [(">=", 0.0), ("<", 1.0)])
ImageSide = restricted_number_type("ImageSide", int, (">=", 8))
DeviceCount = restricted_number_type("DeviceCount", int, [(">=", 1), ("==", -1)], join="or")
DeviceList = restricted_string_type("DeviceList", r"^(auto|\d+(,\d+)*,|\d+(,\d+)+)$")


def registered_name(kind: str, names: str, resolve: str | None = None, more: str = ""):
    """A ``str`` type that accepts the names registered in ``names`` (``module:attribute``, a collection or a
    function returning one), looked up when a value is parsed or ``--help`` shown; with ``resolve``
    (``module:function``), also any other value that function accepts (``more`` says which, in words)."""
    extend = {"_names": names, "_kind": kind, "_resolve": resolve, "_more": more}
    return extend_base_type(f"{kind.title()}Name", str, lambda cls, value: _check_name(cls, value, kind),
                            extra_attrs=extend, register_key=(kind, names))


def _imported(path: str) -> Any:
    import importlib

    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def registered_names(typehint: Any) -> list[str]:
    names = _imported(typehint._names)
    return list(names() if callable(names) else names)


def _choices(typehint: Any) -> str:
    return ", ".join(registered_names(typehint)) + (f", {typehint._more}" if typehint._more else "")


def _check_name(cls, value: Any, kind: str) -> None:
    if value in registered_names(cls):
        return
    if cls._resolve is not None:
        try:
            _imported(cls._resolve)(value)
            return
        except NWSError:
            pass
    raise ValueError(f"{value!r} is not a registered {kind}")


ModelName = registered_name("model", "nws.models:list_models")
BenchmarkName = registered_name("benchmark", "nws.data:list_benchmarks")

Optimizer = Literal["sgd", "adam"]
PoolInit = Literal["kernels", "normal", "kmeans"]
CodeReference = Literal["source", "previous"]
BNDtype = Literal["float32", "float16", "bfloat16", "int8"]
# Precisions that keep parameters and buffers (pools) in fp32; "16-mixed"/"bf16-mixed" autocast the convs.
Precision = Literal["32-true", "32", "16-mixed", "bf16-mixed", "64-true", "64"]
Logger = Literal["csv", "tensorboard", "wandb", "none"]
Augment = Literal["auto", "none", "light", "standard"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
LOGGERS: tuple[str, ...] = typing.get_args(Logger)

_ALLOWED = {int: "an integer", float: "a number", str: "a string", bool: "true or false", NotEmptyStr: "a non-empty string",
            NonNegativeInt: "an integer >= 0", PositiveInt: "an integer >= 1", ImageSide: "an integer >= 8",
            DeviceCount: "an integer >= 1, or -1 (all)",
            DeviceList: "auto, or device indices such as 0,1 or 1, (one device: its index and a comma)", PositiveNumber: "a number > 0",
            NonNegativeNumber: "a number >= 0", Number: "a finite number", Fraction: "a number in (0, 1]",
            HalfOpenUnit: "a number in [0, 1)", OpenUnitInterval: "a number in (0, 1)"}


def allowed(typehint: Any) -> str:
    """What ``typehint`` allows, in words (for ``--help`` and error messages)."""
    origin, args = typing.get_origin(typehint), typing.get_args(typehint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Union:
        return " or ".join("null" if a is type(None) else allowed(a) for a in args)
    if origin is list:
        return f"a list, each {allowed(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if hasattr(typehint, "_names"):
        return "one of " + _choices(typehint)
    return _ALLOWED.get(typehint, getattr(typehint, "__name__", str(typehint)))


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
    key_every: PositiveInt = 10
    """with code_reference previous: a task coded against the source every this many tasks"""
    rate: NonNegativeNumber = 0.0
    """lambda of the rate-aware search: each kernel takes the entry minimising its squared distance plus lambda
    times the bits its choice costs in the task file (in units of the pool's typical squared gap between
    neighbouring entries; docs/rate.md); 0: the nearest entry, as in the paper"""
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


# ----------------------------------------------------------------------------------- the parser


class Parser(ArgumentParser):
    """jsonargparse's parser with every error a :class:`ConfigError` (one line; the caller names the value)
    and no abbreviated long options."""

    def __init__(self, *args: Any, description: str | None = None, **kwargs: Any):
        import textwrap

        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["description"] = description and textwrap.fill(description, 100)
        super().__init__(*args, allow_abbrev=False, exit_on_error=False, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        raise ConfigError(" ".join(part.strip() for part in message.splitlines() if part.strip()))


class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """Help that says what each setting allows, in words; descriptions and examples kept as written."""

    def _get_type_str(self, action) -> str | None:
        typehint = getattr(action, "_typehint", None) or action.type
        return allowed(typehint) if typehint is not None else super()._get_type_str(action)


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in the package, by name."""
    folder = resources.files("nws") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def config_path(name: str) -> Path:
    """``name`` as a file: a path that exists, or a packaged config (``NAME`` or ``NAME.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file() or os.sep in name or "/" in name:
        return path
    return packaged_configs().get(name.removesuffix(".yaml"), path)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key in GROUPS:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def read_config_file(name: str) -> dict[str, Any]:
    """The settings in config ``name`` (a path or a packaged config's name): a YAML mapping of known settings;
    :class:`ConfigError` with one short line otherwise (never the file's content)."""
    import yaml

    path = config_path(name)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"--config {name} does not exist (a YAML file, or a name that nws configs lists)") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {name} cannot be read as text ({getattr(err, 'strerror', None) or err})") \
            from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {name}: cannot parse it as YAML{where}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"--config {name} is not a YAML mapping of settings (nws configs lists examples)")
    unknown = [k for k in _flatten(content) if k not in setting_types()]
    if unknown:
        raise ConfigError(f"--config {name}: unknown setting {unknown[0]} (nws run --help lists them)")
    return content


class ConfigFile(ActionConfigFile):
    """``--config FILE``, or the name of a packaged config (``nws configs``), checked before it is read."""

    def __call__(self, parser, cfg, values, option_string=None):
        read_config_file(values)
        super().__call__(parser, cfg, str(config_path(values)), option_string)


def add_settings(parser: ArgumentParser, method_type: Any = str, skip: Sequence[str] = ()) -> None:
    """``--config`` and every :class:`RunConfig` setting (``--group.key value``) but ``skip`` on ``parser``;
    ``--method`` of ``method_type`` (the command line's knows the registered methods)."""
    parser.add_argument("--config", action=ConfigFile, help="settings file: a YAML path, or the name of a "
                        "packaged config (nws configs lists them); the options after it override it")
    parser.add_class_arguments(RunConfig, None, default=RunConfig(), skip={"method", *skip})
    if "method" not in skip:
        parser.add_argument("--method", type=method_type, default=RunConfig().method, help="nws, or a baseline")
    parser.groups["RunConfig"].title = "run"
    for key in GROUPS:
        parser.groups[key].title = TITLES[key]


def settings_parser(prog: str = "nws run") -> Parser:
    """A parser of :class:`RunConfig` settings alone."""
    parser = Parser(prog=prog)
    add_settings(parser)
    return parser


def _plain(value: Any) -> Any:
    """``value`` with the constrained types' values as plain ``int``/``float``/``str`` (YAML and JSON safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    return value


def config_from_namespace(values: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a parsed namespace's dict (other keys ignored), checked by :func:`validate`."""
    d = _plain(dict(values))
    top = {k: d[k] for k in TOP if k in d}
    groups = {k: cls(**{f.name: d[k][f.name] for f in dataclasses.fields(cls) if f.name in d[k]})
              for k, cls in GROUPS.items()}
    return validate(RunConfig(**top, **groups), parsed=True)


def explain(message: str, given: Any = None, types: Mapping[str, Any] | None = None) -> str:
    """A parser's error as one line naming the key, the value ``given(key)`` finds and what the key's type
    (in ``types``, default :func:`setting_types`) allows."""
    prefix = 'Parser key "'
    if not message.startswith(prefix):
        return message
    key = message[len(prefix):].split('"', 1)[0]
    typehint = (setting_types() if types is None else types).get(key)
    if typehint is None:
        return message
    value = given(key) if given is not None else None
    if typing.get_origin(typehint) is list and not isinstance(value, list):
        value = None  # one of several values given after the option: which one is not known
    if hasattr(typehint, "_names") and value is not None:
        return f"{key}: unknown {typehint._kind} {value!r}; choose one of {_choices(typehint)}"
    shown = f"{value!r} is not allowed" if value is not None else "not allowed"
    return f"{key}: {shown} ({allowed(typehint)})"


def _lookup(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def _as_yaml(text: str) -> Any:
    """A command-line value as the parser reads it (YAML), or the text itself."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def given_on_command_line(argv: Sequence[str]):
    """A function: the value ``key`` has in ``argv`` (the last ``--key V``, ``--key=V`` or ``--config``
    file that sets it), for error messages."""

    def given(key: str) -> Any:
        value = None
        for i, arg in enumerate(argv):
            name, eq, inline = arg.partition("=")
            if name == "--config" and (eq or i + 1 < len(argv)):
                try:
                    found = _lookup(read_config_file(inline if eq else argv[i + 1]), key)
                except ConfigError:
                    found = None
                value = found if found is not None else value
            elif name == f"--{key}" and (eq or i + 1 < len(argv)):
                value = _as_yaml(inline if eq else argv[i + 1])
        return value

    return given


def parse_run_args(argv: Sequence[str], prog: str = "nws run", require_config: bool = False) -> tuple[RunConfig, bool]:
    """A validated :class:`RunConfig` from ``--config`` and ``--group.key value`` overrides, and whether
    ``--resume`` was given; :class:`ConfigError` with one line otherwise."""
    parser = settings_parser(prog)
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    if require_config and not any(a.split("=")[0] == "--config" for a in argv):
        raise ConfigError(f"{prog}: --config is required")
    try:
        ns = parser.parse_args(list(argv))
    except ConfigError as err:
        raise ConfigError(explain(str(err), given_on_command_line(argv))) from None
    d = ns.as_dict()
    return config_from_namespace(d), bool(d.get("resume"))


def parse_run_config(argv: Sequence[str], prog: str = "nws run", require_config: bool = False) -> RunConfig:
    """:func:`parse_run_args` without the ``--resume`` flag."""
    return parse_run_args(argv, prog, require_config)[0]


def stored_config(d: Any, what: str = "config") -> RunConfig:
    """The :class:`RunConfig` a run recorded (``dataclasses.asdict`` form, as in its manifest), read by the
    same parser as the command line: settings it lacks take their defaults; a setting that no longer exists
    is refused with one line naming ``nws upgrade``."""
    if not isinstance(d, dict) or not all(isinstance(d.get(g, {}), dict) for g in GROUPS):
        raise ConfigError(f"{what} is not a mapping of settings")
    unknown = [k for k in _flatten(d) if k not in setting_types()]
    if unknown:
        raise ConfigError(f"{what} has the setting {unknown[0]}, which this version of nws no longer has; "
                          "rewrite the run with: nws upgrade RUN")
    parser = settings_parser()
    try:
        ns = parser.parse_object({k: v for k, v in d.items()})
    except ConfigError as err:
        raise ConfigError(f"{what}: {explain(str(err), lambda key: _lookup(d, key))}") from None
    return config_from_namespace(ns.as_dict())


# ----------------------------------------------------------------------------------- checks across settings


def _refuse(key: str, value: Any, allowed_text: str) -> None:
    raise ConfigError(f"{key}: {value!r} is not allowed ({allowed_text})")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def validate(config: RunConfig, parsed: bool = False) -> RunConfig:
    """``config`` with every value checked (by the parser, unless ``parsed``) and its data paths absolute;
    :class:`ConfigError` naming the first bad key otherwise.

    Beyond the types: a pool has room for the zero entry, Nesterov has momentum, task folders exist and
    belong to ``folders``, and the model builder accepts ``model.kwargs`` (built on the meta device, which
    allocates nothing). Other paths are checked where their meaning is known (data roots when the benchmark
    loads), before a run writes anything.
    """
    if not parsed:
        return stored_config(dataclasses.asdict(config), "the config")
    m, d = config.model, config.data
    if m.pool_size < 1 + m.zero_entry:
        _refuse("model.pool_size", m.pool_size, "an integer >= 2 with model.zero_entry")
    for group in ("pretrain", "task"):
        stage = getattr(config, group)
        if stage.nesterov and stage.optimizer == "sgd" and stage.momentum == 0:
            _refuse(f"{group}.nesterov", stage.nesterov, "nesterov needs momentum > 0")
    _check_builder(m)
    tasks = [d.tasks] if isinstance(d.tasks, str) else d.tasks
    if d.name != "folders" and tasks is not None:
        _refuse("data.tasks", d.tasks, "only with data.name folders")
    if d.name == "folders":
        if not tasks:
            _refuse("data.tasks", d.tasks, "task folders, each holding train/<class>/<image> and "
                    "test/<class>/<image>")
        tasks = [_absolute(t) for t in tasks]
        source = d.source if d.source in (None, "none") else _absolute(d.source)
        for key, path in [*(("data.tasks", t) for t in tasks), *([("data.source", source)] if source else [])]:
            if path != "none" and not Path(path).is_dir():
                raise ConfigError(f"{key}: {path} does not exist or is not a folder (DIR/train/<class>/<image>, "
                                  "DIR/test/<class>/<image>)")
        d = dataclasses.replace(d, tasks=tasks, source=source)
    elif d.augment != "auto":
        _refuse("data.augment", d.augment, "auto, except with data.name folders")
    roots = {k: _absolute(getattr(d, k)) for k in ("root", "source_root") if getattr(d, k) is not None}
    return dataclasses.replace(config, data=dataclasses.replace(d, **roots))


def _check_builder(m: ModelConfig) -> None:
    """The model builder accepts ``model.kwargs``; on the meta device nothing is allocated."""
    import torch

    from nws.models import create_model

    try:
        with torch.device("meta"):
            create_model(m.name, num_classes=2, **m.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.kwargs: {' '.join(str(err).split())}") from None
