"""A long real sequence: every pair of Fashion-MNIST's ten classes as a task (45 tasks, ``fashion_mnist_pairs``,
order drawn from the seed), for NWS, Piggyback and PackNet with the values Split-Fashion-MNIST's tuning chose.

Memory is measured after every task (the run's files, ``memory_after_task`` in results.json), not
extrapolated; accuracy is each task's, rebuilt from storage after the whole sequence. PackNet prunes 75% of
its free weights after each task, so its free weights shrink by a quarter per task: it runs all 45 tasks and
the report says where they ran out (a layer with no free weight left: later tasks train only their BatchNorm
and classifier) and what that did to accuracy. The baselines share one plain network trained on the source
task; NWS pretrains its pools as ``nws run`` does.

    python benchmarks/fashion_pairs.py --tuned /work/results/convnet --out /work/results/pairs \\
        --data.root /usr/share/datasets/fashion-mnist [--methods nws piggyback packnet] [--seed 1993]

``--tuned`` is the output directory of ``benchmarks/split_fashion_mnist.py`` (its ``tune/<method>.json``
give each method's values). Every run resumes where it stopped when the command is run again. Writes
``report/`` (``nws report`` of the runs) and ``pairs.md`` (the figures of docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import split_fashion_mnist as driver  # noqa: E402

from nws.config_parser import parse_run_config  # noqa: E402
from nws.data import benchmark_from_config  # noqa: E402
from nws.methods.packnet import PackNetStore  # noqa: E402
from nws.report import write_report  # noqa: E402
from nws.results import RESULTS  # noqa: E402

METHODS = ("nws", "piggyback", "packnet")


def run_method(config, method: str, out: Path, tuned: Path) -> Path:
    """``method`` with its tuned values on the 45 tasks, one seed; the baselines from a shared plain source."""
    chosen = json.loads(driver.tune_file(tuned, method).read_text())["chosen"]
    run_dir = out / method
    cfg = driver.with_values(config, chosen, method=method, out=str(run_dir))
    bench = benchmark_from_config(cfg.data, cfg.seed)
    options = {} if method == "nws" else {
        "shared_source": driver.plain_source(driver.source_run(cfg, bench, out, "plain"), bench)}
    results, wall, cpu = driver.run_once(cfg, bench, **options)
    if wall:
        print(f"[{method}] {len(results['tasks'])} tasks: average {100 * results['average_accuracy']:.2f}% "
              f"({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    return run_dir


def packnet_capacity(run_dir: Path) -> list[dict[str, float]]:
    """After each task: the fraction of PackNet's prunable weights still free, the least free fraction of any
    layer, and the fraction the task itself got."""
    store = PackNetStore(run_dir)
    _, shapes = store.network_layers()
    owner = {name: np.full(shape, -1, np.int64) for name, shape in shapes.items()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    rows = []
    for t in store.tasks():
        for name, mask in store.owned(t["index"], shapes).items():
            owner[name][mask.numpy()] = t["index"]
        free = {name: float((o == -1).mean()) for name, o in owner.items()}
        mine = sum(int((o == t["index"]).sum()) for o in owner.values())
        rows.append({"free": sum(float((o == -1).sum()) for o in owner.values()) / total,
                     "least_free": min(free.values()), "own": mine / total})
    return rows


def figures(out: Path, runs: dict[str, Path]) -> str:
    """The markdown of the 45-task figures: memory and accuracy per method, memory after tasks 1, 5, 15, 45,
    and PackNet's capacity."""
    lines = ["| method | tasks | average accuracy | lowest task | memory after 1 / 5 / 15 / 45 tasks | bytes per task (mean) |",
             "|---|---|---|---|---|---|"]
    kb = lambda b: f"{b / 1024:.1f} KB" if b < 1024**2 else f"{b / 1024**2:.2f} MB"  # noqa: E731
    for method, run in runs.items():
        r = json.loads((run / RESULTS).read_text())
        after = r["memory_after_task"]
        marks = " / ".join(kb(after[i - 1]) if len(after) >= i else "-" for i in (1, 5, 15, 45))
        accs = [t["acc_final"] for t in r["tasks"]]
        per = np.mean([sum(t["bytes"].values()) for t in r["tasks"]])
        lines.append(f"| {method} | {len(accs)} | {100 * np.mean(accs):.2f}% | {100 * min(accs):.2f}% | {marks} | "
                     f"{kb(per)} |")
    if "packnet" in runs:
        cap = packnet_capacity(runs["packnet"])
        r = json.loads((runs["packnet"] / RESULTS).read_text())
        out_of = next((i for i, c in enumerate(cap) if c["least_free"] == 0.0), None)
        lines += ["", "PackNet's capacity after task 1, 5, 10, 15, 45: free weights " + ", ".join(
            f"{100 * cap[i - 1]['free']:.3g}%" for i in (1, 5, 10, 15, 45) if len(cap) >= i)
            + "; the task's own " + ", ".join(f"{100 * cap[i - 1]['own']:.3g}%" for i in (1, 5, 10, 15, 45)
                                              if len(cap) >= i) + ".",
            "First task after which a layer has no free weight: "
            + ("none" if out_of is None else f"task {out_of} ({r['tasks'][out_of]['name']})") + "."]
        accs = [t["acc_final"] for t in r["tasks"]]
        for lo, hi in ((0, 10), (10, 20), (20, 45)):
            if len(accs) > lo:
                lines.append(f"PackNet tasks {lo + 1}-{min(hi, len(accs))}: average {100 * np.mean(accs[lo:hi]):.2f}%.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuned", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args, settings = parser.parse_known_args()
    config = parse_run_config(["--config", "split_fashion_mnist_convnet", "--data.name", "fashion_mnist_pairs",
                               "--trainer.threads", str(args.threads), "--seed", str(args.seed), *settings])
    runs = {m: run_method(config, m, args.out, args.tuned) for m in args.methods}
    write_report([str(r) for r in runs.values()], args.out / "report")
    text = figures(args.out, runs)
    (args.out / "pairs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
