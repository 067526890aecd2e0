"""What a benchmark is: a source task for pool pretraining, then the tasks learned one after another."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


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
