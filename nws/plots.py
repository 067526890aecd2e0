"""The report's plots (matplotlib without a display, PNG and SVG): accuracy per task by method (bars from 0, the
chance level drawn), memory against the number of tasks (as measured, and extrapolated to 100 tasks, dashed),
accuracy against bytes per task (runs of one method that differ only in the settings of
:data:`nws.groups.CURVE_SETTINGS` drawn as a curve) and against total memory, each run's accuracy matrix as a
heat map, and a method's pool usage per layer and task (:meth:`nws.methods.Method.pool_usage`).

Byte axes read in B, KB or MB; they are logarithmic only where the values span a factor of 10 or more.
Labels that could collide go into legends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nws.groups import Group, curves
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


def _unit(largest: float) -> tuple[float, str]:
    """The divisor and name of the unit that shows ``largest`` bytes as a number below 1024."""
    for divisor, name in ((2**30, "GB"), (2**20, "MB"), (2**10, "KB")):
        if largest >= divisor:
            return float(divisor), name
    return 1.0, "B"


def _short_size(n: float) -> str:
    divisor, name = _unit(n)
    value = n / divisor
    return f"{value:.3g} {name}" if value < 100 else f"{value:.0f} {name}"


def _byte_ticks(low: float, high: float, log: bool) -> list[float]:
    """Tick positions in bytes between ``low`` and ``high`` at round numbers of B, KB, MB, GB (1, 2, 5 x 10^k of
    the unit on a log axis, thinned to at most 6; about 6 evenly spaced ones on a linear axis)."""
    if not log:
        divisor, _ = _unit(high)
        step = _round_step((high - max(low, 0)) / divisor / 5) * divisor
        first = math.floor(max(low, 0) / step) * step
        return [first + k * step for k in range(int((high - first) / step) + 2)]
    ticks = sorted((m * 10**e * 1024**u, m) for u in range(4) for e in range(3) for m in (1, 2, 5))
    for keep in ((1, 2, 5), (1, 5), (1,)):
        chosen = [t for t, m in ticks if low <= t <= high and m in keep]
        if len(chosen) <= 6:
            break
    return chosen


def _round_step(raw: float) -> float:
    """The round step (1, 2 or 5 x 10^k) at or above ``raw``."""
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _bytes_axis(ax, axis: str, low: float, high: float, pad: float = 1.4) -> None:
    """A byte axis showing ``low`` to ``high``: logarithmic where they span a factor of 10 (limits a factor
    ``pad`` beyond them), else linear from 0; ticks at round numbers of a unit (``4 KB``, ``1 MB``)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    log = high / max(low, 1e-9) >= 10
    target = ax.xaxis if axis == "x" else ax.yaxis
    limits = (low / pad, high * pad) if log else (0.0, high * 1.08)
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target.set_minor_locator(NullLocator())
        target.set_minor_formatter(NullFormatter())
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*limits)
    target.set_major_locator(FixedLocator([t for t in _byte_ticks(*limits, log) if limits[0] <= t <= limits[1]]))
    target.set_major_formatter(FuncFormatter(lambda v, _: _short_size(v) if v > 0 else "0"))


def plot_accuracy_per_task(groups: list[Group], out: Path) -> list[Path]:
    """Grouped bars from 0: each task's final accuracy by method (error bars: standard deviation over seeds),
    the chance level of each task (1 / its classes) as a dashed line."""
    n = len(groups[0].task_names)
    fig = _figure(max(7.0, 1.2 * n + 2.5))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(n + 1)
    for i, g in enumerate(groups):
        means = [100 * a[0] for a in g.acc_final] + [100 * g.average_accuracy[0]]
        stds = [100 * a[1] for a in g.acc_final] + [100 * g.average_accuracy[1]]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=stds if len(g.runs) > 1 else None,
               label=g.label, color=_colour(g, i), capsize=2)
    chance = [100 * c for c in groups[0].chance] + [100 * float(np.mean(groups[0].chance))]
    ax.hlines(chance, x - 0.45, x + 0.45, colors="k", linestyles="--", linewidth=1.2, label="chance", zorder=3)
    ax.set_xticks(x, groups[0].task_names + ["average"], rotation=20 if n > 4 else 0, ha="right" if n > 4 else "center")
    highs = [100 * (a[0] + a[1]) for g in groups for a in g.acc_final]
    ax.set_ylim(0, max(100.5, max(highs) + 0.5))
    ax.set_ylabel("accuracy after the whole sequence (%)")
    ax.set_title("Accuracy per task by method")
    fig.legend(loc="outside right upper", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "accuracy_per_task")


def plot_memory(groups: list[Group], out: Path) -> list[Path]:
    """Memory to serve every task after each task: as measured (left, linear axes over the measured tasks), and
    continued to 100 tasks by the mean growth per task (right, dashed; the legend gives the value at 100; a
    logarithmic memory axis where the values span a factor of 10)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0, 4.3)
    measured, ahead = fig.subplots(1, 2, width_ratios=[1, 1.15])
    n = max(len(g.memory_after_task) for g in groups)
    ends = [extrapolate(g.memory_after_task, g.shared) for g in groups]
    divisor, unit = _unit(max(max(g.memory_after_task) for g in groups))
    for i, (g, at) in enumerate(zip(groups, ends)):
        mem = np.asarray(g.memory_after_task, dtype=float)
        tasks = np.arange(1, len(mem) + 1)
        colour, marker = _colour(g, i), _marker(g)
        measured.plot(tasks, mem / divisor, "-", color=colour, marker=marker if len(mem) <= 20 else None,
                      markersize=6 - 0.6 * i, markerfacecolor="none" if i % 2 else colour, label=g.label)
        ahead.plot(tasks, mem, "-", color=colour, label=f"{g.label}: {size(at)} at {EXTRAPOLATE_TO}")
        ahead.plot([len(mem), EXTRAPOLATE_TO], [mem[-1], at], "--", color=colour, alpha=0.8)
        ahead.plot([EXTRAPOLATE_TO], [at], marker=marker, color=colour, markersize=5)
    measured.set_ylim(bottom=0)
    measured.set_xlim(0.7, n + 0.3)
    measured.xaxis.set_major_locator(MaxNLocator(min(n, 10), integer=True))
    measured.set_xlabel("number of tasks learned")
    measured.set_ylabel(f"memory to serve every task ({unit})")
    measured.set_title("As measured")
    _bytes_axis(ahead, "y", min(min(g.memory_after_task) for g in groups), max(ends), pad=1.3)
    ahead.set_xlim(0, EXTRAPOLATE_TO + 3)
    ahead.set_xlabel(f"number of tasks (dashed: extrapolated to {EXTRAPOLATE_TO})")
    ahead.set_ylabel("memory to serve every task")
    ahead.set_title(f"Extrapolated to {EXTRAPOLATE_TO} tasks")
    for ax in (measured, ahead):
        ax.grid(alpha=0.3)
    fig.legend(*ahead.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle("Memory against the number of tasks")
    return _save(fig, out, "memory_vs_tasks")


SETTING_NAMES = {"model.rate": "λ", "task.lr": "task lr"}


def _accuracy_against(groups: list[Group], out: Path, stem: str, value, xlabel: str, title: str,
                      draw_curves: bool) -> list[Path]:
    """Average final accuracy against ``value(group)`` bytes (mean, std over seeds), one marker per group; with
    ``draw_curves``, the groups of a curve (:func:`nws.groups.curves`) joined (solid: ``model.rate``, dotted:
    ``task.lr``), each point labelled with its value and the curve named once in the legend."""
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    colours = {id(g): _colour(g, i) for i, g in enumerate(groups)}
    notes: dict[int, list[str]] = {}  # per group on a curve: its values of the curves' settings
    styles = {"model.rate": "-", "task.lr": ":"}
    for key, members in curves(groups) if draw_curves else []:
        name = SETTING_NAMES.get(key, key)
        for g in members:
            colours[id(g)] = colours[id(members[0])]
            notes.setdefault(id(g), []).append(f"{name} {g.runs[0].setting(key)}")
        ax.plot([value(g)[0] for g in members], [100 * g.average_accuracy[0] for g in members],
                styles.get(key, "--"), marker=_marker(members[0]), color=colours[id(members[0])],
                label=f"{members[0].method}, {name} varied", zorder=1)
    for g in groups:
        many = len(g.runs) > 1
        x, dx = value(g)
        y = 100 * g.average_accuracy[0]
        ax.errorbar([x], [y], xerr=[dx] if many else None, yerr=[100 * g.average_accuracy[1]] if many else None,
                    fmt=_marker(g), color=colours[id(g)], label=None if id(g) in notes else g.label, capsize=3,
                    markersize=7, zorder=2)
        if id(g) in notes:
            ax.annotate(", ".join(dict.fromkeys(notes[id(g)])), (x, y), xytext=(6, -11), textcoords="offset points",
                        fontsize="x-small", color=colours[id(g)])
    xs = [value(g)[0] for g in groups]
    _bytes_axis(ax, "x", min(max(x, 1.0) for x in xs), max(xs), pad=1.6)
    ax.margins(y=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy after the whole sequence (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, out, stem)


def plot_accuracy_vs_memory(groups: list[Group], out: Path) -> list[Path]:
    """Average final accuracy against the total memory to serve every task (error bars over seeds)."""
    return _accuracy_against(groups, out, "accuracy_vs_memory", lambda g: g.memory,
                             "total memory to serve every task", "Accuracy against memory", draw_curves=False)


def plot_accuracy_vs_task_bytes(groups: list[Group], out: Path) -> list[Path]:
    """Average final accuracy against the mean bytes stored per task (NWS's trade-off: runs that differ only in
    ``model.rate`` or ``task.lr`` as a curve)."""
    return _accuracy_against(groups, out, "accuracy_vs_task_bytes", lambda g: g.task_bytes,
                             "bytes stored per task (mean over the tasks)", "Accuracy against bytes per task",
                             draw_curves=True)


def plot_accuracy_matrix(g: Group, out: Path, stem: str, low: float) -> list[Path]:
    """Heat map of ``g``'s accuracy matrix (row: after learning task j; column: task i, from storage); values in
    the cells up to 12 tasks; colours from ``low`` (%) to 100."""
    matrix = np.array([[np.nan if a is None else 100 * a for a in row] for row in g.accuracy_matrix], dtype=float)
    n = len(matrix)
    side = min(max(4.5, 0.55 * n + 2.5), 14.0)
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=low, vmax=100)
    if n <= 12:
        for (j, i), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(i, j, f"{v:.1f}" if v < 99.95 else "100", ha="center", va="center", fontsize=7,
                        color="white" if v < low + 0.6 * (100 - low) else "black")
    step = max(1, n // 12)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(i) for i in ticks])
    ax.set_yticks(ticks, [f"{j}: {g.task_names[j]}" if n <= 12 else str(j) for j in ticks], fontsize="small")
    ax.set_xlabel("task evaluated (from storage)")
    ax.set_ylabel("after learning task")
    seeds = f", mean of {len(g.runs)} seeds" if len(g.runs) > 1 else ""
    ax.set_title(f"{g.label}: accuracy matrix (%{seeds})", fontsize="medium")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    return _save(fig, out, stem)


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
