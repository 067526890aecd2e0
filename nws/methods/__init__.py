"""The methods under the common protocol: NWS and the baselines ``finetune``, ``individual``, ``packnet`` and
``piggyback``. ``method_class(name)`` finds one; ``open_run(path)`` opens any run directory with its method's
reader, so that ``.model(i)`` rebuilds task ``i`` from its files."""

from __future__ import annotations

from nws.config import ConfigError
from nws.errors import StoreError
from nws.methods.base import Context, Method, Saved
from nws.methods.finetune import Finetune
from nws.methods.individual import Individual
from nws.methods.nws import NWS
from nws.methods.packnet import PackNet
from nws.methods.piggyback import Piggyback
from nws.store import RunStore

METHODS: dict[str, type[Method]] = {m.name: m for m in (NWS, Piggyback, PackNet, Finetune, Individual)}


def method_class(name: str) -> type[Method]:
    """The method called ``name``; :class:`ConfigError` for an unknown one."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def open_run(path: str) -> RunStore:
    """The run directory at ``path`` read by its method's reader (its manifest names the method)."""
    method = RunStore(path).method
    if method not in METHODS:
        raise StoreError(f"{path} holds a run of unknown method {method!r}")
    return METHODS[method].store_class(path)


__all__ = ["METHODS", "Context", "Method", "Saved", "method_class", "open_run"]
