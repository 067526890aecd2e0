"""One parser of run settings for the command line, config files and stored runs, and the checks across
settings (:func:`validate`).

The parser is jsonargparse's, built from the dataclasses of :mod:`nws.config`: every error is a
:class:`~nws.config.ConfigError` of one line (:func:`explain` names the key, the value given and what its
type allows), no long option may be abbreviated, and ``--config`` takes a YAML file or a packaged config's
name. A stored run's config is read by the same parser (:func:`stored_config`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from argparse import RawDescriptionHelpFormatter
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from nws.config import GROUPS, TITLES, TOP, ConfigError, ModelConfig, RunConfig, setting_types
from nws.config_types import allowed, registered_choices


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
        return f"{key}: unknown {typehint._kind} {value!r}; choose one of {registered_choices(typehint)}"
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
