"""Benchmarks as task sequences: a source task for pool pretraining, then the tasks to learn in order.

Benchmarks are registered by name (:func:`register_benchmark`, as models are): ``digits`` (embedded, no
files), ``split_cifar100`` (20 superclass tasks), ``cub2sketches`` (five fine-grained data sets),
``split_fashion_mnist`` (five two-class Fashion-MNIST tasks), ``imagenet`` (pool pretraining alone, no tasks)
and ``folders`` (your own sequence of image-folder tasks, ``data.tasks``).
"""

from __future__ import annotations

from typing import Any

from nws.data.base import Benchmark, Task
from nws.data.registry import (BenchmarkEntry, DataRequest, benchmark_entry, list_benchmarks,
                               register_benchmark)
from nws.data import cifar100, digits, folders, mnist  # noqa: F401,E402  (they register their benchmarks)


def load_benchmark(name: str, root: str | None = None, seed: int = 0, source: str | None = None,
                   source_root: str | None = None, num_tasks: int | None = None, image_size: int | None = None,
                   tasks: list[str] | str | None = None, augment: str = "auto") -> Benchmark:
    """The benchmark called ``name`` (data under ``root`` where it needs files).

    ``source`` picks the pool-pretraining task (``None``: the benchmark's own default; ``none``: no source,
    pools come from a pretraining run), ``num_tasks`` keeps only the first tasks (indices unchanged),
    ``image_size`` is the input side of image data, ``tasks`` the task folders of ``folders`` and ``augment``
    their training augmentation.
    """
    tasks = [tasks] if isinstance(tasks, str) else tasks
    request = DataRequest(root, seed, source, source_root, image_size, tasks, augment)
    bench = benchmark_entry(name).build(request)
    if num_tasks is not None:
        bench.tasks = bench.tasks[:num_tasks]
    return bench


def benchmark_from_config(data: Any, seed: int) -> Benchmark:
    """:func:`load_benchmark` for a ``DataConfig``."""
    return load_benchmark(data.name, data.root, seed=seed, source=data.source, source_root=data.source_root,
                          num_tasks=data.num_tasks, image_size=data.image_size, tasks=data.tasks,
                          augment=data.augment)


__all__ = ["Benchmark", "BenchmarkEntry", "DataRequest", "Task", "benchmark_entry", "benchmark_from_config",
           "list_benchmarks", "load_benchmark", "register_benchmark"]
