"""Benchmarks as task sequences: a source task for pool pretraining, then the tasks to learn in order.

Known benchmarks (``data.name``): ``digits`` (embedded, no files), ``split_cifar100`` (20 superclass tasks),
``cub2sketches`` (five fine-grained data sets), ``split_fashion_mnist`` (five two-class Fashion-MNIST tasks)
and ``imagenet`` (pool pretraining alone, no tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from nws.errors import NWSError


@dataclass
class Task:
    """One classification task; labels in ``train``/``test`` are ``0 .. len(classes)-1``."""

    name: str
    classes: list[str]
    train: Dataset
    test: Dataset


@dataclass
class Benchmark:
    """The source task the pools are pretrained on (``None`` when the pools come from a pretraining run),
    and the tasks learned one after another."""

    source: Task | None
    tasks: list[Task]
    in_channels: int


BENCHMARKS = ("digits", "split_cifar100", "cub2sketches", "split_fashion_mnist", "imagenet")


def load_benchmark(name: str, root: str | None = None, seed: int = 0, source: str | None = None,
                   source_root: str | None = None, num_tasks: int | None = None,
                   image_size: int | None = None) -> Benchmark:
    """The benchmark called ``name`` (data under ``root`` where it needs files).

    ``source`` picks the pool-pretraining task (``None``: the benchmark's own default; ``imagenet`` reads
    ImageNet folders at ``source_root``; ``cifar100``; ``mnist`` reads MNIST at ``source_root``; ``digits``;
    ``none``), ``num_tasks`` keeps only the first tasks (indices unchanged), ``image_size`` is the input side
    for image-folder data (default 224) and Fashion-MNIST (default 28, larger sizes pad).
    """
    if name == "digits":
        from nws.data.digits import digits_benchmark

        if source not in (None, "none"):
            raise NWSError(f"the digits benchmark has its own source split; data.source must be unset or none, "
                           f"got {source!r}")
        bench = digits_benchmark(seed=seed)
        if source == "none":
            bench.source = None
    elif name == "split_cifar100":
        from nws.data.cifar100 import split_cifar100

        bench = split_cifar100(root, source, source_root, image_size)
    elif name == "cub2sketches":
        from nws.data.folders import cub2sketches

        bench = cub2sketches(root, source, source_root, image_size)
    elif name == "split_fashion_mnist":
        from nws.data.mnist import split_fashion_mnist

        bench = split_fashion_mnist(root, source, source_root, image_size, seed=seed)
    elif name == "imagenet":
        from nws.data.folders import imagenet

        bench = imagenet(root, source, source_root, image_size)
    else:
        raise NWSError(f"unknown data set {name!r}; known: {', '.join(BENCHMARKS)}")
    if num_tasks is not None:
        if num_tasks < 0:
            raise NWSError(f"data.num_tasks must be at least 0, got {num_tasks}")
        bench.tasks = bench.tasks[:num_tasks]
    return bench


def benchmark_from_config(data, seed: int) -> Benchmark:
    """:func:`load_benchmark` for a ``DataConfig``."""
    return load_benchmark(data.name, data.root, seed=seed, source=data.source, source_root=data.source_root,
                          num_tasks=data.num_tasks, image_size=data.image_size)
