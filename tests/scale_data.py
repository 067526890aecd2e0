"""Generated data in the real on-disk formats, for the data, engine and config tests.

- :func:`make_cifar100_archive`: ``cifar-100-python.tar.gz`` with ``train``, ``test`` and ``meta`` pickled as
  the official files are (Python 2 pickles: byte strings as ``BINSTRING``, NumPy arrays rebuilt by
  ``numpy.core.multiarray._reconstruct``), with CIFAR-100's real class and superclass names.
- :func:`make_image_folders`: ``<root>/<split>/<class>/<image>.jpg|png`` trees (CUB-to-Sketches, ImageNet).
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# CIFAR-100's superclasses (coarse label order) and their classes, as in the official ``meta`` file.
CIFAR100_HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
COARSE_NAMES = list(CIFAR100_HIERARCHY)
FINE_NAMES = sorted(c for cs in CIFAR100_HIERARCHY.values() for c in cs)  # fine labels are alphabetical
COARSE_OF = {FINE_NAMES.index(c): COARSE_NAMES.index(s) for s, cs in CIFAR100_HIERARCHY.items() for c in cs}


class Py2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 byte strings (``BINSTRING``), as the official files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2's NumPy named its module numpy.core.multiarray (NumPy 2 writes numpy._core.multiarray).
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar100_arrays(per_class: dict[str, int], seed: int = 0) -> dict[str, dict]:
    """Random images with ``per_class[split]`` images of every one of the 100 classes."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_class.items():
        fine = np.repeat(np.arange(100), n)
        rng.shuffle(fine)
        # Each class gets its own brightness, so a network can tell the classes apart a little.
        base = (fine * 2.5).astype(np.int64)[:, None]
        data = np.clip(base + rng.integers(0, 60, size=(len(fine), 3072)), 0, 255).astype(np.uint8)
        out[split] = {"batch_label": f"{split}ing batch 1 of 1",
                      "filenames": [f"img_{i}.png" for i in range(len(fine))],
                      "fine_labels": fine.tolist(), "coarse_labels": [COARSE_OF[int(f)] for f in fine],
                      "data": data}
    return out


def make_cifar100_archive(root: Path, train: int = 3, test: int = 1, seed: int = 0) -> Path:
    """``root/cifar-100-python.tar.gz`` with ``train``/``test`` images per class; returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {split: py2_pickle(d) for split, d in cifar100_arrays({"train": train, "test": test}, seed).items()}
    files["meta"] = py2_pickle({"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES})
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("file.txt~", "meta", "test", "train"):
            data = files.get(name, b"")
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def make_image_folders(root: Path, classes: list[str], splits: dict[str, int], size: tuple[int, int] = (20, 14),
                       seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.jpg`` (every other class as PNG), ``splits[split]`` images per class."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for k, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = (k * 37 % 256, k * 91 % 256, (k * 13 + 60) % 256)
                pixels = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                image.save(folder / (f"{i}.png" if k % 2 else f"{i}.jpg"))
    return Path(root)


def make_cub2sketches(root: Path, per_class: int = 1) -> Path:
    """The five fine-grained data sets with their real class counts, ``per_class`` images per class and split."""
    from nws.data.folders import CUB2SKETCHES

    for name, count in CUB2SKETCHES:
        make_image_folders(Path(root) / name, [f"{name[:4]}_{i:03d}" for i in range(count)],
                           {"train": per_class, "test": per_class}, size=(12, 9))
    return Path(root)
