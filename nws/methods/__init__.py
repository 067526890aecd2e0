"""The methods under the common protocol, and how a method is found by name.

Built in: NWS and the baselines ``finetune``, ``individual``, ``packnet`` and ``piggyback``. A method defined
elsewhere is found by :func:`method_class` in any of three ways: registered in this process
(:func:`register_method`), named as ``module:Class`` (``--method mypkg.methods:MyMethod``), or installed under
the entry-point group ``nws.methods`` (``[project.entry-points."nws.methods"] mine = "mypkg.methods:MyMethod"``).
``open_run(path)`` opens any run directory with its method's reader, so that ``.model(i)`` rebuilds task ``i``
from its files.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from nws.config import ConfigError
from nws.errors import StoreError
from nws.methods.base import Context, Method, Saved
from nws.methods.finetune import Finetune
from nws.methods.individual import Individual
from nws.methods.nws import NWS
from nws.methods.packnet import PackNet
from nws.methods.piggyback import Piggyback
from nws.store import RunStore

ENTRY_POINTS = "nws.methods"
METHODS: dict[str, type[Method]] = {m.name: m for m in (NWS, Piggyback, PackNet, Finetune, Individual)}


def register_method(cls: type[Method]) -> type[Method]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator); a name taken by another class is
    refused."""
    if not (isinstance(cls, type) and issubclass(cls, Method) and isinstance(getattr(cls, "name", None), str)):
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def _from_path(spec: str) -> type[Method]:
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"method: cannot load {spec!r} ({str(err).splitlines()[0]})") from None
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise ConfigError(f"method: {spec!r} is not a subclass of nws.methods.Method")
    return obj


def method_class(name: str) -> type[Method]:
    """The method ``name`` (registered, ``module:Class``, or an ``nws.methods`` entry point);
    :class:`ConfigError` for an unknown one."""
    if name in METHODS:
        return METHODS[name]
    if ":" in name:
        return _from_path(name)
    found = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == name]
    if found:
        return _from_path(found[0].value)
    raise ConfigError(f"method: unknown method {name!r}; choose one of {', '.join(METHODS)}, a module:Class, or "
                      f"a method installed under the entry-point group {ENTRY_POINTS}")


def run_method(store: RunStore) -> type[Method]:
    """The method of the run in ``store``: as its config names it (a registered name, entry point or
    ``module:Class``), which must be the method its manifest records."""
    config = store.manifest.get("config")
    given = config.get("method") if isinstance(config, dict) and isinstance(config.get("method"), str) else None
    try:
        cls = method_class(given or store.method)
    except ConfigError:
        raise StoreError(f"{store.root} holds a run of method {given or store.method!r}, which this nws cannot "
                         "find (register it, name it as module:Class, or install it)") from None
    if cls.name != store.method:
        raise StoreError(f"{store.root}: its manifest records method {store.method!r}, its config {given!r}")
    return cls


def open_run(path: str) -> RunStore:
    """The run directory at ``path`` read by its method's reader (its manifest names the method)."""
    return run_method(RunStore(path)).store_class(path)


__all__ = ["METHODS", "Context", "Method", "Saved", "method_class", "open_run", "register_method", "run_method"]
