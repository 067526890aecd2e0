"""Benchmarks as task sequences: a source task for pool pretraining, then the tasks to learn in order.

Known benchmarks (``data.name``): ``digits`` (embedded, no files), ``split_cifar100`` (20 superclass tasks),
``cub2sketches`` (five fine-grained data sets), ``split_fashion_mnist`` (five two-class Fashion-MNIST tasks),
``imagenet`` (pool pretraining alone, no tasks) and ``folders`` (your own sequence of image-folder tasks,
``data.tasks``).
"""

from __future__ import annotations

from typing import Any

from nws.data.base import Benchmark, Task
from nws.errors import NWSError

BENCHMARKS = ("digits", "split_cifar100", "cub2sketches", "split_fashion_mnist", "imagenet", "folders")


def load_benchmark(name: str, root: str | None = None, seed: int = 0, source: str | None = None,
                   source_root: str | None = None, num_tasks: int | None = None,
                   image_size: int | None = None, tasks: list[str] | None = None) -> Benchmark:
    """The benchmark called ``name`` (data under ``root`` where it needs files).

    ``source`` picks the pool-pretraining task (``None``: the benchmark's own default; ``imagenet`` reads
    ImageNet folders at ``source_root``; ``cifar100``; ``mnist`` reads MNIST at ``source_root``; ``digits``;
    ``none``; for ``folders``, a folder), ``num_tasks`` keeps only the first tasks (indices unchanged),
    ``image_size`` is the input side for image-folder data (default 224) and Fashion-MNIST (default 28, larger
    sizes pad), ``tasks`` the task folders of ``folders``.
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
    elif name == "folders":
        from nws.data.folders import folders

        bench = folders(tasks, source, image_size)
    else:
        raise NWSError(f"data.name: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if num_tasks is not None:
        bench.tasks = bench.tasks[:num_tasks]
    return bench


def benchmark_from_config(data: Any, seed: int) -> Benchmark:
    """:func:`load_benchmark` for a ``DataConfig``."""
    return load_benchmark(data.name, data.root, seed=seed, source=data.source, source_root=data.source_root,
                          num_tasks=data.num_tasks, image_size=data.image_size, tasks=data.tasks)


__all__ = ["BENCHMARKS", "Benchmark", "Task", "benchmark_from_config", "load_benchmark"]
