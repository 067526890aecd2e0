"""Markdown tables of one run's results (``results.md``, the table ``nws run`` prints); any method."""

from __future__ import annotations

import re
from typing import Any

from nws.metrics import continual_metrics, memory_total, shared_bytes


def kb(n: float) -> str:
    return f"{n / 1024:.1f} KB"


def size(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else kb(n)


def _shared_label(files: dict[str, int]) -> str:
    """The shared files by name (``pools``, ``backbone``, ``network``: a file's stem without its task number),
    each with its size when there are several."""
    stems = [re.sub(r"_[0-9]+$", "", name.split(".")[0]) for name in files]
    if len(files) == 1:
        return stems[0]
    return " + ".join(f"{stem} {kb(n)}" for stem, n in zip(stems, files.values())) + " ="


def markdown_table(results: dict[str, Any]) -> str:
    """Per task: accuracy after training, from storage and after the whole sequence, stored bytes split by
    kind; then averages and totals."""
    tasks, mem = results["tasks"], results["memory"]
    kinds = list(dict.fromkeys(k for t in tasks for k in t["bytes"]))
    names = {"indices": "indices", "batchnorm": "BatchNorm", "other": "other", "weights": "weights",
             "masks": "masks"}
    head = ["#", "task", "classes", "acc. after training", "acc. from storage", "acc. final"]
    head += [names.get(k, k) for k in kinds] + ["task total", "task / float32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(tasks):
        b = t["bytes"]
        total = sum(b.values())
        row = [str(i), t["name"], str(len(t["classes"])), f"{100 * t['acc_after_training']:.2f}%",
               f"{100 * t['acc_from_storage']:.2f}%", f"{100 * t['acc_final']:.2f}%"]
        row += [kb(b.get(k, 0)) for k in kinds]
        row += [kb(total), f"1/{mem['float32_model'] / max(total, 1):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    n = len(tasks)
    metrics = continual_metrics(tasks) if tasks else {"average_accuracy": 0.0, "backward_transfer": 0.0,
                                                      "forgetting": 0.0}
    shared = mem.get("shared_files") or {}
    lines += ["",
              f"Method **{results['method']}**. Average accuracy (after the whole sequence): "
              f"**{100 * results['average_accuracy']:.2f}%** over {n} tasks; backward transfer "
              f"{100 * metrics['backward_transfer']:+.2f} points, forgetting {100 * metrics['forgetting']:.2f}.",
              (f"Memory: {_shared_label(shared)} {kb(shared_bytes(results))} + tasks {kb(mem['tasks_total'])} = "
               f"{kb(memory_total(results))}; " if shared else f"Memory: tasks {kb(mem['tasks_total'])}; ")
              + f"{n} float32 networks would take {kb(n * mem['float32_model'])} ({kb(mem['float32_model'])} each)."]
    reference = mem.get("reference_equivalent")
    if reference:
        lines.append(f"As the reference implementation stores it (int16 + lzma indices, pickled BatchNorm, whole "
                     f"quantiser modules; docs/reference.md): pools {kb(reference['pools'])} + tasks "
                     f"{kb(reference['tasks_total'])} = {kb(reference['total'])}.")
    return "\n".join(lines) + "\n"


def sparsity_table(results: dict[str, Any]) -> str:
    """Markdown lines of each task's kernel sparsity and accuracy (empty when no task recorded sparsity)."""
    tasks = [t for t in results.get("tasks", []) if "sparsity" in t]
    if not tasks:
        return ""
    lines = ["", "| task | kernel sparsity | acc. from storage |", "|---|---|---|"]
    lines += [f"| {t['name']} | {100 * t['sparsity']['total']:.1f}% | {100 * t['acc_from_storage']:.2f}% |"
              for t in tasks]
    mean = sum(t["sparsity"]["total"] for t in tasks) / len(tasks)
    lines += ["", f"Mean kernel sparsity (weights searched to a pool's zero entry): **{100 * mean:.1f}%**."]
    return "\n".join(lines) + "\n"


MATRIX_TASKS = 12  # results.md shows the accuracy matrix up to this many tasks (the report's heat map: any number)


def matrix_table(results: dict[str, Any]) -> str:
    """Markdown lines of the accuracy matrix (row: after learning task j; column: task i; %, from storage);
    empty for more than :data:`MATRIX_TASKS` tasks."""
    matrix = results.get("accuracy_matrix") or []
    if not matrix or len(matrix) > MATRIX_TASKS:
        return ""
    n = len(matrix)
    lines = ["", "Accuracy matrix (%): on task i (columns), rebuilt from storage right after learning task j (rows); "
             "a column that falls is forgetting.", "",
             "| after task | " + " | ".join(map(str, range(n))) + " |", "|" + "---|" * (n + 1)]
    for j, row in enumerate(matrix):
        cells = ["" if a is None else f"{100 * a:.1f}" for a in row]
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_markdown(results: dict[str, Any]) -> str:
    """A run's ``results.md``: its table, the accuracy matrix and, for sparse runs, the sparsity table."""
    return markdown_table(results) + matrix_table(results) + sparsity_table(results)
