"""Image data sets held in memory as ``uint8`` arrays (CIFAR-100, MNIST, Fashion-MNIST): a dataset type and
the per-channel statistics used to normalise them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from nws.data.preparation import Preparation


class ArrayImages(Dataset):
    """``uint8 (N, C, H, W)`` images with labels, through a transform on each ``(C, H, W)`` tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]

    def preparation(self) -> Preparation | None:
        """How an image file becomes what this set gives: grayscale (one channel) or RGB, resized to the images'
        size, then the transform's steps; None for a transform that is not a deterministic one (training's)."""
        channels, height, width = self.images.shape[1:]
        try:
            return Preparation.of("L" if channels == 1 else "RGB", self.transform, (height, width))
        except (AttributeError, ValueError):
            return None


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``uint8 (N, C, H, W)`` images scaled to ``[0, 1]``.

    Computed from each channel's 256-bin histogram, so no float copy of the images is made (a float64 copy
    of 60,000 MNIST images would take 376 MB)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = float(counts @ values / n)
        var = float(counts @ (values - mean) ** 2 / n)
        means.append(mean)
        stds.append(var ** 0.5)
    return means, stds
