"""Baselines run under the NWS protocol (same data, backbone, schedule, source pretraining, storage
accounting): ``finetune``, ``individual``, ``packnet`` and ``piggyback``.

``make_learner(config)`` returns the learner that ``config.method`` names (``nws`` by default);
``open_run(path)`` opens any run directory so that ``.model(i)`` rebuilds task ``i`` from its files.
"""

from __future__ import annotations

from typing import Any

from nws.baselines.common import BaselineLearner, BaselineStore
from nws.baselines.finetune import FinetuneLearner, FinetuneStore
from nws.baselines.individual import IndividualLearner, IndividualStore
from nws.baselines.packnet import PackNetLearner, PackNetStore
from nws.baselines.piggyback import PiggybackLearner, PiggybackStore
from nws.config import RunConfig
from nws.data import Benchmark
from nws.errors import NWSError
from nws.store import TaskStore

BASELINES: dict[str, type[BaselineLearner]] = {
    "finetune": FinetuneLearner, "individual": IndividualLearner, "packnet": PackNetLearner,
    "piggyback": PiggybackLearner,
}
METHODS = ("nws", *BASELINES)
STORES: dict[str, type[BaselineStore]] = {
    "finetune": FinetuneStore, "individual": IndividualStore, "packnet": PackNetStore, "piggyback": PiggybackStore,
}


def make_learner(config: RunConfig, benchmark: Benchmark | None = None, progress: bool = True,
                 **baseline_kwargs: Any) -> Any:
    """The learner for ``config.method``: ``NWSLearner`` or a baseline, all with ``.run() -> results``;
    ``baseline_kwargs`` go to a baseline's constructor (e.g. ``pretrained_source``)."""
    if config.method == "nws":
        from nws.learner import NWSLearner

        return NWSLearner(config, benchmark, progress=progress)
    if config.method not in BASELINES:
        raise NWSError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    return BASELINES[config.method](config, benchmark, progress=progress, **baseline_kwargs)


def open_run(path: str) -> TaskStore:
    """The run directory at ``path`` as its method's store (an NWS ``TaskStore`` or a baseline's)."""
    store = TaskStore(path)
    method = store.manifest.get("method", "nws")
    if method == "nws":
        return store
    if method not in STORES:
        raise NWSError(f"{path} holds a run of unknown method {method!r}")
    return STORES[method](path)


__all__ = ["BASELINES", "METHODS", "BaselineLearner", "BaselineStore", "make_learner", "open_run"]
