"""Split-Fashion-MNIST: NWS and every baseline, each tuned on the same budget, then run for several seeds.

1. **Tune** (seed ``--tune-seed``): every method gets the same number of grid points (:data:`GRIDS`; the
   config's own values included), each trained with the config's task schedule on 80% of the first task's
   training images and scored on the other 20% (seeded, stratified by class; normalised with the 80%'s
   statistics). The point with the highest validation accuracy wins; equal accuracies go to the lower
   validation loss. The source stage is shared: NWS's grid points start from one source-only NWS run
   (``pretrained:``), the baselines' from one plain network trained on the source task (``shared_source``).
2. **Final**: every method with its chosen values on the full protocol (all five tasks, the official test
   images), one run directory per method and seed. With ``--tuned DIR`` the methods take the values chosen in
   DIR's tuning instead of tuning (another backbone under the same protocol, e.g. ResNet-18 with the
   convnet's values). The baselines of a seed share one plain source network;
   an NWS run pretrains its own pools (so its config is a plain ``nws run`` one; on the tuning seed its pools
   are checked to be byte-identical to those the grid points used).
3. **Report**: ``nws report`` of every finished final run (means and standard deviations over seeds), and
   ``tuning.md``: the validation accuracy and loss of every grid point and the chosen values.

The grids (:data:`GRIDS`) give each method eight points: the task learning rate (up to 0.5: on the short
schedule the best points are high); NWS's four learning rates times two lambdas of its rate-aware search
(``model.rate``), the knob that trades its bytes per task; Piggyback's task learning rates times the Adam
learning rates of its mask scores. Runs use one thread (``--threads``) unless asked otherwise, so CPU times
compare and results do not depend on the machine's core count.

Every stage skips what is finished and resumes what was interrupted, so the command can simply be run
again; ``--methods`` splits the work between processes (the shared source networks are made under a lock).
Arguments the driver does not know are settings for the config (``--data.root DIR``, ``--task.epochs 1``).

    python benchmarks/split_fashion_mnist.py --config configs/split_fashion_mnist_convnet.yaml \\
        --data.root /usr/share/datasets/fashion-mnist --trainer.progress_bar false \\
        --out /tmp/results_runs/convnet --seeds 1993 1994 1995 [--methods nws packnet] [--stage tune|final|report|all]
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nws.config import RunConfig
from nws.config_parser import parse_run_config, validate
from nws.data import Benchmark, benchmark_from_config
from nws.data.mnist import array_task, image_side
from nws.methods import METHODS, method_class
from nws.methods.finetune import FinetuneStore
from nws.report import write_report
from nws.results import RESULTS
from nws.runner import Runner
from nws.methods.nws import POOLS
from nws.store import MANIFEST

LRS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
RATES = (0.5, 1.0)
# Eight points per method: the task learning rate; for NWS four learning rates times two lambdas of its
# rate-aware search (model.rate); for Piggyback (whose task lr trains only its classifier and BatchNorm) task
# learning rates times Adam learning rates of its mask scores.
GRIDS: dict[str, list[dict[str, float]]] = {
    "nws": [{"task.lr": lr, "model.rate": rate} for lr in (0.1, 0.15, 0.2, 0.3) for rate in RATES],
    **{m: [{"task.lr": lr} for lr in LRS] for m in ("finetune", "individual", "packnet")},
    "piggyback": [{"task.lr": lr, "baseline.mask_lr": mlr} for lr in (0.01, 0.05) for mlr in (0.001, 0.01, 0.1)]
    + [{"task.lr": 0.2, "baseline.mask_lr": 0.1}, {"task.lr": 0.05, "baseline.mask_lr": 0.3}],
}
VALIDATION_FRACTION = 0.2


def tune_file(out: Path, method: str) -> Path:
    return out / "tune" / f"{method}.json"


def with_values(config: RunConfig, values: dict[str, float], **top: Any) -> RunConfig:
    """``config`` with dotted ``values`` (``task.lr``, ``baseline.mask_lr``) and top-level settings replaced."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        group, name = key.split(".")
        groups.setdefault(group, {})[name] = value
    return validate(dataclasses.replace(config, **top, **{g: dataclasses.replace(getattr(config, g), **v)
                                                          for g, v in groups.items()}))


def label(values: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def validation_benchmark(bench: Benchmark, image_size: int | None, seed: int,
                         fraction: float = VALIDATION_FRACTION) -> Benchmark:
    """The source task and one task: the first task's training images split, stratified by class and seeded,
    into training (``1 - fraction``) and validation (``fraction``, as the task's test set)."""
    task = bench.tasks[0]
    images, labels = task.train.images.numpy(), task.train.labels.numpy()
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: round(fraction * np.sum(labels == c))]
                          for c in np.unique(labels)])
    is_val = np.zeros(len(labels), bool)
    is_val[val] = True
    split = {"train": ~is_val, "test": is_val}
    tuned = array_task(f"{task.name} validation", task.classes, {s: images[m] for s, m in split.items()},
                       {s: labels[m] for s, m in split.items()}, image_side(image_size))
    return Benchmark(source=bench.source, tasks=[tuned], in_channels=bench.in_channels)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data) -> float:
    model.eval()
    total = 0.0
    for x, y in DataLoader(data, batch_size=500):
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
    return total / len(data)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_once(config: RunConfig, benchmark: Benchmark, **options: Any) -> tuple[dict[str, Any], float, float]:
    """Run ``config`` unless its directory holds finished results (resume an interrupted one); returns the
    results and the wall and CPU seconds this call took."""
    out = Path(config.out)
    wall, cpu = time.perf_counter(), time.process_time()
    if (out / RESULTS).is_file():
        return json.loads((out / RESULTS).read_text()), 0.0, 0.0
    resume = (out / MANIFEST).is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)  # a start that stopped before its manifest
    results = Runner(config, benchmark, **options).run(resume=resume)
    return results, time.perf_counter() - wall, time.process_time() - cpu


def source_run(config: RunConfig, bench: Benchmark, seed_dir: Path, kind: str) -> Path:
    """A run of the source stage alone (no tasks), made once per seed: ``source_nws`` (pools and network) or
    ``source_plain`` (the baselines' plain network). Its wall and CPU seconds go to ``source.json`` in it."""
    out = seed_dir / f"source_{kind}"
    with locked(seed_dir / f".source_{kind}.lock"):
        if not (out / "source.json").is_file():
            method = "nws" if kind == "nws" else "finetune"
            cfg = with_values(config, {}, method=method, out=str(out), pretrained=None)
            _, wall, cpu = run_once(cfg, Benchmark(bench.source, [], bench.in_channels))
            (out / "source.json").write_text(json.dumps({"train_seconds": round(wall, 3),
                                                         "train_cpu_seconds": round(cpu, 3)}))
            print(f"[source {kind}] seed {config.seed}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return out


def plain_source(path: Path, bench: Benchmark) -> torch.nn.Module:
    return FinetuneStore(path).source(len(bench.source.classes))


def tune(config: RunConfig, method: str, out: Path) -> dict[str, Any]:
    """Every grid point of ``method`` on the validation split; writes and returns its :func:`tune_file`."""
    file = tune_file(out, method)
    if file.is_file():
        return json.loads(file.read_text())
    bench = benchmark_from_config(config.data, config.seed)
    val = validation_benchmark(bench, config.data.image_size, config.seed)
    seed_dir = out / f"seed{config.seed}"
    if method == "nws":
        top, options = {"pretrained": str(source_run(config, bench, seed_dir, "nws"))}, {}
    else:
        top, options = {}, {"shared_source": plain_source(source_run(config, bench, seed_dir, "plain"), bench)}
    points = []
    for values in GRIDS[method]:
        cfg = with_values(config, values, method=method, out=str(out / "tune" / method / label(values)), **top)
        results, wall, cpu = run_once(cfg, val, **options)
        model = method_class(method).store_class(cfg.out).model(0)
        point = {"values": values, "val_accuracy": results["tasks"][0]["acc_final"],
                 "val_loss": mean_loss(model, val.tasks[0].test),
                 "train_seconds": results["tasks"][0]["train_seconds"],
                 "train_cpu_seconds": results["tasks"][0]["train_cpu_seconds"]}
        points.append(point)
        print(f"[tune {method}] {label(values)}: validation accuracy {100 * point['val_accuracy']:.2f}%, "
              f"loss {point['val_loss']:.4f} ({point['train_cpu_seconds']:.0f} s CPU)", flush=True)
    best = max(points, key=lambda p: (p["val_accuracy"], -p["val_loss"]))
    record = {"method": method, "seed": config.seed, "validation": f"{VALIDATION_FRACTION:g} of "
              f"{bench.tasks[0].name}'s training images ({len(val.tasks[0].test)} of {len(bench.tasks[0].train)})",
              "points": points, "chosen": best["values"]}
    file.write_text(json.dumps(record, indent=1))
    print(f"[tune {method}] chosen {label(best['values'])}", flush=True)
    return record


def final(config: RunConfig, method: str, seed: int, out: Path, tuned: Path | None = None) -> Path:
    """``method`` with its chosen values (from ``tuned``'s tuning if given, else ``out``'s) on the whole
    benchmark for ``seed``."""
    chosen = json.loads(tune_file(tuned or out, method).read_text())["chosen"]
    seed_dir = out / f"seed{seed}"
    run_dir = seed_dir / method
    cfg = with_values(config, chosen, method=method, seed=seed, out=str(run_dir))
    bench = benchmark_from_config(cfg.data, seed)
    options = {} if method == "nws" else {"shared_source": plain_source(source_run(cfg, bench, seed_dir, "plain"), bench)}
    results, wall, cpu = run_once(cfg, bench, **options)
    if wall:
        print(f"[final {method}] seed {seed}: average accuracy {100 * results['average_accuracy']:.2f}% "
              f"({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    tuned_pools = seed_dir / "source_nws" / POOLS
    if method == "nws" and tuned_pools.is_file():
        same = tuned_pools.read_bytes() == (run_dir / POOLS).read_bytes()
        print(f"[final nws] seed {seed}: pools byte-identical to those the grid points used: {same}", flush=True)
    return run_dir


def tuning_markdown(out: Path) -> str:
    """The grid of every tuned method: validation accuracy and loss per point, the chosen point in bold."""
    lines = []
    for method in METHODS:
        file = tune_file(out, method)
        if not file.is_file():
            continue
        record = json.loads(file.read_text())
        if not lines:
            lines += [f"Validation: {record['validation']}, seed {record['seed']}.", "",
                      "| method | grid point | validation accuracy | validation loss | CPU s |", "|---|---|---|---|---|"]
        for p in record["points"]:
            mark = "**" if p["values"] == record["chosen"] else ""
            lines.append(f"| {method} | {mark}{label(p['values'])}{mark} | {mark}{100 * p['val_accuracy']:.2f}%{mark} "
                         f"| {p['val_loss']:.4f} | {p['train_cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def report(out: Path) -> None:
    """The report of every finished final run, and the tuning table."""
    seeds = sorted(int(d.name[4:]) for d in out.glob("seed*") if d.name[4:].isdigit())
    runs = [out / f"seed{seed}" / method for seed in seeds for method in METHODS
            if (out / f"seed{seed}" / method / RESULTS).is_file()]
    if runs:
        write_report(runs, out / "report")
        print((out / "report" / "report.md").read_text().split("\n\n![")[0])
    text = tuning_markdown(out)
    (out / "tuning.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993])
    parser.add_argument("--tune-seed", type=int, default=None, help="the seed of the tuning (default: the first)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--stage", choices=("tune", "final", "report", "all"), default="all")
    parser.add_argument("--tuned", type=Path, default=None,
                        help="take every method's chosen values from this earlier --out's tuning instead of tuning "
                        "(another backbone under the same protocol)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time comparable across runs, "
                        "and results that do not depend on the machine's core count)")
    args, settings = parser.parse_known_args()
    config = parse_run_config(["--config", args.config, "--trainer.threads", str(args.threads), *settings])
    tune_seed = args.tune_seed if args.tune_seed is not None else args.seeds[0]
    if args.stage in ("tune", "all") and args.tuned is None:
        for method in args.methods:
            tune(with_values(config, {}, seed=tune_seed), method, args.out)
    if args.stage in ("final", "all"):
        for seed in args.seeds:
            for method in args.methods:
                final(config, method, seed, args.out, args.tuned)
    if args.stage in ("report", "all"):
        report(args.out)


if __name__ == "__main__":
    main()
