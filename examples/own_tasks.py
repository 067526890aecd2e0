"""Your own task sequence from Python: a list of torch Datasets as tasks, run under the full protocol.

    python examples/own_tasks.py [--out DIR] [--method nws|finetune|individual|packnet|piggyback]

Any ``torch.utils.data.Dataset`` of ``(image tensor, label)`` pairs works; here three tasks are cut from
scikit-learn's bundled 8x8 digits (no download): digits 0-2, 3-5 and 6-9, each with its own train and test
sets, and a source task (all ten digits, other images) to pretrain the pools on. ``nws.runner.run`` does
the rest: pools, every task, storage, evaluation from storage, ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from nws.config import RunConfig
from nws.data import Benchmark, Task
from nws.runner import run
from nws.methods.nws import TaskStore


def dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def my_tasks(seed: int = 0) -> Benchmark:
    """Source: half of the images (all ten digits). Tasks: the other half, split by digit, labels 0..n-1."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    source, rest = order[: len(order) // 2], order[len(order) // 2:]
    tasks = []
    for group in ([0, 1, 2], [3, 4, 5], [6, 7, 8, 9]):
        idx = rest[np.isin(digits.target[rest], group)]
        labels = np.searchsorted(group, digits.target[idx])  # 0 .. len(group) - 1
        cut = 2 * len(idx) // 3
        tasks.append(Task(f"digits {group[0]}-{group[-1]}", [str(d) for d in group],
                          train=dataset(digits.images[idx[:cut]], labels[:cut]),
                          test=dataset(digits.images[idx[cut:]], labels[cut:])))
    cut = 4 * len(source) // 5
    src = Task("all digits", [str(d) for d in range(10)], dataset(digits.images[source[:cut]], digits.target[source[:cut]]),
               dataset(digits.images[source[cut:]], digits.target[source[cut:]]))
    return Benchmark(source=src, tasks=tasks, in_channels=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--method", default="nws")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="nws-own-tasks-")
    config = RunConfig(out=out, method=args.method)
    config.pretrain.epochs, config.task.epochs = 10, 5
    config.model.pool_size = 128
    config.trainer.progress_bar = False
    results = run(config, benchmark=my_tasks())
    for t in results["tasks"]:
        print(f"{t['name']}: accuracy from storage {100 * t['acc_final']:.2f}%, {sum(t['bytes'].values())} bytes")
    if args.method == "nws":
        model = TaskStore(out).model(2)  # any task, rebuilt from the pools and its file alone
        print(f"served task 2: {model(torch.zeros(1, 1, 8, 8)).shape[1]} classes")


if __name__ == "__main__":
    main()
