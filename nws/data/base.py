"""What a benchmark is: a source task for pool pretraining, then the tasks learned one after another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

if TYPE_CHECKING:
    from nws.data.preparation import Preparation


@dataclass
class Task:
    """One classification task; labels in ``train``/``test`` are ``0 .. len(classes)-1``. ``preparation``: how an
    image file becomes the input the test set gives (None: the test set's ``preparation()`` says, if it has one;
    :meth:`input_preparation`)."""

    name: str
    classes: list[str]
    train: Dataset
    test: Dataset
    preparation: Preparation | None = None

    def input_preparation(self) -> Preparation | None:
        """How this task's test images are prepared (:mod:`nws.data.preparation`): ``preparation``, else what
        the test set describes (a ``preparation()`` method, as the image-folder and in-memory image data sets
        have); None when neither says."""
        if self.preparation is not None:
            return self.preparation
        describe = getattr(self.test, "preparation", None)
        return describe() if callable(describe) else None


@dataclass
class Benchmark:
    """The source task the pools are pretrained on (``None`` when the pools come from a pretraining run),
    and the tasks learned one after another."""

    source: Task | None
    tasks: list[Task]
    in_channels: int
