"""Serving every task of a run from one process: :class:`TaskServer`.

One object holds what every task needs in its compact, stored form: the run's files, read and verified once
and kept in memory (NWS: the pools, the reference, and per task its packed indices, BatchNorm and classifier;
a baseline: its shared network or backbone and each task's own file). A task's network is rebuilt from them on
demand, with plain torch layers (:meth:`nws.store.RunStore.plain_model`: NWS layers materialised, so no
forward searches a pool), into a cache of the ``cache_size`` most recently used networks. Any method's run
works: the run is opened with its method's reader (:func:`nws.methods.open_run`).

    server = TaskServer("runs/demo", cache_size=4)
    out = server.predict("digits 0/1", batch)      # by name or index; batch: (N, C, H, W), prepared
    out.names, out.probabilities                   # the class of each image and its probability
    server.predict_images(0, ["a.png", "b.jpg"])   # files or Pillow images, prepared as the run recorded
    server.drop()                                  # free every cached network
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from nws.data.preparation import Preparation
from nws.errors import NWSError
from nws.methods import open_run

ImageLike = str | os.PathLike | Image.Image


class ServeError(NWSError):
    """An unknown task, an image that cannot be read, or a run that lacks what serving needs."""


@dataclass
class Prediction:
    """A batch's predictions: per image the ``probabilities`` of every class (softmax of the logits), the
    predicted class ``labels`` (indices), their ``names`` and their ``confidence`` (its probability)."""

    probabilities: Tensor
    labels: Tensor
    names: list[str]

    @property
    def confidence(self) -> Tensor:
        return self.probabilities.gather(1, self.labels[:, None])[:, 0]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class TaskServer:
    """Every task of the run at ``run``, served from one process.

    ``cache_size``: how many materialised networks are kept (least recently used dropped first; 0: none, each
    call rebuilds). ``device``: where the networks run. ``hold``: keep the run's files in memory (read and
    verified once; rebuilding then reads no disk) rather than reading them again on each rebuild. Networks
    are built under a lock, so several threads may call :meth:`predict`; a forward runs outside it.
    """

    def __init__(self, run: str | os.PathLike, cache_size: int = 4, device: str | torch.device = "cpu",
                 hold: bool = True):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.store = open_run(str(run))
        self.store.cache_size = cache_size
        self.device = torch.device(device)
        self.held = self.store.hold() if hold else 0
        self._entries = {t["index"]: t for t in self.store.tasks()}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    # -- the tasks
    @property
    def tasks(self) -> list[dict[str, Any]]:
        """Every task: ``index``, ``name``, ``classes``."""
        return [{k: t[k] for k in ("index", "name", "classes")} for t in self._entries.values()]

    def index(self, task: int | str) -> int:
        """The index of ``task`` (an index, or a task's name); :class:`ServeError` naming the tasks otherwise."""
        if isinstance(task, int) and not isinstance(task, bool) and task in self._entries:
            return task
        for t in self._entries.values():
            if t["name"] == task:
                return t["index"]
        known = "; ".join(f"{t['index']} ({t['name']})" for t in self._entries.values())
        raise ServeError(f"{self.store.root} has no task {task!r} (tasks: {known or 'none'})")

    def classes(self, task: int | str) -> list[str]:
        return list(self._entries[self.index(task)]["classes"])

    def preparation(self, task: int | str) -> Preparation:
        """How an image file becomes task ``task``'s input, as the run recorded it."""
        entry = self._entries[self.index(task)]
        if "preparation" not in entry:
            raise ServeError(f"{self.store.root} does not record how task {entry['index']}'s inputs are prepared "
                             "(a run of an earlier nws, or of a benchmark whose data do not describe it); give "
                             "predict() prepared tensors instead")
        return Preparation.from_json(entry["preparation"], f"{self.store.root}: task {entry['index']}'s preparation")

    # -- the networks
    @property
    def cache_size(self) -> int:
        return self.store.cache_size

    @cache_size.setter
    def cache_size(self, size: int) -> None:
        with self._lock:
            self.store.cache_size = size
            while len(self.store.cached()) > size:
                self.store.drop(next(iter(self.store.cached()))[1])

    def cached(self) -> list[int]:
        """The tasks whose networks are cached, least recently used first."""
        return [index for kind, index in self.store.cached() if kind == "plain"]

    def network(self, task: int | str) -> nn.Module:
        """Task ``task``'s plain network (eval mode, on ``device``): from the cache, else rebuilt now."""
        index = self.index(task)
        with self._lock:
            if index in self.cached():
                self.hits += 1
            else:
                self.misses += 1
            return self.store.plain_model(index).to(self.device)

    def drop(self, task: int | str | None = None) -> None:
        """Drop task ``task``'s cached network (None: every cached network)."""
        with self._lock:
            self.store.drop(None if task is None else self.index(task))

    def memory(self) -> dict[str, int]:
        """Bytes held: ``files`` (the run's files kept in memory), ``networks`` (the cached networks' tensors)."""
        with self._lock:
            networks = list(self.store.cached().values())
        return {"files": self.held, "networks": sum(map(tensor_bytes, networks))}

    # -- predictions
    @torch.no_grad()
    def logits(self, task: int | str, batch: Tensor) -> Tensor:
        """Task ``task``'s logits for ``batch`` (``(N, C, H, W)``, prepared as the task's inputs)."""
        return self.network(task)(batch.to(self.device))

    def predict(self, task: int | str, batch: Tensor) -> Prediction:
        """Task ``task``'s predictions for ``batch`` (``(N, C, H, W)``, prepared as the task's inputs)."""
        probabilities = self.logits(task, batch).float().softmax(1).cpu()
        labels = probabilities.argmax(1)
        classes = self.classes(task)
        return Prediction(probabilities, labels, [classes[i] for i in labels.tolist()])

    def prepare(self, task: int | str, images: Sequence[ImageLike]) -> Tensor:
        """``images`` (files any format Pillow reads, or Pillow images) as a batch of task ``task``'s inputs."""
        preparation = self.preparation(task)
        return torch.stack([preparation(open_image(image)) for image in images])

    def predict_images(self, task: int | str, images: Sequence[ImageLike]) -> Prediction:
        """Task ``task``'s predictions for image files or Pillow images, prepared as the run recorded."""
        return self.predict(task, self.prepare(task, images))


def open_image(image: ImageLike) -> Image.Image:
    """``image`` itself, or the image file at that path, decoded; :class:`ServeError` for a file that is missing
    or not an image."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise ServeError(f"{image}: no such file") from None
    except (OSError, UnidentifiedImageError) as err:
        raise ServeError(f"{image}: cannot read it as an image ({' '.join(str(err).split())})") from None


__all__ = ["Prediction", "ServeError", "TaskServer", "open_image", "tensor_bytes"]
