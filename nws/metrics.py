"""Continual-learning metrics and memory accounting of a run's results (no plotting: see :mod:`nws.report`).

A run's ``results.json`` holds per task ``acc_after_training`` (right after the task was learned),
``acc_from_storage`` (rebuilt from its files right after) and ``acc_final`` (rebuilt from the files after the
whole sequence), its ``bytes``; and ``memory``: ``shared`` (the files every task needs, stored once),
``tasks_total`` and ``float32_model``, plus ``memory_after_task`` (what serving tasks ``0..t`` takes).
"""

from __future__ import annotations

from typing import Any

from torch import nn

EXTRAPOLATE_TO = 100


def float32_bytes(model: nn.Module) -> int:
    """Size of the same network stored plainly in float32: all parameters and buffers, pools excluded."""
    return sum(4 * t.numel() for k, t in model.state_dict().items()
               if ".pool." not in f".{k}" and t.is_floating_point())


def continual_metrics(tasks: list[dict[str, Any]]) -> dict[str, float]:
    """Average final accuracy, backward transfer and forgetting of a sequence.

    ``acc_final`` is a task's accuracy after the whole sequence, ``acc_after_training`` right after it was
    learned. Backward transfer is the mean of ``acc_final - acc_after_training`` over all tasks but the
    last (Lopez-Paz & Ranzato 2017); forgetting the mean of its losses, ``max(0, after - final)``. Both are
    0 for fewer than two tasks.
    """
    final = [t["acc_final"] for t in tasks]
    earlier = [(t["acc_after_training"], f) for t, f in zip(tasks[:-1], final[:-1])]
    return {"average_accuracy": sum(final) / max(len(final), 1),
            "backward_transfer": sum(f - a for a, f in earlier) / len(earlier) if earlier else 0.0,
            "forgetting": sum(max(0.0, a - f) for a, f in earlier) / len(earlier) if earlier else 0.0}


def task_bytes(task: dict[str, Any]) -> int:
    """A task's own stored bytes (its files)."""
    return int(sum(task["bytes"].values()))


def shared_bytes(results: dict[str, Any]) -> int:
    """Bytes stored once for all tasks (the method's shared files: NWS's pools and reference, a baseline's
    shared network; 0 for ``individual``)."""
    return int(results["memory"]["shared"])


def memory_total(results: dict[str, Any]) -> int:
    return shared_bytes(results) + int(results["memory"]["tasks_total"])


def memory_after_task(results: dict[str, Any]) -> list[int]:
    """Bytes on disk needed to serve tasks ``0..t``, after each task ``t``."""
    return [int(m) for m in results["memory_after_task"]]


def extrapolate(memory: list[float], shared: float, tasks: int = EXTRAPOLATE_TO) -> float:
    """Memory for ``tasks`` tasks: the last figure plus the mean growth per task seen so far, where the first
    task's growth is its memory above ``shared`` (the files stored once are never multiplied)."""
    n = len(memory)
    if n == 0:
        return float(shared)
    growth = (memory[-1] - shared) / n
    return memory[-1] + growth * (tasks - n)
