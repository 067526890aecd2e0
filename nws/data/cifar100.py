"""CIFAR-100 (the official python-version archive) and the Split-CIFAR-100 benchmark.

The archive holds ``cifar-100-python/{train,test,meta}``: pickles written by the data set's authors
(Python 2 dicts of lists and NumPy arrays). They are read with :class:`RestrictedUnpickler`, which builds
only NumPy arrays and builtin containers and refuses every other class, so a tampered file cannot run code.

Split-CIFAR-100: one task per superclass (coarse label) in the reference order, each with its five
classes labelled 0-4 in fine-label order, normalised with the mean and std of the task's own training
images; training adds a random crop (padding 4) and a horizontal flip.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nws.data.arrays import ArrayImages, channel_stats
from nws.data.base import Benchmark, Task
from nws.data.registry import DataRequest, register_benchmark
from nws.data.download import OfflineError, download, md5sum, safe_extract
from nws.data.transforms import cifar_transforms
from nws.errors import NWSError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
SPLITS = {"train": 50000, "test": 10000}

# The reference task order: the 20 superclasses, alphabetical (also their coarse-label order in ``meta``).
SUPERCLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)


class CIFARError(NWSError):
    """Missing, incomplete or malformed CIFAR-100 files."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR files: NumPy arrays and dtypes plus builtin containers; any other global is refused.

    The files are Python 2 pickles: NumPy arrays are rebuilt by ``numpy.core.multiarray._reconstruct``
    (``numpy._core`` in NumPy 2) from ``numpy.ndarray`` and ``numpy.dtype``; lists, dicts and strings need
    no global at all.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # NumPy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle's dict with ``str`` keys; :class:`CIFARError` if it is not one."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CIFARError(f"{path} is not a CIFAR-100 file ({err})") from None
    except OSError as err:
        raise CIFARError(f"cannot read {path} ({err.strerror})") from None
    if not isinstance(obj, dict):
        raise CIFARError(f"{path} is not a CIFAR-100 file (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(value: object, path: Path, key: str, count: int) -> list[str]:
    if not isinstance(value, list) or len(value) != count:
        raise CIFARError(f"{path}: {key} should list {count} names")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]


@dataclass
class CIFAR100:
    """Both splits in memory: ``images[split]`` ``uint8 (N, 3, 32, 32)``, fine and coarse labels, names."""

    images: dict[str, np.ndarray]
    fine: dict[str, np.ndarray]
    coarse: dict[str, np.ndarray]
    fine_names: list[str]
    coarse_names: list[str]


def read_cifar100(folder: Path, full: bool = True) -> CIFAR100:
    """Read and check ``folder`` (the extracted ``cifar-100-python``): meta names, array shapes, labels, and
    that every class belongs to one superclass of five classes. ``full=False`` accepts any number of images
    per split (generated test data, subsets)."""
    folder = Path(folder)
    for name in ("meta", *SPLITS):
        if not (folder / name).is_file():
            raise CIFARError(f"{folder} lacks the file {name!r}: not an extracted {FOLDER} directory")
    meta = load_pickle(folder / "meta")
    fine_names = _names(meta.get("fine_label_names"), folder / "meta", "fine_label_names", 100)
    coarse_names = _names(meta.get("coarse_label_names"), folder / "meta", "coarse_label_names", 20)
    if sorted(coarse_names) != sorted(SUPERCLASSES):
        raise CIFARError(f"{folder / 'meta'}: its superclass names are not CIFAR-100's")
    images, fine, coarse = {}, {}, {}
    for split, expected in SPLITS.items():
        d = load_pickle(folder / split)
        data = d.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise CIFARError(f"{folder / split}: 'data' should be a uint8 array of shape (N, 3072)")
        n = data.shape[0]
        if full and n != expected:
            raise CIFARError(f"{folder / split} holds {n} images, CIFAR-100 has {expected}")
        try:
            f = np.asarray(d.get("fine_labels"), dtype=np.int64)
            c = np.asarray(d.get("coarse_labels"), dtype=np.int64)
        except (TypeError, ValueError):
            raise CIFARError(f"{folder / split}: fine_labels and coarse_labels should be lists of ints") from None
        if f.shape != (n,) or c.shape != (n,) or (n and (f.min() < 0 or f.max() > 99 or c.min() < 0 or c.max() > 19)):
            raise CIFARError(f"{folder / split}: labels missing or out of range")
        images[split], fine[split], coarse[split] = data.reshape(n, 3, 32, 32), f, c
    pairs = {(int(a), int(b)) for s in SPLITS for a, b in zip(fine[s], coarse[s])}
    parent = dict(pairs)
    if len(parent) != len(pairs):
        raise CIFARError(f"{folder}: a class appears under two superclasses")
    return CIFAR100(images, fine, coarse, fine_names, coarse_names)


def _task(name: str, classes: list[str], data: CIFAR100, masks: dict[str, np.ndarray],
          relabel: dict[int, int]) -> Task:
    mean, std = channel_stats(data.images["train"][masks["train"]])
    sets = {}
    for split, train in (("train", True), ("test", False)):
        labels = np.array([relabel[int(f)] for f in data.fine[split][masks[split]]], dtype=np.int64)
        sets[split] = ArrayImages(data.images[split][masks[split]], labels, cifar_transforms(mean, std, train))
    return Task(name, classes, sets["train"], sets["test"])


def split_tasks(data: CIFAR100) -> list[Task]:
    """The 20 superclass tasks in the reference order; classes in fine-label order, labelled 0-4."""
    tasks = []
    for superclass in SUPERCLASSES:
        c = data.coarse_names.index(superclass)
        members = sorted({int(f) for s in SPLITS for f, k in zip(data.fine[s], data.coarse[s]) if k == c})
        if len(members) != 5:
            raise CIFARError(f"superclass {superclass} has {len(members)} classes in the files, expected 5")
        masks = {s: data.coarse[s] == c for s in SPLITS}
        tasks.append(_task(superclass, [data.fine_names[f] for f in members], data, masks,
                           {f: i for i, f in enumerate(members)}))
    return tasks


def all_classes_task(data: CIFAR100) -> Task:
    """All 100 classes as one task (a small source task for pool pretraining), normalised over all of train."""
    masks = {s: np.ones(len(data.fine[s]), dtype=bool) for s in SPLITS}
    return _task("cifar100 (100 classes)", list(data.fine_names), data, masks, {f: f for f in range(100)})


def locate(root: str | Path) -> Path:
    """The extracted ``cifar-100-python`` directory under ``root`` (or ``root`` itself), extracting the
    archive found there if needed; :class:`CIFARError` with what to do when there is neither."""
    root = Path(root).expanduser()
    if (root / "meta").is_file() and root.name == FOLDER:
        return root
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / ARCHIVE).is_file():
        return safe_extract(root / ARCHIVE, root, FOLDER)
    raise CIFARError(f"no CIFAR-100 under {root} (expected {root / FOLDER} or {root / ARCHIVE}); run "
                     f"`nws data cifar100 --root {root}`")


def load_cifar100(root: str | Path) -> CIFAR100:
    return read_cifar100(locate(root), full=False)


def prepare(root: str | Path, url: str | None = None, md5: str | None = None,
            progress: bool = True, full: bool = True) -> tuple[Path, str]:
    """``nws data cifar100``: make ``root/cifar-100-python`` ready (use, extract or download); returns the
    folder and a one-line account of what was done. Offline, :class:`CIFARError` says where to put the
    archive. ``url`` and ``md5`` default to the official archive's; ``full`` also checks the image counts
    (50,000 train, 10,000 test)."""
    url, md5 = url or URL, md5 or MD5
    root = Path(root).expanduser()
    folder = root / FOLDER
    if folder.is_dir():
        data = read_cifar100(folder, full)
        return folder, f"{folder} is ready ({len(data.fine['train'])} train, {len(data.fine['test'])} test images)"
    archive = root / ARCHIVE
    note = ""
    if archive.is_file():
        if md5sum(archive) != md5:
            note = f" (note: {archive} differs from the official archive's MD5 {md5})"
        how = "extracted the archive already there"
    else:
        try:
            download(url, archive, md5, progress=progress)
        except OfflineError as err:
            raise CIFARError(f"{err}: offline? Download {url} elsewhere and put it at {archive}, then run this "
                             "command again") from None
        how = f"downloaded {url} (MD5 verified) and extracted it"
    folder = safe_extract(archive, root, FOLDER)
    data = read_cifar100(folder, full)
    return folder, (f"{folder} is ready: {how}{note}; {len(data.fine['train'])} train, "
                    f"{len(data.fine['test'])} test images")


def split_cifar100(root: str | Path | None, source: str | None, source_root: str | None,
                   image_size: int | None) -> Benchmark:
    """Split-CIFAR-100 under ``root``; the pool-pretraining source is ``imagenet`` (the paper, the default),
    ``cifar100`` (all 100 classes of the same training images: small runs only, the pools see the tasks'
    data) or ``none`` (pools come from a pretraining run)."""
    if root is None:
        raise CIFARError("split_cifar100 needs --data.root DIR (the folder holding cifar-100-python/)")
    data = load_cifar100(root)
    tasks = split_tasks(data)
    source = source or "imagenet"
    if source == "cifar100":
        src = all_classes_task(data)
    elif source == "imagenet":
        from nws.data.folders import imagenet_task

        src = imagenet_task(source_root, image_size)
    elif source == "none":
        src = None
    else:
        raise NWSError(f"data.source for split_cifar100 must be imagenet, cifar100 or none, got {source!r}")
    return Benchmark(source=src, tasks=tasks, in_channels=3)


def check_split_cifar100(roots: list[Path]) -> list[dict]:
    """``nws data check``: the CIFAR-100 files under the root, verified."""
    data = load_cifar100(roots[0])
    return [{"name": "cifar100", "classes": 100, "train": len(data.fine["train"]), "test": len(data.fine["test"])}]


@register_benchmark("split_cifar100", "20 tasks, one per CIFAR-100 superclass (5 classes each)",
                    check=check_split_cifar100)
def build_split_cifar100(request: DataRequest) -> Benchmark:
    return split_cifar100(request.root, request.source, request.source_root, request.image_size)
