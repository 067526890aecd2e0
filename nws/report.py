"""Reports of runs: a run's table, continual-learning metrics, and the comparison of methods with plots.

``markdown_table(results)`` is one run's per-task table. ``write_report(run_dirs, out)`` reads the
``results.json`` of several runs (of any method), groups the runs of the same method and settings that
differ only in their seed (mean and standard deviation over seeds), and writes ``report.md``,
``summary.json`` and plots (PNG and SVG, matplotlib without a display): accuracy per task by method,
memory against the number of tasks (extrapolated to 100 tasks), accuracy against memory, and for NWS runs
the use of the pools per layer and task. Where every run records each task's training time (process CPU and
wall seconds), ``report.md`` also has a table of them per task and method.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nws.config import RunConfig
from nws.errors import NWSError, StoreError
from nws.metrics import (EXTRAPOLATE_TO, continual_metrics, extrapolate, memory_after_task, memory_total,
                         shared_bytes)
from nws.store import RunStore, TaskStore

COLOURS = {"nws": "#d62728", "individual": "#7f7f7f", "finetune": "#1f77b4", "packnet": "#2ca02c",
           "piggyback": "#9467bd"}
MARKERS = {"nws": "o", "piggyback": "s", "packnet": "^", "finetune": "v", "individual": "D"}
ORDER = ("nws", "piggyback", "packnet", "finetune", "individual")


class ReportError(NWSError):
    """Runs that cannot be reported (missing or malformed results)."""


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB"


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else _kb(n)


# ----------------------------------------------------------------------------------- one run


def markdown_table(results: dict[str, Any]) -> str:
    """Per task: accuracy after training, from storage and after the whole sequence, stored bytes split by
    kind; then averages and totals."""
    tasks, mem = results["tasks"], results["memory"]
    kinds = list(dict.fromkeys(k for t in tasks for k in t["bytes"]))
    names = {"indices": "indices", "batchnorm": "BatchNorm", "other": "other", "weights": "weights",
             "masks": "masks"}
    final = any("acc_final" in t for t in tasks)
    head = ["#", "task", "classes", "acc. after training", "acc. from storage"] + (["acc. final"] if final else [])
    head += [names.get(k, k) for k in kinds] + ["task total", "task / float32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(tasks):
        b = t["bytes"]
        size = sum(b.values())
        row = [str(i), t["name"], str(len(t["classes"])), f"{100 * t['acc_after_training']:.2f}%",
               f"{100 * t['acc_from_storage']:.2f}%"]
        row += [f"{100 * t['acc_final']:.2f}%"] if final else []
        row += [_kb(b.get(k, 0)) for k in kinds]
        row += [_kb(size), f"1/{mem['float32_model'] / max(size, 1):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    n = len(tasks)
    metrics = continual_metrics(tasks) if tasks else {"average_accuracy": 0.0, "backward_transfer": 0.0,
                                                      "forgetting": 0.0}
    method = results.get("method", "nws")
    shared = {"nws": "pools", "piggyback": "backbone"}.get(method, "shared network")
    if method == "nws" and len(mem.get("shared_files") or {}) > 1:  # the pools and the tasks' reference
        shared = " + ".join(f"{name.split('.')[0]} {_kb(size)}" for name, size in mem["shared_files"].items()) + " ="
    lines += ["",
              f"Method **{method}**. Average accuracy (after the whole sequence): "
              f"**{100 * results['average_accuracy']:.2f}%** over {n} tasks; backward transfer "
              f"{100 * metrics['backward_transfer']:+.2f} points, forgetting {100 * metrics['forgetting']:.2f}.",
              (f"Memory: {shared} {_kb(shared_bytes(results))} + tasks {_kb(mem['tasks_total'])} = "
               f"{_kb(memory_total(results))}; " if shared_bytes(results) or method != "individual" else
               f"Memory: tasks {_kb(mem['tasks_total'])}; ")
              + f"{n} float32 networks would take {_kb(n * mem['float32_model'])} ({_kb(mem['float32_model'])} each)."]
    reference = mem.get("reference_equivalent")
    if reference:
        lines.append(f"As the reference implementation stores it (int16 + lzma indices, pickled BatchNorm, whole "
                     f"quantiser modules; docs/reference.md): pools {_kb(reference['pools'])} + tasks "
                     f"{_kb(reference['tasks_total'])} = {_kb(reference['total'])}.")
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


def run_markdown(results: dict[str, Any]) -> str:
    """A run's ``results.md``: its table and, for sparse runs, the sparsity table."""
    return markdown_table(results) + sparsity_table(results)


# ----------------------------------------------------------------------------------- runs and groups


@dataclass
class Run:
    """One run directory's results."""

    path: Path
    results: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.results.get("method", "nws"))

    @property
    def seed(self) -> Any:
        return self.results.get("seed", (self.results.get("config") or {}).get("seed"))

    def settings(self) -> str:
        """The run's configuration without seed and output directory: runs that share it are one experiment.
        A setting the run's config lacks (added to nws after the run was made) counts at its default."""
        config = _filled(self.results.get("config") or {}, dataclasses.asdict(RunConfig()))
        config.pop("seed", None)
        config.pop("out", None)
        return json.dumps({"method": self.method, **config}, sort_keys=True)


def _filled(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every key it lacks taken from ``defaults``, section by section."""
    out = dict(config)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and default and isinstance(out[key], dict):
            out[key] = _filled(out[key], default)
    return out


def _check_results(results: Any, what: str) -> dict[str, Any]:
    try:
        tasks = results["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise ValueError("no tasks")
        for t in tasks:
            str(t["name"]), float(t["acc_after_training"]), float(t["acc_from_storage"])
            if not isinstance(t["bytes"], dict):
                raise ValueError("bad bytes")
            sum(int(v) for v in t["bytes"].values())
        int(results["memory"]["tasks_total"]), int(results["memory"]["float32_model"])
        float(results["average_accuracy"])
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{what} is not a results file of nws ({type(err).__name__}: {err})") from None
    return results


def load_run(path: str | Path) -> Run:
    """A run directory's ``results.json`` (with its config from the manifest where the results lack it)."""
    path = Path(path)
    file = path / "results.json"
    if not file.is_file():
        raise ReportError(f"{path} has no results.json (not a finished run)")
    try:
        results = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ReportError(f"{file} is corrupt ({err})") from None
    results = _check_results(results, str(file))
    if not isinstance(results.get("config"), dict):  # results written before they carried the config
        try:
            results["config"] = RunStore(path).manifest.get("config")
        except StoreError as err:
            raise ReportError(f"{file} lacks the run's config and the manifest cannot be read ({err})") from None
        if not isinstance(results["config"], dict):
            raise ReportError(f"{path}: neither results.json nor the manifest records the run's config")
    return Run(path, results)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs at ``paths``; a directory without ``results.json`` stands for the runs directly inside it."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"run directory {p} does not exist")
        if (p / "results.json").is_file():
            runs.append(load_run(p))
            continue
        inner = sorted(d for d in p.iterdir() if (d / "results.json").is_file())
        if not inner:
            raise ReportError(f"{p} has no results.json, nor runs inside it")
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
                "train_seconds": [ms(x) for x in self.train_seconds]}


def _task_times(members: list[Run], key: str, n: int) -> list[tuple[float, float]]:
    """Mean and standard deviation over the runs of each task's ``key`` (seconds); empty when a run lacks it
    (runs written before nws recorded training times)."""
    if not all(key in t for r in members for t in r.results["tasks"]):
        return []
    return [_mean_std([float(r.results["tasks"][i][key]) for r in members]) for i in range(n)]


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
            raise ReportError(f"runs of {label} have different numbers of tasks ({sorted(counts)})")
        n = counts.pop()
        metrics = [continual_metrics(r.results["tasks"]) for r in members]
        after = [memory_after_task(r.results) for r in members]
        groups.append(Group(
            label=label, method=method, runs=members,
            task_names=[t["name"] for t in members[0].results["tasks"]],
            acc_final=[_mean_std([r.results["tasks"][i].get("acc_final", r.results["tasks"][i]["acc_from_storage"])
                                  for r in members]) for i in range(n)],
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
            train_seconds=_task_times(members, "train_seconds", n)))
    rank = {m: i for i, m in enumerate(ORDER)}
    groups.sort(key=lambda g: (rank.get(g.method, len(ORDER)), g.label))
    return groups


def _pm(x: tuple[float, float], n: int, scale: float = 100, digits: int = 2, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(scale * x[0])
    return text + (f" ± {scale * x[1]:.{digits}f}" if n > 1 else "")


def comparison_table(groups: list[Group]) -> str:
    """Markdown: methods x tasks (final accuracy, %), average, backward transfer, memory now and at 100 tasks."""
    names = groups[0].task_names if groups else []
    head = ["method", "runs"] + names + ["average", "BWT", "memory", f"memory at {EXTRAPOLATE_TO} tasks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = len(g.runs)
        row = [g.label, str(n)] + [_pm(a, n) for a in g.acc_final]
        row += [f"**{_pm(g.average_accuracy, n)}**", _pm(g.backward_transfer, n, sign=True),
                _size(g.memory[0]) + (f" ± {_size(g.memory[1])}" if n > 1 else ""),
                _size(extrapolate(g.memory_after_task, g.shared))]
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


# ----------------------------------------------------------------------------------- pool usage (NWS)


def pool_usage(path: str | Path) -> dict[str, Any]:
    """Per layer and task of an NWS run: the pool utilisation (distinct indices used / pool size), read from
    the task files; per task the fraction of all pool entries (over every layer) it uses, and the same for
    all tasks together; per layer its number of grouped kernels (the most entries a task can use)."""
    store = TaskStore(path)
    books, _ = store.pools()
    layers = list(books)
    sizes = np.array([books[name].shape[0] for name in layers], dtype=np.float64)
    used: list[list[set[int]]] = []
    tasks, kernels = [], [0] * len(layers)
    for t in store.tasks():
        codes = store.codes(t["index"])
        used.append([set(np.unique(codes[name].numpy()).tolist()) for name in layers])
        kernels = [max(k, len(codes[name])) for k, name in zip(kernels, layers)]
        tasks.append(t["name"])
    counts = np.array([[len(u) for u in per_task] for per_task in used], dtype=np.float64).T  # layers x tasks
    union = [len(set().union(*(per_task[i] for per_task in used))) for i in range(len(layers))] if used else []
    return {"layers": layers, "tasks": tasks, "pool_sizes": sizes.astype(int).tolist(), "kernels": kernels,
            "utilisation": (counts / sizes[:, None]).tolist() if used else [],
            "task_fraction": (counts.sum(0) / sizes.sum()).tolist() if used else [],
            "all_tasks_fraction": float(sum(union) / sizes.sum()) if used else 0.0,
            "layer_union": [u / s for u, s in zip(union, sizes)]}


# ----------------------------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"Date": None})
    return paths


def _colour(g: Group, i: int) -> str:
    return COLOURS.get(g.method, f"C{i % 10}")


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
        colour, marker = _colour(g, i), MARKERS.get(g.method, "o")
        ax.plot(np.arange(1, n + 1), mem, "-", marker=marker, color=colour, label=g.label, markersize=7 - i,
                markerfacecolor="none" if i % 2 else colour)
        at = extrapolate(list(mem), g.shared / 2**20)
        ax.plot([n, EXTRAPOLATE_TO], [mem[-1], at], "--", color=colour, alpha=0.7)
        ax.plot([EXTRAPOLATE_TO], [at], marker=marker, color=colour, markersize=6)
        ends.append(at)
    for i, (g, at, y) in enumerate(zip(groups, ends, _spread(ends, factor=1.35))):
        ax.annotate(f"{g.label}: {_size(at * 2**20)}", (EXTRAPOLATE_TO, at), xytext=(EXTRAPOLATE_TO * 1.12, y),
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
                    yerr=[100 * g.average_accuracy[1]] if many else None, fmt=MARKERS.get(g.method, "o"),
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


def plot_pool_usage(usage: dict[str, Any], out: Path, stem: str = "nws_pool_usage") -> list[Path]:
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
    right.bar(range(n_tasks), fractions, color=COLOURS["nws"])
    right.axhline(100 * usage["all_tasks_fraction"], color="k", linestyle="--", linewidth=1,
                  label=f"all tasks together: {100 * usage['all_tasks_fraction']:.0f}%")
    right.set_xticks(range(n_tasks), [str(i) for i in range(n_tasks)])
    right.set_xlabel("task")
    right.set_ylabel("entries used / all pool entries (%)")
    right.set_ylim(0, 100)
    right.set_title("fraction of the pools used")
    right.legend(fontsize="x-small", loc="upper right")
    return _save(fig, out, stem)


# ----------------------------------------------------------------------------------- the report


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
    plots = plot_accuracy_per_task(groups, out) + plot_memory(groups, out) + plot_accuracy_vs_memory(groups, out)
    usage = {}
    for g in groups:
        if g.method == "nws":
            stem = "nws_pool_usage" if g.label == "nws" else f"nws_pool_usage_{len(usage)}"
            usage[g.label] = pool_usage(g.runs[0].path)
            plots += plot_pool_usage(usage[g.label], out, stem)
    summary = {"groups": [g.summary() for g in groups], "pool_usage": usage}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# Comparison", "",
             "Accuracy (%) of each task's model after the whole sequence, its average, backward transfer (BWT, "
             "points) and the memory needed to serve every task" + (", mean ± standard deviation over seeds" if
                                                                     any(len(g.runs) > 1 for g in groups) else "")
             + ".", "", comparison_table(groups)]
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
