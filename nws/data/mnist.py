"""MNIST and Fashion-MNIST from their official IDX files, and the Split-Fashion-MNIST benchmark.

Each data set is four IDX files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, read gzipped (``NAME.gz``, as published) or plain
(``NAME``). Every file is checked: the IDX header (magic number: unsigned bytes, 3 or 1 dimensions), the
28x28 image size, the file length the header implies (truncated files), equal image and label counts, labels
0-9; for the full data set also the official counts (60,000 train, 10,000 test) and the SHA-256 of the
*decompressed* bytes. Checking the decompressed bytes, not the ``.gz``, accepts every faithful copy: the
official downloads and Debian's ``dataset-fashion-mnist`` package, which recompressed the files (its ``.gz``
MD5s differ from the official ones; the decompressed files are identical). The MD5 of a ``.gz`` is checked
only when nws downloads it.

Split-Fashion-MNIST (the continual-learning literature's): five tasks of two classes, 0/1, 2/3, 4/5, 6/7, 8/9,
in that order, labelled 0 and 1, with the official train/test split; each task normalised with the mean and
std of its own training images, no augmentation. The pools are pretrained on another domain: handwritten
digits (MNIST, or by default scikit-learn's embedded 8x8 digits brought to MNIST's layout).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nws.data.arrays import ArrayImages, channel_stats
from nws.data.base import Benchmark, Task
from nws.data.registry import DataRequest, register_benchmark
from nws.data.download import DownloadError, OfflineError, download, md5sum
from nws.data.transforms import mnist_transforms
from nws.errors import NWSError

SIDE = 28
SPLITS = {"train": 60000, "test": 10000}
PREFIX = {"train": "train", "test": "t10k"}
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


class IDXError(NWSError):
    """Missing, corrupt or unofficial MNIST / Fashion-MNIST files."""


@dataclass(frozen=True)
class IDXFile:
    """One official file: its name without ``.gz``, the MD5 of the published ``.gz`` and the SHA-256 of the
    decompressed bytes."""

    name: str
    gz_md5: str
    sha256: str


@dataclass(frozen=True)
class IDXDataSet:
    """An official IDX data set: where it is published and its four files (keys ``train-images`` etc.)."""

    name: str
    command: str
    mirrors: tuple[str, ...]
    files: dict[str, IDXFile]


# .gz MD5s: Fashion-MNIST's README ("Get the Data", github.com/zalandoresearch/fashion-mnist); MNIST's as the
# mirror serves them (the ones torchvision checks). Decompressed SHA-256s: computed from Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 and from official MNIST .gz files (MD5s as above), and
# equal to those other public projects pin; docs/reproduce.md ("Fashion-MNIST and MNIST") says which came from where.
FASHION_MNIST = IDXDataSet("Fashion-MNIST", "fashion-mnist", (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
), {
    "train-images": IDXFile("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels": IDXFile("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe",
                            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test-images": IDXFile("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79",
                           "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test-labels": IDXFile("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310",
                           "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
})
MNIST = IDXDataSet("MNIST", "mnist", ("https://ossci-datasets.s3.amazonaws.com/mnist/",), {
    "train-images": IDXFile("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels": IDXFile("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432",
                            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test-images": IDXFile("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3",
                           "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test-labels": IDXFile("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c",
                           "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
})
DATA_SETS = {d.command: d for d in (FASHION_MNIST, MNIST)}


def find(folder: Path, name: str) -> Path | None:
    """``folder/NAME.gz`` or else ``folder/NAME``, whichever exists first; ``None`` if neither does."""
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


def read_bytes(path: Path) -> bytes:
    """The decompressed contents of ``path`` (gunzipped when it ends in ``.gz``)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise IDXError(f"cannot read {path} ({err.strerror})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path} is not a readable gzip file ({err})") from None


def parse_idx(raw: bytes, path: Path, ndim: int) -> np.ndarray:
    """The ``uint8`` array of an IDX file's bytes, which must hold unsigned bytes in ``ndim`` dimensions and
    be exactly as long as its header says."""
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes((0, 0, 0x08, ndim)):
        magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise IDXError(f"{path} is not an IDX file of unsigned bytes in {ndim} dimension{'s' * (ndim > 1)} "
                       f"(magic number {magic}, expected {0x800 + ndim})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    start = 4 + 4 * ndim
    expected = start + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        how = "truncated" if len(raw) < expected else "trailing bytes"
        raise IDXError(f"{path} holds {len(raw)} bytes, its header {dims} says {expected} ({how})")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


@dataclass
class IDXData:
    """Both splits in memory: ``images[split]`` ``uint8 (N, 1, 28, 28)``, ``labels[split]`` ``int64 (N,)``."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def _verify(raw: bytes, path: Path, spec: IDXDataSet, key: str) -> None:
    got = hashlib.sha256(raw).hexdigest()
    if got == spec.files[key].sha256:
        return
    other = [d.name for d in DATA_SETS.values() if d is not spec and d.files[key].sha256 == got]
    which = f": it is {other[0]}'s" if other else ""
    raise IDXError(f"{path} is not {spec.name}'s official {spec.files[key].name} (SHA-256 of its decompressed "
                   f"bytes {got[:16]}..., expected {spec.files[key].sha256[:16]}...){which}")


def read_idx_data(folder: str | Path, spec: IDXDataSet, full: bool = True) -> IDXData:
    """Read and check the four files in ``folder``. ``full`` requires the official counts and checksums;
    otherwise any count is accepted (subsets, generated test data), but a file with the official count must
    still be the official file, so another data set's files cannot pass for this one."""
    folder = Path(folder).expanduser()
    missing = [f.name for f in spec.files.values() if find(folder, f.name) is None]
    if missing:
        raise IDXError(f"{folder} lacks {', '.join(f'{m}.gz' for m in missing)} (the official {spec.name} files); "
                       f"run `nws data {spec.command} --root {folder}`")
    images, labels = {}, {}
    for split, count in SPLITS.items():
        arrays = {}
        for kind, ndim in (("images", 3), ("labels", 1)):
            key = f"{split}-{kind}"
            path = find(folder, spec.files[key].name)
            raw = read_bytes(path)
            arrays[kind] = parse_idx(raw, path, ndim)
            n = len(arrays[kind])
            if full and n != count:
                raise IDXError(f"{path} holds {n} {kind}, {spec.name} has {count}")
            if n == count:
                _verify(raw, path, spec, key)
        x, y = arrays["images"], arrays["labels"]
        if x.shape[1:] != (SIDE, SIDE):
            raise IDXError(f"{find(folder, spec.files[f'{split}-images'].name)} holds {x.shape[1]}x{x.shape[2]} "
                           f"images, {spec.name}'s are {SIDE}x{SIDE}")
        if len(x) != len(y):
            raise IDXError(f"{folder}: the {split} split has {len(x)} images but {len(y)} labels")
        if len(y) and y.max() > 9:
            raise IDXError(f"{find(folder, spec.files[f'{split}-labels'].name)} holds label {y.max()}; labels are 0-9")
        images[split], labels[split] = x[:, None], y.astype(np.int64)
    return IDXData(images, labels)


def _download(spec: IDXDataSet, missing: list[IDXFile], root: Path, mirrors: tuple[str, ...],
              progress: bool) -> str:
    """Download the ``missing`` files into ``root``, each from the first mirror that serves it; returns the
    mirror the last one came from."""
    used = ""
    for f in missing:
        errors: list[DownloadError] = []
        for base in mirrors:
            try:
                download(base + f"{f.name}.gz", root / f"{f.name}.gz", f.gz_md5, progress=progress)
            except DownloadError as err:
                errors.append(err)
                continue
            used = base
            break
        if len(errors) == len(mirrors):
            names = " ".join(f"{m.name}.gz" for m in missing)
            if all(isinstance(e, OfflineError) for e in errors):
                raise IDXError(f"{errors[0]}: offline? Download {names} from {mirrors[0]} elsewhere and put them "
                               f"in {root}, then run this command again")
            raise IDXError("; ".join(str(e) for e in errors))
    return used


def prepare(root: str | Path, data_set: str = "fashion-mnist", mirrors: tuple[str, ...] | None = None,
            progress: bool = True) -> tuple[Path, str]:
    """``nws data fashion-mnist|mnist``: make ``root`` hold the four official files and verify them; returns
    ``root`` and a one-line account of what was done.

    Files already in ``root`` (``.gz`` or plain, e.g. Debian's ``/usr/share/datasets/fashion-mnist``) are
    used as they are and never rewritten; only missing ones are downloaded (MD5 of the ``.gz`` checked, then
    the decompressed contents like every other file). Offline, :class:`IDXError` says what to put where."""
    spec = DATA_SETS[data_set]
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise IDXError(f"{root} is not a directory")
    missing = [f for f in spec.files.values() if find(root, f.name) is None]
    present = [f for f in spec.files.values() if f not in missing]
    how = []
    if present:
        paths = {f: find(root, f.name) for f in present}
        recompressed = sum(1 for f, p in paths.items() if p.suffix == ".gz" and md5sum(p) != f.gz_md5)
        note = f", {recompressed} recompressed (their .gz differs from the official download's)" if recompressed else ""
        how.append(f"used the {len(present)} file{'s' * (len(present) > 1)} already there{note}")
    if missing:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise IDXError(f"cannot create {root} ({err.strerror})") from None
        if not os.access(root, os.W_OK):
            raise IDXError(f"{root} lacks {', '.join(f'{f.name}.gz' for f in missing)} and is not writable; "
                           "choose another --root")
        mirror = _download(spec, missing, root, mirrors or spec.mirrors, progress)
        how.append(f"downloaded {len(missing)} from {mirror} (MD5 verified)")
    data = read_idx_data(root, spec, full=True)
    return root, (f"{root} is ready: {' and '.join(how)}; {len(data.labels['train'])} train, "
                  f"{len(data.labels['test'])} test images, decompressed SHA-256 verified")


def load_idx_data(root: str | Path | None, spec: IDXDataSet, what: str) -> IDXData:
    """:func:`read_idx_data` (not necessarily full) of ``root``, which ``what`` (a config key) names."""
    if root is None:
        raise IDXError(f"{what} must be the folder holding {spec.name}'s four IDX files (.gz or plain); "
                       f"`nws data {spec.command} --root DIR` gets and verifies them")
    return read_idx_data(root, spec, full=False)


def image_side(image_size: int | None) -> int:
    """The input side: 28 (native) by default; larger sizes zero-pad the images (32 for a CIFAR-stem ResNet)."""
    size = SIDE if image_size is None else int(image_size)
    if size < SIDE:
        raise NWSError(f"data.image_size for split_fashion_mnist must be at least {SIDE} (images are padded, "
                       f"never cropped), got {size}")
    return size


def array_task(name: str, classes: list[str], images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
               size: int) -> Task:
    """A task of ``uint8 (N, 1, 28, 28)`` images, padded to ``size`` and normalised with the mean and std of
    its own training images."""
    if not len(labels["train"]):
        raise IDXError(f"task {name} has no training images")
    mean, std = channel_stats(images["train"])
    transform = mnist_transforms(mean, std, size)
    return Task(name, classes, *(ArrayImages(images[s], labels[s], transform) for s in ("train", "test")))


def split_tasks(data: IDXData, size: int, pairs: Sequence[tuple[int, int]] = PAIRS) -> list[Task]:
    """Two-class tasks, one per pair of classes (by default the five of the literature, in its order: 0/1, 2/3,
    4/5, 6/7, 8/9), labelled 0 and 1."""
    tasks = []
    for a, b in pairs:
        masks = {s: (data.labels[s] == a) | (data.labels[s] == b) for s in SPLITS}
        images = {s: data.images[s][masks[s]] for s in SPLITS}
        labels = {s: (data.labels[s][masks[s]] == b).astype(np.int64) for s in SPLITS}
        tasks.append(array_task(f"fashion-mnist {a}/{b}", [FASHION_CLASSES[a], FASHION_CLASSES[b]], images, labels,
                                size))
    return tasks


def digits_source(size: int, seed: int) -> Task:
    """The pool-pretraining task from scikit-learn's 8x8 digits in MNIST's layout (all 10 digits, a seeded
    held-out fifth for testing); see :func:`nws.data.digits.mnist_layout`."""
    from nws.data.digits import load_digits_arrays, mnist_layout

    images, labels = load_digits_arrays()
    images = mnist_layout(images)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = len(order) // 5
    split = {"train": order[n_test:], "test": order[:n_test]}
    return array_task("source: digits 0-9 (8x8 as 28x28)", [str(d) for d in range(10)],
                      {s: images[i] for s, i in split.items()}, {s: labels[i] for s, i in split.items()}, size)


def all_pairs(seed: int) -> list[tuple[int, int]]:
    """Every pair of the ten classes (45), in an order drawn from ``seed``."""
    pairs = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    return [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]


def split_fashion_mnist(root: str | Path | None, source: str | None, source_root: str | None,
                        image_size: int | None, seed: int = 0, pairs: Sequence[tuple[int, int]] = PAIRS) -> Benchmark:
    """Split-Fashion-MNIST from the files at ``root``, one two-class task per pair in ``pairs``. The
    pool-pretraining source is ``digits`` (the default: the embedded digits, no files), ``mnist`` (all 10 MNIST
    digits, the official files at ``source_root``) or ``none`` (pools from a pretraining run). ``image_size``
    (default 28) zero-pads every image, source and tasks alike."""
    size = image_side(image_size)
    tasks = split_tasks(load_idx_data(root, FASHION_MNIST, "data.root"), size, pairs)
    source = source or "digits"
    if source == "digits":
        src = digits_source(size, seed)
    elif source == "mnist":
        data = load_idx_data(source_root, MNIST, "data.source_root")
        src = array_task("source: mnist 0-9", [str(d) for d in range(10)], data.images, data.labels, size)
    elif source == "none":
        src = None
    else:
        raise NWSError(f"data.source for split_fashion_mnist must be digits, mnist or none, got {source!r}")
    return Benchmark(source=src, tasks=tasks, in_channels=1)


def check_split_fashion_mnist(roots: list[Path]) -> list[dict]:
    """``nws data check``: the Fashion-MNIST IDX files under the root, verified."""
    data = load_idx_data(roots[0], FASHION_MNIST, "--root")
    return [{"name": "fashion-mnist", "classes": 10, "train": len(data.labels["train"]),
             "test": len(data.labels["test"])}]


@register_benchmark("split_fashion_mnist", "five two-class Fashion-MNIST tasks (0/1, 2/3, ..., 8/9), 28x28",
                    check=check_split_fashion_mnist)
def build_split_fashion_mnist(request: DataRequest) -> Benchmark:
    return split_fashion_mnist(request.root, request.source, request.source_root, request.image_size,
                               seed=request.seed)


@register_benchmark("fashion_mnist_pairs", "45 two-class Fashion-MNIST tasks, every pair of the ten classes, in an "
                    "order drawn from the seed (a long real sequence), 28x28", check=check_split_fashion_mnist)
def build_fashion_mnist_pairs(request: DataRequest) -> Benchmark:
    return split_fashion_mnist(request.root, request.source, request.source_root, request.image_size,
                               seed=request.seed, pairs=all_pairs(request.seed))
