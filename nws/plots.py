"""The report's plots (matplotlib without a display, PNG and SVG): accuracy per task by method, memory against
the number of tasks (extrapolated to 100 tasks), accuracy against memory, and a method's pool usage per layer
and task (:meth:`nws.methods.Method.pool_usage`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nws.groups import Group
from nws.methods import METHODS
from nws.metrics import EXTRAPOLATE_TO, extrapolate
from nws.tables import size


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"Date": None})
    return paths


def _colour(g: Group, i: int) -> str:
    """The method's own colour (:attr:`nws.methods.Method.colour`), else the ``i``-th of matplotlib's cycle."""
    cls = METHODS.get(g.method)
    return (cls.colour if cls is not None else None) or f"C{i % 10}"


def _marker(g: Group) -> str:
    cls = METHODS.get(g.method)
    return cls.marker if cls is not None else "o"


def plot_accuracy_per_task(groups: list[Group], out: Path) -> list[Path]:
    """Grouped bars: each task's final accuracy by method (error bars: standard deviation over seeds)."""
    fig = _figure(max(7.0, 1.2 * len(groups[0].task_names) + 2.5))
    ax = fig.subplots()
    n = len(groups[0].task_names)
    width = 0.8 / len(groups)
    x = np.arange(n + 1)
    for i, g in enumerate(groups):
        means = [100 * a[0] for a in g.acc_final] + [100 * g.average_accuracy[0]]
        stds = [100 * a[1] for a in g.acc_final] + [100 * g.average_accuracy[1]]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=stds if len(g.runs) > 1 else None,
               label=g.label, color=_colour(g, i), capsize=2)
    ax.set_xticks(x, groups[0].task_names + ["average"], rotation=20, ha="right")
    lows = [100 * a[0] for g in groups for a in g.acc_final]
    highs = [100 * (a[0] + a[1]) for g in groups for a in g.acc_final]
    ax.set_ylim(max(0.0, math.floor(min(lows) / 10) * 10 - 10), max(100.5, max(highs) + 0.5))
    ax.set_ylabel("accuracy after the whole sequence (%)")
    ax.set_title("Accuracy per task by method")
    fig.legend(loc="outside right upper", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "accuracy_per_task")


def _spread(values: list[float], factor: float) -> list[float]:
    """Label positions (log scale) at ``values``, moved up so that neighbours differ by ``factor`` at least."""
    order = np.argsort(values, kind="stable")
    out = list(values)
    for prev, cur in zip(order, order[1:]):
        out[cur] = max(out[cur], out[prev] * factor)
    return out


def plot_memory(groups: list[Group], out: Path) -> list[Path]:
    """Memory on disk after each task, continued as a line to 100 tasks (dashed) with the value marked."""
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    ends = []
    for i, g in enumerate(groups):
        n = len(g.memory_after_task)
        mem = np.asarray(g.memory_after_task) / 2**20
        colour, marker = _colour(g, i), _marker(g)
        ax.plot(np.arange(1, n + 1), mem, "-", marker=marker, color=colour, label=g.label, markersize=7 - i,
                markerfacecolor="none" if i % 2 else colour)
        at = extrapolate(list(mem), g.shared / 2**20)
        ax.plot([n, EXTRAPOLATE_TO], [mem[-1], at], "--", color=colour, alpha=0.7)
        ax.plot([EXTRAPOLATE_TO], [at], marker=marker, color=colour, markersize=6)
        ends.append(at)
    for i, (g, at, y) in enumerate(zip(groups, ends, _spread(ends, factor=1.35))):
        ax.annotate(f"{g.label}: {size(at * 2**20)}", (EXTRAPOLATE_TO, at), xytext=(EXTRAPOLATE_TO * 1.12, y),
                    va="center", fontsize="x-small", color=_colour(g, i))
    ax.axvline(EXTRAPOLATE_TO, color="k", alpha=0.3, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.9, EXTRAPOLATE_TO * 6)
    ax.set_xlabel("number of tasks (dashed: extrapolated to 100)")
    ax.set_ylabel("memory to serve every task (MB)")
    ax.set_title("Memory against the number of tasks")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "memory_vs_tasks")


def plot_accuracy_vs_memory(groups: list[Group], out: Path) -> list[Path]:
    """Average final accuracy against total memory, one point per method (error bars over seeds)."""
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    accs = [100 * g.average_accuracy[0] for g in groups]
    xs = [max(g.memory[0], 1) / 2**20 for g in groups]
    gap = 0.05 * (max(accs) - min(accs) or 1.0)
    labels: dict[int, float] = {}
    for i in np.argsort(accs, kind="stable"):  # move a label up past those of nearby points below it
        near = [labels[j] for j in labels if max(xs[i] / xs[j], xs[j] / xs[i]) < 1.6]
        labels[i] = max([accs[i]] + [y + gap for y in near])
    for i, g in enumerate(groups):
        many = len(g.runs) > 1
        x, y = xs[i], labels[i]
        ax.errorbar([x], [100 * g.average_accuracy[0]], xerr=[g.memory[1] / 2**20] if many else None,
                    yerr=[100 * g.average_accuracy[1]] if many else None, fmt=_marker(g),
                    color=_colour(g, i), label=g.label, capsize=3, markersize=7)
        ax.annotate(g.label, (x, 100 * g.average_accuracy[0]), xytext=(x * 1.12, y), va="center",
                    fontsize="small")
    ax.set_xscale("log")
    low = min(max(g.memory[0] - g.memory[1], 1) for g in groups) / 2**20
    ax.set_xlim(low / 1.6, max(g.memory[0] + g.memory[1] for g in groups) / 2**20 * 2.5)  # a factor 4 at least
    ax.margins(y=0.1)
    ax.set_xlabel("total memory (MB, log scale)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Accuracy against memory")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "accuracy_vs_memory")


def plot_pool_usage(usage: dict[str, Any], out: Path, stem: str, colour: str = "C0") -> list[Path]:
    """Heatmap of pool utilisation per layer and task, and the fraction of all pool entries each task uses."""
    util = np.asarray(usage["utilisation"])
    n_layers, n_tasks = util.shape
    fig = _figure(max(8.0, 0.9 * n_tasks + 6), max(3.5, 0.35 * n_layers + 1.8))
    left, right = fig.subplots(1, 2, width_ratios=[max(n_tasks, 2), 2.2])
    image = left.imshow(100 * util, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    for (i, j), v in np.ndenumerate(util):
        left.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if v < 0.6 else "black")
    left.set_xticks(range(n_tasks), usage["tasks"], rotation=30, ha="right", fontsize="small")
    left.set_yticks(range(n_layers), [f"{n}\n(K={k}, {c} kernels)" for n, k, c in
                                      zip(usage["layers"], usage["pool_sizes"], usage["kernels"])], fontsize="small")
    left.set_title("pool utilisation per layer and task (%)")
    fig.colorbar(image, ax=left, label="entries used / pool size (%)")
    fractions = 100 * np.asarray(usage["task_fraction"])
    right.bar(range(n_tasks), fractions, color=colour)
    right.axhline(100 * usage["all_tasks_fraction"], color="k", linestyle="--", linewidth=1,
                  label=f"all tasks together: {100 * usage['all_tasks_fraction']:.0f}%")
    right.set_xticks(range(n_tasks), [str(i) for i in range(n_tasks)])
    right.set_xlabel("task")
    right.set_ylabel("entries used / all pool entries (%)")
    right.set_ylim(0, 100)
    right.set_title("fraction of the pools used")
    right.legend(fontsize="x-small", loc="upper right")
    return _save(fig, out, stem)
