"""Split-digits: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).

The images are split per class: 40% form the source task (all 10 digits) that the pools are pretrained
on; the other 60% form five tasks of two digits each (0/1, 2/3, 4/5, 6/7, 8/9, as in Split-MNIST), each
split 2:1 into train and test. No image is in two places.

:func:`mnist_layout` brings the same images to MNIST's layout, as the source task of benchmarks on 28x28 data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nws.data.base import Benchmark, Task
from nws.data.preparation import Preparation
from nws.data.registry import DataRequest, register_benchmark
from nws.errors import NWSError

SOURCE_FRACTION = 0.4
TASK_TRAIN_FRACTION = 2 / 3
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``float64 (1797, 8, 8)`` images with values 0-16, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def mnist_layout(images: np.ndarray) -> np.ndarray:
    """8x8 digits (values 0-16) as MNIST lays digits out: scaled to 0-255, resized (bilinear) to a 20x20 box
    and centred in 28x28 with a zero border of 4, as ``uint8 (N, 1, 28, 28)``."""
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x.clamp(0, 1).mul(255).round().to(torch.uint8), (4, 4, 4, 4))
    return x.numpy()


# The digits are 8x8 arrays of values 0-16, scaled to [0, 1] and normalised to [-1, 1]; as image files: 8x8
# grayscale, pixel 255 standing for 16.
PREPARATION = Preparation("L", ({"step": "to_tensor", "mode": "L"}, {"step": "normalize", "mean": [0.5], "std": [0.5]}),
                          (8, 8), "an 8x8 grayscale digit, white on black; pixel 255 stands for the digits' 16")


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    return TensorDataset((x - 0.5) / 0.5, torch.from_numpy(labels.astype(np.int64)))


def digits_benchmark(seed: int = 0) -> Benchmark:
    """The source task and the five two-digit tasks, split deterministically by ``seed``."""
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    source, train, test = [], [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_source = round(len(idx) * SOURCE_FRACTION)
        rest = idx[n_source:]
        n_train = round(len(rest) * TASK_TRAIN_FRACTION)
        source.append(idx[:n_source])
        train.append(rest[:n_train])
        test.append(rest[n_train:])
    src = np.concatenate(source)
    # The source task keeps its own held-out fifth, to report the pretrained network's accuracy.
    src = rng.permutation(src)
    n_src_test = len(src) // 5
    names = [str(d) for d in range(10)]
    source_task = Task("source: digits 0-9", names, _dataset(images[src[n_src_test:]], labels[src[n_src_test:]]),
                       _dataset(images[src[:n_src_test]], labels[src[:n_src_test]]), PREPARATION)
    tasks = []
    for pair in PAIRS:
        tr = np.concatenate([train[d] for d in pair])
        te = np.concatenate([test[d] for d in pair])
        remap = {d: i for i, d in enumerate(pair)}
        relabel = np.vectorize(remap.__getitem__)
        tasks.append(Task(f"digits {pair[0]}/{pair[1]}", [str(d) for d in pair],
                          _dataset(images[tr], relabel(labels[tr])), _dataset(images[te], relabel(labels[te])),
                          PREPARATION))
    return Benchmark(source=source_task, tasks=tasks, in_channels=1)


@register_benchmark("digits", "the embedded demo: scikit-learn's 8x8 digits, a source split and five two-digit "
                    "tasks (no files)")
def build_digits(request: DataRequest) -> Benchmark:
    """:func:`digits_benchmark`; its own source split, or none (``data.source: none``)."""
    if request.source not in (None, "none"):
        raise NWSError(f"the digits benchmark has its own source split; data.source must be unset or none, "
                       f"got {request.source!r}")
    bench = digits_benchmark(seed=request.seed)
    if request.source == "none":
        bench.source = None
    return bench
