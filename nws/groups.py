"""Runs and groups of runs for the report: each run's checked results, runs of one method and settings (their
seeds) grouped, with means and standard deviations over the seeds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nws.config import RunConfig
from nws.methods import METHODS
from nws.metrics import EXTRAPOLATE_TO, continual_metrics, extrapolate, memory_after_task, memory_total, shared_bytes
from nws.results import RESULTS, ResultsError, load_results


@dataclass
class Run:
    """One run directory's results."""

    path: Path
    results: dict[str, Any]

    @property
    def method(self) -> str:
        return self.results["method"]

    @property
    def seed(self) -> Any:
        return self.results["seed"]

    def settings(self, besides: tuple[str, ...] = ()) -> str:
        """The run's configuration without seed and output directory (nor the dotted keys ``besides``): runs
        that share it are one experiment. A setting the run's config lacks (added to nws after the run was made)
        counts at its default."""
        config = _filled(self.results["config"], dataclasses.asdict(RunConfig()))
        for key in ("seed", "out", *besides):
            section, _, name = key.rpartition(".")
            (config.get(section, {}) if section else config).pop(name, None)
        return json.dumps({"method": self.method, **config}, sort_keys=True)

    def setting(self, key: str) -> Any:
        """The value of the dotted setting ``key`` in the run's config (None if it has none)."""
        value: Any = self.results["config"]
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value


def _filled(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every key it lacks taken from ``defaults``, section by section."""
    out = dict(config)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and default and isinstance(out[key], dict):
            out[key] = _filled(out[key], default)
    return out


def load_run(path: str | Path) -> Run:
    """A run directory's checked ``results.json`` (:func:`nws.results.load_results`)."""
    return Run(Path(path), load_results(path))


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs at ``paths``; a directory without ``results.json`` stands for the runs directly inside it."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ResultsError(f"run directory {p} does not exist")
        if (p / RESULTS).is_file():
            runs.append(load_run(p))
            continue
        inner = sorted(d for d in p.iterdir() if (d / RESULTS).is_file())
        if not inner:
            raise ResultsError(f"{p} has no results.json, nor runs inside it")
        runs += [load_run(d) for d in inner]
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


@dataclass
class Group:
    """The runs of one method and settings (several seeds): means and standard deviations over them."""

    label: str
    method: str
    runs: list[Run]
    task_names: list[str] = field(default_factory=list)
    acc_final: list[tuple[float, float]] = field(default_factory=list)
    acc_after_training: list[tuple[float, float]] = field(default_factory=list)
    average_accuracy: tuple[float, float] = (0.0, 0.0)
    backward_transfer: tuple[float, float] = (0.0, 0.0)
    forgetting: tuple[float, float] = (0.0, 0.0)
    memory: tuple[float, float] = (0.0, 0.0)
    memory_after_task: list[float] = field(default_factory=list)
    shared: float = 0.0
    float32_model: float = 0.0
    train_cpu_seconds: list[tuple[float, float]] = field(default_factory=list)  # empty unless every run has them
    train_seconds: list[tuple[float, float]] = field(default_factory=list)
    task_bytes: tuple[float, float] = (0.0, 0.0)  # each run's mean bytes per task: mean and std over the runs
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)  # mean over the runs
    chance: list[float] = field(default_factory=list)  # per task: 1 / its number of classes

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def summary(self) -> dict[str, Any]:
        def ms(x: tuple[float, float]) -> dict[str, float]:
            return {"mean": x[0], "std": x[1]}

        return {"label": self.label, "method": self.method, "runs": [str(r.path) for r in self.runs],
                "seeds": self.seeds, "tasks": self.task_names,
                "acc_final": [ms(x) for x in self.acc_final],
                "acc_after_training": [ms(x) for x in self.acc_after_training],
                "average_accuracy": ms(self.average_accuracy), "backward_transfer": ms(self.backward_transfer),
                "forgetting": ms(self.forgetting), "memory": ms(self.memory),
                "memory_after_task": self.memory_after_task,
                f"memory_at_{EXTRAPOLATE_TO}_tasks": extrapolate(self.memory_after_task, self.shared),
                "float32_model": self.float32_model,
                "train_cpu_seconds": [ms(x) for x in self.train_cpu_seconds],
                "train_seconds": [ms(x) for x in self.train_seconds],
                "task_bytes": ms(self.task_bytes), "accuracy_matrix": self.accuracy_matrix}


def _task_times(members: list[Run], key: str, n: int) -> list[tuple[float, float]]:
    """Mean and standard deviation over the runs of each task's ``key`` (seconds); empty when a run lacks it
    (runs written before nws recorded training times)."""
    if not all(key in t for r in members for t in r.results["tasks"]):
        return []
    return [_mean_std([float(r.results["tasks"][i][key]) for r in members]) for i in range(n)]


def _mean_matrix(members: list[Run], n: int) -> list[list[float | None]]:
    """The runs' accuracy matrices averaged cell by cell (None where a run lacks the cell)."""
    matrices = [r.results["accuracy_matrix"] for r in members]
    return [[None if any(m[j][i] is None for m in matrices) else float(np.mean([m[j][i] for m in matrices]))
             for i in range(n)] for j in range(n)]


# Settings along which runs of one method are drawn as a curve (accuracy against bytes per task).
CURVE_SETTINGS = ("model.rate", "task.lr")


def curves(groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """For each setting of :data:`CURVE_SETTINGS`, the groups whose settings differ in it alone (two or more):
    ``(the setting, the groups ordered by its value)``."""
    out = []
    for key in CURVE_SETTINGS:
        by_rest: dict[str, list[Group]] = {}
        for g in groups:
            by_rest.setdefault(g.runs[0].settings(besides=(key,)), []).append(g)
        for members in by_rest.values():
            if len(members) > 1:
                out.append((key, sorted(members, key=lambda g: (g.runs[0].setting(key) is None,
                                                                g.runs[0].setting(key) or 0))))
    return out


def aggregate(runs: list[Run]) -> list[Group]:
    """Group runs by method and settings (seed aside) and take means and standard deviations over seeds."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.settings(), []).append(run)
    groups = []
    per_method: dict[str, int] = {}
    for members in by_key.values():
        per_method[members[0].method] = per_method.get(members[0].method, 0) + 1
    for members in by_key.values():
        method = members[0].method
        label = method if per_method[method] == 1 else f"{method} ({members[0].path.name})"
        counts = {len(r.results["tasks"]) for r in members}
        if len(counts) != 1:
            raise ResultsError(f"runs of {label} have different numbers of tasks ({sorted(counts)})")
        n = counts.pop()
        metrics = [continual_metrics(r.results["tasks"]) for r in members]
        after = [memory_after_task(r.results) for r in members]
        groups.append(Group(
            label=label, method=method, runs=members,
            task_names=[t["name"] for t in members[0].results["tasks"]],
            acc_final=[_mean_std([r.results["tasks"][i]["acc_final"] for r in members]) for i in range(n)],
            acc_after_training=[_mean_std([r.results["tasks"][i]["acc_after_training"] for r in members])
                                for i in range(n)],
            average_accuracy=_mean_std([m["average_accuracy"] for m in metrics]),
            backward_transfer=_mean_std([m["backward_transfer"] for m in metrics]),
            forgetting=_mean_std([m["forgetting"] for m in metrics]),
            memory=_mean_std([memory_total(r.results) for r in members]),
            memory_after_task=[float(np.mean([a[i] for a in after])) for i in range(n)],
            shared=float(np.mean([shared_bytes(r.results) for r in members])),
            float32_model=float(np.mean([r.results["memory"]["float32_model"] for r in members])),
            train_cpu_seconds=_task_times(members, "train_cpu_seconds", n),
            train_seconds=_task_times(members, "train_seconds", n),
            task_bytes=_mean_std([r.results["memory"]["tasks_total"] / n for r in members]),
            accuracy_matrix=_mean_matrix(members, n),
            chance=[1 / max(len(t["classes"]), 1) for t in members[0].results["tasks"]]))
    rank = {m: i for i, m in enumerate(METHODS)}  # the registry's order: NWS, then the baselines
    groups.sort(key=lambda g: (rank.get(g.method, len(rank)), g.label))
    return groups
