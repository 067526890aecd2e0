"""Tables of a run's results: per-task accuracy and memory, as markdown."""

from __future__ import annotations

from typing import Any


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB"


def markdown_table(results: dict[str, Any]) -> str:
    """Per task: accuracy after training and from storage, stored bytes split by kind; then totals."""
    mem = results["memory"]
    lines = ["| # | task | classes | acc. after training | acc. from storage | indices | BatchNorm | other |"
             " indices / float32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(results["tasks"]):
        b = t["bytes"]
        lines.append(f"| {i} | {t['name']} | {len(t['classes'])} | {100 * t['acc_after_training']:.2f}% | "
                     f"{100 * t['acc_from_storage']:.2f}% | {_kb(b['indices'])} | {_kb(b['batchnorm'])} | "
                     f"{_kb(b['other'])} | 1/{mem['float32_model'] / max(b['indices'], 1):.0f} |")
    n = len(results["tasks"])
    total = mem["pools"] + mem["tasks_total"]
    lines += ["",
              f"Average accuracy (from storage): **{100 * results['average_accuracy']:.2f}%** over {n} tasks.",
              f"Memory: pools {_kb(mem['pools'])} + tasks {_kb(mem['tasks_total'])} = {_kb(total)}; "
              f"{n} float32 networks would take {_kb(n * mem['float32_model'])} "
              f"({_kb(mem['float32_model'])} each)."]
    return "\n".join(lines) + "\n"
