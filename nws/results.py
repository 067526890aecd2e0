"""A run's results: ``results.json`` (one contract for every method), ``results.md``, and reading them back.

:func:`collect_results` evaluates every task rebuilt from storage and gathers what the manifest records
(per task: name, classes, bytes by kind, accuracy after training and from storage, training time, the
method's extras), the accuracy matrix, the continual-learning metrics and the memory; :func:`write_results` writes
``results.json`` and its table ``results.md`` atomically; :func:`load_results` reads ``results.json`` back,
checked against the schema (:func:`check_results`). The runner and the report share these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nws.container import upgrade_hint
from nws.data import Benchmark
from nws.engine import evaluate
from nws.errors import NWSError
from nws.metrics import continual_metrics
from nws.store import RunStore, atomic_write
from nws.tables import run_markdown

RESULTS = "results.json"
RESULTS_MD = "results.md"
RESULTS_FORMAT = "nws-results"
# 1: results.json before nws 0.2, without a format entry; 2: without the accuracy matrix (upgrade: `nws upgrade RUN`)
RESULTS_VERSION = 3


class ResultsError(NWSError):
    """A results file that is missing or is not a results file of nws."""


def evaluate_tasks(store: RunStore, benchmark: Benchmark, num_workers: int = 0, device: Any = None) -> list[float]:
    """Every stored task rebuilt from storage and evaluated on its test set now."""
    accuracies = []
    for t in store.tasks():
        accuracies.append(evaluate(store.plain_model(t["index"]), benchmark.tasks[t["index"]].test,
                                   num_workers=num_workers, device=device))
        store.drop(t["index"])
    return accuracies


def collect_results(store: RunStore, benchmark: Benchmark, num_workers: int = 0, device: Any = None) -> dict[str, Any]:
    """The results of the run in ``store``, every task rebuilt from storage and evaluated now
    (:func:`results_from`)."""
    return results_from(store, evaluate_tasks(store, benchmark, num_workers, device))


def accuracy_matrix(entries: list[dict[str, Any]], finals: list[float]) -> list[list[float | None]]:
    """Row ``j``, column ``i``: the accuracy on task ``i``, rebuilt from storage right after task ``j`` was
    learned and stored (the tasks' ``acc_so_far``); None above the diagonal (not learned yet) and where a run
    did not record it (runs of nws before the matrix: their diagonal is ``acc_from_storage``, their last row
    ``finals``)."""
    n = len(entries)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for j, entry in enumerate(entries):
        row = entry.get("acc_so_far")
        if isinstance(row, list) and len(row) == j + 1:
            matrix[j][:j + 1] = row
        else:
            matrix[j][j] = entry.get("acc_from_storage")
    if n and any(a is None for a in matrix[-1]):
        matrix[-1] = list(finals)
    return matrix


def results_from(store: RunStore, finals: list[float]) -> dict[str, Any]:
    """The ``results.json`` contract, the same for every method: per task what its manifest entry records plus
    ``acc_final`` (``finals``: its accuracy after the whole sequence, from storage); the accuracy matrix
    (:func:`accuracy_matrix`); continual metrics; memory (the shared files, the tasks, a float32 model, and
    what the method's reader adds: :meth:`~nws.store.RunStore.memory_extras`) and ``memory_after_task``."""
    entries = store.tasks()
    dropped = ("index", "file", "memory_after", "acc_so_far", "preparation")
    tasks = [{**{k: v for k, v in entry.items() if k not in dropped}, "acc_final": acc}
             for entry, acc in zip(entries, finals, strict=True)]
    shared = store.shared_files()
    config = store.manifest.get("config") or {}
    memory = {"shared": store.size(shared), "shared_files": {name: store.size([name]) for name in shared},
              "tasks_total": sum(sum(t["bytes"].values()) for t in tasks),
              "float32_model": max((t["float32_model"] for t in tasks), default=0), **store.memory_extras()}
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "method": store.method, "seed": config.get("seed"),
            "config": config, **continual_metrics(tasks), "tasks": tasks,
            "accuracy_matrix": accuracy_matrix(entries, finals), "memory": memory,
            "memory_after_task": [entry["memory_after"] for entry in entries], "source": store.manifest.get("source")}


def write_results(out: str | Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` (its table) in the run directory ``out``, each written atomically."""
    atomic_write(Path(out) / RESULTS, json.dumps(results, indent=1).encode())
    atomic_write(Path(out) / RESULTS_MD, run_markdown(results).encode())


def check_results(results: Any, what: str) -> dict[str, Any]:
    """``results`` if it follows the ``results.json`` schema; :class:`ResultsError` naming ``what`` otherwise
    (with the command that converts it, for results of an earlier nws)."""
    version = results.get("version") if isinstance(results, dict) else None
    if isinstance(results, dict) and results.get("format") == RESULTS_FORMAT and version != RESULTS_VERSION:
        if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
            raise ResultsError(f"{what} has a corrupt format version")
        if version > RESULTS_VERSION:
            raise ResultsError(f"{what} has format version {results['version']}, newer than this nws reads "
                               f"({RESULTS_VERSION}); upgrade nws")
    earlier = isinstance(results, dict) and ("format" not in results or results.get("format") == RESULTS_FORMAT)
    if earlier and isinstance(results.get("tasks"), list) and results.get("version") != RESULTS_VERSION:
        raise ResultsError(f"{what} holds the results of an earlier nws; convert the run with `{upgrade_hint(what)}`")
    try:
        if results["format"] != RESULTS_FORMAT:
            raise ValueError(f"format {str(results['format'])[:40]!r}")
        tasks = results["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise ValueError("no tasks")
        for t in tasks:
            str(t["name"]), float(t["acc_after_training"]), float(t["acc_from_storage"]), float(t["acc_final"])
            if not isinstance(t["bytes"], dict):
                raise ValueError("bad bytes")
            sum(int(v) for v in t["bytes"].values())
        memory = results["memory"]
        int(memory["shared"]), int(memory["tasks_total"]), int(memory["float32_model"])
        if not isinstance(memory["shared_files"], dict):
            raise ValueError("bad shared_files")
        after = results["memory_after_task"]
        if not (isinstance(after, list) and len(after) == len(tasks)):
            raise ValueError("memory_after_task is not one figure per task")
        [int(m) for m in after]
        float(results["average_accuracy"]), float(results["backward_transfer"]), float(results["forgetting"])
        matrix = results["accuracy_matrix"]
        if not (isinstance(matrix, list) and len(matrix) == len(tasks)
                and all(isinstance(row, list) and len(row) == len(tasks) for row in matrix)
                and all(a is None or (i <= j and 0 <= float(a) <= 1) for j, row in enumerate(matrix)
                        for i, a in enumerate(row))):
            raise ValueError("accuracy_matrix is not one row per task of accuracies up to the diagonal")
        if not isinstance(results["method"], str) or not isinstance(results["config"], dict):
            raise ValueError("bad method or config")
    except (KeyError, TypeError, ValueError) as err:
        raise ResultsError(f"{what} is not a results file of nws ({type(err).__name__}: {err})") from None
    return results


def load_results(path: str | Path) -> dict[str, Any]:
    """The checked ``results.json`` of the run directory ``path``."""
    file = Path(path) / RESULTS
    if not file.is_file():
        raise ResultsError(f"{path} has no {RESULTS} (not a finished run)")
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ResultsError(f"{file} is corrupt ({str(err).splitlines()[0]})") from None
    return check_results(results, str(file))
