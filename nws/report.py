"""Reports of runs: the comparison of methods and seeds, with tables and plots.

``write_report(run_dirs, out)`` reads the ``results.json`` of several runs (of any method), groups the runs of
the same method and settings that differ only in their seed (mean and standard deviation over seeds;
:mod:`nws.groups`), and writes ``report.md``, ``summary.json`` and the plots (:mod:`nws.plots`: accuracy per
task, accuracy against bytes per task and against memory, memory against tasks, every group's accuracy matrix),
with the pool usage of every method that reports one (:meth:`nws.methods.Method.pool_usage`). Where every run records
each task's training time (process CPU and wall seconds), ``report.md`` also has a table of them per task and
method. One run's own table is :mod:`nws.tables`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from nws.errors import NWSError
from nws.groups import Group, aggregate, find_runs
from nws.methods import METHODS
from nws.metrics import EXTRAPOLATE_TO, extrapolate
from nws.plots import (_colour, plot_accuracy_matrix, plot_accuracy_per_task, plot_accuracy_vs_memory,
                       plot_accuracy_vs_task_bytes, plot_memory, plot_pool_usage)
from nws.tables import size


class ReportError(NWSError):
    """Runs that cannot be reported together, or a report that cannot be written."""


def _pm(x: tuple[float, float], n: int, scale: float = 100, digits: int = 2, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(scale * x[0])
    return text + (f" ± {scale * x[1]:.{digits}f}" if n > 1 else "")


def comparison_table(groups: list[Group]) -> str:
    """Markdown: methods x tasks (final accuracy, %), average, backward transfer, bytes per task, memory now and at
    100 tasks."""
    names = groups[0].task_names if groups else []
    head = ["method", "runs"] + names + ["average", "BWT", "per task", "memory", f"memory at {EXTRAPOLATE_TO} tasks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = len(g.runs)
        row = [g.label, str(n)] + [_pm(a, n) for a in g.acc_final]
        row += [f"**{_pm(g.average_accuracy, n)}**", _pm(g.backward_transfer, n, sign=True), size(g.task_bytes[0]),
                size(g.memory[0]) + (f" ± {size(g.memory[1])}" if n > 1 else ""),
                size(extrapolate(g.memory_after_task, g.shared))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def time_table(groups: list[Group]) -> str:
    """Markdown: each task's training time by method, process CPU seconds with wall seconds in brackets (means
    over seeds), their mean per task and their total; only the groups whose runs record them."""
    timed = [g for g in groups if g.train_cpu_seconds and g.train_seconds]
    if not timed:
        return ""
    head = ["method", "runs"] + timed[0].task_names + ["mean per task", "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in timed:
        cpu, wall = [c[0] for c in g.train_cpu_seconds], [w[0] for w in g.train_seconds]
        cells = [f"{c:.0f} ({w:.0f})" for c, w in zip(cpu, wall)]
        cells += [f"{np.mean(cpu):.0f} ({np.mean(wall):.0f})", f"{sum(cpu):.0f} ({sum(wall):.0f})"]
        lines.append("| " + " | ".join([g.label, str(len(g.runs))] + cells) + " |")
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Read the runs at ``paths``, write ``report.md``, ``summary.json`` and the plots into ``out``; returns the
    summary (one entry per group of seeds)."""
    runs = find_runs(list(paths))
    groups = aggregate(runs)
    names = {tuple(g.task_names) for g in groups}
    if len(names) > 1:
        raise ReportError("the runs are of different task sequences; report them separately")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the report directory {out} ({err.strerror})") from None
    plots = (plot_accuracy_per_task(groups, out) + plot_accuracy_vs_task_bytes(groups, out)
             + plot_accuracy_vs_memory(groups, out) + plot_memory(groups, out))
    known = [a for g in groups for row in g.accuracy_matrix for a in row if a is not None]
    low = min(90.0, math.floor(100 * min(known, default=1.0) / 10) * 10)
    matrix_stems: set[str] = set()
    for i, g in enumerate(groups):
        stem = f"accuracy_matrix_{_slug(g.label)}"
        stem = stem if stem not in matrix_stems else f"{stem}_{i}"
        matrix_stems.add(stem)
        plots += plot_accuracy_matrix(g, out, stem, low)
    usage, stems = {}, set()
    for i, g in enumerate(groups):
        cls = METHODS.get(g.method)
        found = cls.pool_usage(str(g.runs[0].path)) if cls is not None else None
        if found is not None:
            stem = f"{g.method}_pool_usage" if f"{g.method}_pool_usage" not in stems else f"{g.method}_pool_usage_{i}"
            stems.add(stem)
            usage[g.label] = found
            plots += plot_pool_usage(found, out, stem, _colour(g, i))
    summary = {"groups": [g.summary() for g in groups], "pool_usage": usage}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# Comparison", "",
             "Accuracy (%) of each task's model after the whole sequence, its average, backward transfer (BWT, "
             "points), the bytes stored per task (mean over the tasks) and the memory needed to serve every task"
             + (", mean ± standard deviation over seeds" if any(len(g.runs) > 1 for g in groups) else "")
             + ". The accuracy matrices (accuracy_matrix*.png) show each task's accuracy from storage after every "
             "later task: a column that falls is forgetting.", "", comparison_table(groups)]
    times = time_table(groups)
    if times:
        lines += ["Training time per task: process CPU seconds (wall seconds in brackets), mean over seeds. CPU "
                  "time is the figure to compare on a shared machine; wall time depends on its load.", "", times]
    for g in groups:
        lines.append(f"- **{g.label}**: {len(g.runs)} run(s) (seeds {', '.join(map(str, g.seeds))}): "
                     + ", ".join(str(r.path) for r in g.runs))
    for label, u in usage.items():
        lines.append(f"- **{label}** pools: each task uses "
                     + ", ".join(f"{100 * f:.0f}%" for f in u["task_fraction"])
                     + f" of all pool entries; all tasks together {100 * u['all_tasks_fraction']:.0f}% "
                     "(from its first run).")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots if p.suffix == ".png"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
