"""Image-folder data: the CUB-to-Sketches sequence, ImageNet-style folders for pool pretraining, and a
user's own sequence of image-folder tasks.

Layout ``<root>/<split>/<class>/<image>`` (classes sorted by name, as ``ImageFolder``). Images are listed
once, and decoded with Pillow in the DataLoader workers.

CUB-to-Sketches (5 tasks, in this order): ``<root>/<name>/{train,test}/<class>/<image>`` with
``cubs_cropped`` (200 classes), ``stanford_cars_cropped`` (196), ``flowers`` (102), ``wikiart`` (195),
``sketches`` (250) -- the directory names of the reference's (and CPG's / Piggyback's) data.
ImageNet: ``<root>/{train,val}/<wnid>/<image>``. Your own tasks (``data.name: folders``): each task is a
folder ``DIR/{train,test}/<class>/<image>``, named after ``DIR``, at ``data.image_size`` (by default the images'
own side when they all have one size, else 224) with the ``data.augment`` training augmentation (by default
``standard`` from 64 px, ``light`` below); ``data.source`` may name a folder of the same layout to pretrain the
pools on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from nws.data.base import Benchmark, Task
from nws.data.preparation import Preparation
from nws.data.registry import DataRequest, register_benchmark
from nws.data.transforms import folder_transforms, imagenet_transforms, task_folder_transforms
from nws.errors import NWSError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# (directory name, number of classes), in the task order of the reference.
CUB2SKETCHES = (("cubs_cropped", 200), ("stanford_cars_cropped", 196), ("flowers", 102), ("wikiart", 195),
                ("sketches", 250))
DEFAULT_IMAGE_SIZE = 224


class LayoutError(NWSError):
    """A data directory that is missing or not laid out as expected."""


@dataclass
class FolderSplit:
    """One split of an image-folder data set: sorted class names and ``(path, label)`` samples."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]


def scan_split(root: Path) -> FolderSplit:
    """List ``root/<class>/<image>`` (sorted); :class:`LayoutError` for a missing or empty folder or class."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise LayoutError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise LayoutError(f"class folder {root / name} holds no images")
        samples += [(str(root / name / f), label) for f in files]
    return FolderSplit(root, classes, samples)


def scan_dataset(root: Path, splits: tuple[str, str], num_classes: int | None = None) -> dict[str, FolderSplit]:
    """Both splits of a data set; they must have the same classes (``num_classes`` of them, when given)."""
    scanned = {s: scan_split(Path(root) / s) for s in splits}
    a, b = (scanned[s] for s in splits)
    if a.classes != b.classes:
        only = sorted(set(a.classes) ^ set(b.classes))[:3]
        raise LayoutError(f"{root}: {splits[0]}/ and {splits[1]}/ have different classes (e.g. {only})")
    if num_classes is not None and len(a.classes) != num_classes:
        raise LayoutError(f"{root} has {len(a.classes)} classes, expected {num_classes}")
    return scanned


class ImageFolderDataset(Dataset):
    """Samples of a :class:`FolderSplit`, each decoded with Pillow (in the worker) and transformed.

    Paths and labels are kept in NumPy arrays rather than a list of Python objects, so forked DataLoader
    workers share them instead of copying (reference counts would touch every page of a list)."""

    def __init__(self, split: FolderSplit, transform: Callable[[Image.Image], Tensor]):
        self.paths = np.array([os.fsencode(p) for p, _ in split.samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in split.samples], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path, label = os.fsdecode(self.paths[i]), int(self.labels[i])
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise LayoutError(f"cannot decode image {path} ({err})") from None
        return self.transform(image), torch.tensor(label)

    def preparation(self) -> Preparation | None:
        """How an image file becomes what this set gives: RGB, then the transform's steps; None for a transform
        that is not a deterministic one (training's)."""
        try:
            return Preparation.of("RGB", self.transform)
        except (AttributeError, ValueError):
            return None


def _size(image_size: int | None) -> int:
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise NWSError(f"data.image_size must be at least 8, got {size}")
    return size


def folder_task(name: str, root: Path, image_size: int | None, num_classes: int | None = None) -> Task:
    """One fine-grained data set as a task, with the reference transforms (``*_cropped``: square resize)."""
    scanned = scan_dataset(root, ("train", "test"), num_classes)
    size, cropped = _size(image_size), name.endswith("_cropped")
    return Task(name, scanned["train"].classes,
                ImageFolderDataset(scanned["train"], folder_transforms(size, cropped, train=True)),
                ImageFolderDataset(scanned["test"], folder_transforms(size, cropped, train=False)))


def imagenet_task(root: str | Path | None, image_size: int | None) -> Task:
    """ImageNet-style folders (``train/`` and ``val/`` with the same class folders) as a pool-pretraining
    source task; any number of classes (1000 for ImageNet-1k)."""
    if root is None:
        raise LayoutError("pool pretraining on ImageNet needs its folders: set --data.source_root DIR "
                          "(DIR/train/<class>/..., DIR/val/<class>/...)")
    scanned = scan_dataset(Path(root).expanduser(), ("train", "val"))
    size = _size(image_size)
    return Task("imagenet", scanned["train"].classes,
                ImageFolderDataset(scanned["train"], imagenet_transforms(size, train=True)),
                ImageFolderDataset(scanned["val"], imagenet_transforms(size, train=False)))


def check_cub2sketches(root: str | Path) -> list[dict]:
    """Validate the five data sets under ``root`` (layout, class counts); per data set its classes and
    image counts. :class:`LayoutError` names the first problem."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"data root {root} does not exist")
    rows = []
    for name, classes in CUB2SKETCHES:
        scanned = scan_dataset(root / name, ("train", "test"), classes)
        rows.append({"name": name, "classes": classes, "train": len(scanned["train"].samples),
                     "test": len(scanned["test"].samples)})
    return rows


def check_imagenet(root: str | Path) -> list[dict]:
    scanned = scan_dataset(Path(root).expanduser(), ("train", "val"))
    return [{"name": "imagenet", "classes": len(scanned["train"].classes), "train": len(scanned["train"].samples),
             "val": len(scanned["val"].samples)}]


def _source(source: str | None, source_root: str | None, image_size: int | None) -> Task | None:
    source = source or "imagenet"
    if source == "imagenet":
        return imagenet_task(source_root, image_size)
    if source == "none":
        return None
    raise NWSError(f"data.source must be imagenet or none for image-folder benchmarks, got {source!r}")


def cub2sketches(root: str | Path | None, source: str | None, source_root: str | None,
                 image_size: int | None) -> Benchmark:
    """CUB-200 (cropped), Stanford Cars (cropped), Flowers, WikiArt, Sketches, in this order."""
    if root is None:
        raise LayoutError("cub2sketches needs --data.root DIR (holding cubs_cropped/, stanford_cars_cropped/, "
                          "flowers/, wikiart/, sketches/)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"data root {root} does not exist")
    tasks = [folder_task(name, root / name, image_size, classes) for name, classes in CUB2SKETCHES]
    return Benchmark(source=_source(source, source_root, image_size), tasks=tasks, in_channels=3)


def imagenet(root: str | Path | None, source: str | None, source_root: str | None,
             image_size: int | None) -> Benchmark:
    """Pool pretraining alone: ImageNet folders under ``root`` are the source task, and there are no tasks."""
    if source not in (None, "imagenet"):
        raise NWSError(f"the imagenet benchmark is its own source; data.source must be imagenet, got {source!r}")
    if root is None:
        raise LayoutError("imagenet needs --data.root DIR (DIR/train/<class>/..., DIR/val/<class>/...)")
    return Benchmark(source=imagenet_task(source_root or root, image_size), tasks=[], in_channels=3)


def check_folders(roots: list[str | Path]) -> list[dict]:
    """Validate task folders ``DIR/{train,test}/<class>/<image>``; per folder its classes and image counts."""
    rows = []
    for root in roots:
        scanned = scan_dataset(Path(root).expanduser(), ("train", "test"))
        rows.append({"name": task_name(root), "classes": len(scanned["train"].classes),
                     "train": len(scanned["train"].samples), "test": len(scanned["test"].samples)})
    return rows


def task_name(root: str | Path) -> str:
    """A task folder's name: its last path component."""
    return Path(root).expanduser().resolve().name


def common_side(splits: list[FolderSplit]) -> int | None:
    """The images' shorter side when every image of ``splits`` has the same size (read from the file headers),
    else None."""
    sizes = set()
    for split in splits:
        for path, _ in split.samples:
            try:
                with Image.open(path) as img:
                    sizes.add(img.size)
            except (OSError, UnidentifiedImageError) as err:
                raise LayoutError(f"cannot decode image {path} ({err})") from None
            if len(sizes) > 1:
                return None
    return max(8, min(sizes.pop())) if sizes else None


def user_task(root: str | Path, image_size: int | None, augment: str = "standard") -> Task:
    """A task folder ``root/{train,test}/<class>/<image>`` at ``image_size`` (default 224), ``augment`` for
    training (:func:`~nws.data.transforms.task_folder_transforms`)."""
    scanned = scan_dataset(Path(root).expanduser(), ("train", "test"))
    size = _size(image_size)
    return Task(task_name(root), scanned["train"].classes,
                ImageFolderDataset(scanned["train"], task_folder_transforms(size, augment, train=True)),
                ImageFolderDataset(scanned["test"], task_folder_transforms(size, augment, train=False)))


def folders(tasks: list[str] | str | None, source: str | None, image_size: int | None,
            augment: str = "auto") -> Benchmark:
    """A user's own sequence: one task per folder of ``tasks`` (or the one folder), in that order; the pools
    are pretrained on the folder ``source`` (same layout) unless it is ``None``/``none`` (pools from a
    ``pretrained`` run). ``image_size`` None: the images' own side if they all have one size, else 224;
    ``augment`` auto: ``standard`` from 64 px, ``light`` below."""
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not tasks:
        raise LayoutError("data.name folders needs data.tasks: a list of task folders, each holding "
                          "train/<class>/<image> and test/<class>/<image>")
    names = [task_name(t) for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LayoutError(f"data.tasks: two task folders are named {twice[0]!r}; tasks are named after their "
                          "folders, so give them different names")
    folders_ = [*tasks, *([] if source in (None, "none") else [source])]
    if image_size is None:
        splits = [s for f in folders_ for s in scan_dataset(Path(f).expanduser(), ("train", "test")).values()]
        image_size = common_side(splits) or DEFAULT_IMAGE_SIZE
    if augment == "auto":
        augment = "standard" if _size(image_size) >= 64 else "light"
    src = None if source in (None, "none") else user_task(source, image_size, augment)
    return Benchmark(source=src, tasks=[user_task(t, image_size, augment) for t in tasks], in_channels=3)


def _no_augment(request: DataRequest, name: str) -> None:
    if request.augment != "auto":
        raise NWSError(f"data.augment is for data.name folders; {name} uses the reference's transforms "
                       f"(data.augment must be auto, got {request.augment!r})")


@register_benchmark("cub2sketches", "five fine-grained data sets: CUB-200, Stanford Cars, Flowers, WikiArt, "
                    "Sketches (image folders)", check=lambda roots: check_cub2sketches(roots[0]))
def build_cub2sketches(request: DataRequest) -> Benchmark:
    _no_augment(request, "cub2sketches")
    return cub2sketches(request.root, request.source, request.source_root, request.image_size)


@register_benchmark("imagenet", "pool pretraining alone on ImageNet-style folders (train/, val/), no tasks",
                    check=lambda roots: check_imagenet(roots[0]), test_split="val")
def build_imagenet(request: DataRequest) -> Benchmark:
    _no_augment(request, "imagenet")
    return imagenet(request.root, request.source, request.source_root, request.image_size)


@register_benchmark("folders", "your own tasks: data.tasks, each folder DIR/{train,test}/<class>/<image>",
                    check=check_folders, many_roots=True)
def build_folders(request: DataRequest) -> Benchmark:
    return folders(request.tasks, request.source, request.image_size, request.augment)
