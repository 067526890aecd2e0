"""Benchmarks as task sequences: a source task for pool pretraining, then the tasks to learn in order."""

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
    """The source task the pools are pretrained on, and the tasks learned one after another."""

    source: Task
    tasks: list[Task]
    in_channels: int


def load_benchmark(name: str, root: str | None = None, seed: int = 0) -> Benchmark:
    """The benchmark called ``name`` (data under ``root`` where it needs files)."""
    if name == "digits":
        from nws.data.digits import digits_benchmark

        return digits_benchmark(seed=seed)
    raise NWSError(f"unknown data set {name!r}; known: digits")
