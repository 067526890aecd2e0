"""Image transforms on Pillow images and torch tensors (no torchvision): the reference's augmentations.

Random choices draw from torch's global generator, which the DataLoader seeds separately in every worker,
so workers never repeat each other's crops. Geometric transforms take a Pillow image (decoded in the
worker) or a ``(C, H, W)`` tensor where noted; :class:`ToTensor` turns a Pillow image (or a ``uint8``
tensor) into a float tensor in ``[0, 1]``; :class:`Normalize` and :class:`Cutout` act on tensors.

The deterministic transforms (those of test time) are also data: ``to_json()`` gives a step such as
``{"step": "resize", "size": [224, 224]}`` and :func:`step_from_json` makes the transform again, so that a run
records how its inputs are prepared (:mod:`nws.data.preparation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(high: int) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(high, ()).item())


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(t).__name__ for t in self.transforms)})"

    def to_json(self) -> list[dict[str, Any]]:
        """The steps as data; ``ValueError`` if one is random or not describable (a training transform)."""
        steps = []
        for t in self.transforms:
            if not hasattr(t, "to_json"):
                raise ValueError(f"{type(t).__name__} is not a deterministic, describable step")
            steps.append(t.to_json())
        return steps


class Resize:
    """Bilinear resize of a Pillow image: an int sets the shorter side (aspect kept), a pair ``(h, w)`` the
    exact size."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            if w <= h:
                new = (self.size, max(1, round(h * self.size / w)))
            else:
                new = (max(1, round(w * self.size / h)), self.size)
        else:
            new = (self.size[1], self.size[0])
        return img if new == (w, h) else img.resize(new, Image.BILINEAR)

    def to_json(self) -> dict[str, Any]:
        if isinstance(self.size, int):
            return {"step": "resize", "shorter_side": self.size}
        return {"step": "resize", "size": list(self.size)}


class CenterCrop:
    """The central ``size x size`` region of a Pillow image (zero-padded if the image is smaller)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    def to_json(self) -> dict[str, Any]:
        return {"step": "center_crop", "size": self.size}


class RandomResizedCrop:
    """A random region of ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform), resized to
    ``size x size``; after 10 failed draws, the central crop of the nearest valid ratio (as in the
    Inception-style augmentation the reference uses)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, w, h)`` of the crop for an image of ``width x height``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(width - w + 1), _randint(height - h + 1), w, h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, w, h = self.box(*img.size)
        return img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; takes a Pillow image or a ``(..., H, W)`` tensor."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x):
        if torch.rand(()).item() >= self.p:
            return x
        if isinstance(x, Image.Image):
            return x.transpose(Image.FLIP_LEFT_RIGHT)
        return x.flip(-1)


class RandomCrop:
    """A random ``size x size`` crop of a ``(C, H, W)`` tensor zero-padded by ``padding`` on every side."""

    def __init__(self, size: int, padding: int = 0):
        self.size, self.padding = size, padding

    def __call__(self, x: Tensor) -> Tensor:
        if self.padding:
            x = torch.nn.functional.pad(x, (self.padding,) * 4)
        h, w = x.shape[-2:]
        top, left = _randint(h - self.size + 1), _randint(w - self.size + 1)
        return x[..., top:top + self.size, left:left + self.size]


class PadTo:
    """Zero-pad a ``(C, H, W)`` tensor on all sides to ``size x size``, centred (an odd remainder goes to the
    bottom and right); a tensor already that size is returned as it is."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            return x
        top, left = (self.size - h) // 2, (self.size - w) // 2
        return torch.nn.functional.pad(x, (left, self.size - w - left, top, self.size - h - top))

    def to_json(self) -> dict[str, Any]:
        return {"step": "pad_to", "size": self.size}


class ToTensor:
    """A Pillow image, converted to ``mode`` (``RGB``: 3 channels, ``L``: 1), as a float ``(C, H, W)`` tensor in
    ``[0, 1]`` (pixel / 255); a ``uint8 (C, H, W)`` tensor (images held in memory) is scaled the same way."""

    def __init__(self, mode: str = "RGB"):
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be RGB or L, got {mode!r}")
        self.mode = mode

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        if isinstance(img, Tensor):
            return img.float().div_(255.0)
        array = np.asarray(img.convert(self.mode), dtype=np.uint8)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def to_json(self) -> dict[str, Any]:
        return {"step": "to_tensor", "mode": self.mode}


class ToFloat:
    """A ``uint8`` ``(C, H, W)`` tensor as float in ``[0, 1]``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0)


class Normalize:
    """``(x - mean) / std`` per channel of a ``(C, H, W)`` float tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def to_json(self) -> dict[str, Any]:
        return {"step": "normalize", "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


class Cutout:
    """Zero a ``length x length`` square (clipped at the borders) centred on a uniformly random pixel of a
    ``(C, H, W)`` tensor (DeVries & Taylor; the reference applies it after normalisation)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        cy, cx = _randint(h), _randint(w)
        half = self.length // 2
        x = x.clone()
        x[..., max(0, cy - half):min(h, cy + half), max(0, cx - half):min(w, cx + half)] = 0.0
        return x


STEPS: dict[str, Callable[..., Callable]] = {
    "resize": lambda size=None, shorter_side=None: Resize(shorter_side if size is None else tuple(size)),
    "center_crop": CenterCrop, "pad_to": PadTo, "to_tensor": ToTensor, "normalize": Normalize}


def _side(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and math.isfinite(x) for x in v)


def _well_formed(step: dict[str, Any]) -> bool:
    args = {k: v for k, v in step.items() if k != "step"}
    kind = step["step"]
    if kind == "resize":
        return (set(args) == {"size"} and isinstance(args["size"], list) and len(args["size"]) == 2
                and all(map(_side, args["size"]))) or (set(args) == {"shorter_side"} and _side(args["shorter_side"]))
    if kind in ("center_crop", "pad_to"):
        return set(args) == {"size"} and _side(args["size"])
    if kind == "to_tensor":
        return set(args) <= {"mode"}
    return (set(args) == {"mean", "std"} and _numbers(args["mean"]) and _numbers(args["std"])
            and len(args["mean"]) == len(args["std"]) and all(x > 0 for x in args["std"]))


def step_from_json(step: dict[str, Any]) -> Callable:
    """The transform a step describes (its ``to_json``); ``ValueError`` for an unknown or malformed step."""
    if not isinstance(step, dict) or step.get("step") not in STEPS:
        raise ValueError(f"unknown step {step!r} (known: {', '.join(STEPS)})")
    if not _well_formed(step):
        raise ValueError(f"malformed step {step!r}")
    try:
        return STEPS[step["step"]](**{k: v for k, v in step.items() if k != "step"})
    except (TypeError, ValueError) as err:
        raise ValueError(f"malformed step {step!r} ({err})") from None


def folder_transforms(image_size: int, cropped: bool, train: bool) -> Compose:
    """The reference's transforms for image-folder data (fine-grained sets, ImageNet), at ``image_size``.

    Pre-cropped sets (CUB, Cars): resize to ``image_size`` square; others: resize the shorter side to
    ``image_size * 256 / 224``, then a random-resized crop (train) or the centre crop (test). Train adds a
    horizontal flip and, after ImageNet normalisation, cutout 16.
    """
    resize = round(image_size * 256 / 224)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if cropped:
        geometry: list[Callable] = [Resize((image_size, image_size))]
    elif train:
        geometry = [Resize(resize), RandomResizedCrop(image_size)]
    else:
        geometry = [Resize(resize), CenterCrop(image_size)]
    if not train:
        return Compose([*geometry, ToTensor(), norm])
    return Compose([*geometry, RandomHorizontalFlip(), ToTensor(), norm, Cutout(16)])


def imagenet_transforms(image_size: int, train: bool) -> Compose:
    """Pool pretraining on ImageNet folders: random-resized crop and flip (train); resize and centre crop
    (val); ImageNet normalisation."""
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), ToTensor(), norm])
    return Compose([Resize(round(image_size * 256 / 224)), CenterCrop(image_size), ToTensor(), norm])


AUGMENTS = ("none", "light", "standard")


def task_folder_transforms(image_size: int, augment: str, train: bool) -> Compose:
    """Your own image folders (``data.name: folders``) at ``image_size``, ImageNet normalisation.

    ``standard``: the ImageNet recipe (random-resized crop and flip; test: resize the shorter side to
    ``image_size * 256 / 224`` and take the centre crop). ``light``, for small images, where such crops
    would cut away most of the picture: resize to ``image_size`` square, then (train) a random crop after
    zero-padding by an eighth of the side, and a flip. ``none``: resize to ``image_size`` square.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "standard":
        return imagenet_transforms(image_size, train)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    steps: list[Callable] = [Resize((image_size, image_size)), ToTensor()]
    if train and augment == "light":
        steps += [RandomCrop(image_size, padding=max(1, image_size // 8)), RandomHorizontalFlip()]
    return Compose([*steps, norm])


def cifar_transforms(mean: Sequence[float], std: Sequence[float], train: bool) -> Compose:
    """CIFAR on ``uint8 (3, 32, 32)`` tensors: random crop 32 with padding 4 and a flip (train), then
    normalisation with the given (per-task) mean and std."""
    norm = Normalize(mean, std)
    if train:
        return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToFloat(), norm])
    return Compose([ToTensor("RGB"), norm])


def mnist_transforms(mean: Sequence[float], std: Sequence[float], size: int) -> Compose:
    """MNIST-style ``uint8 (1, 28, 28)`` tensors (or grayscale images): scaled to ``[0, 1]``, zero-padded to
    ``size`` (the background is 0), then normalised with the given mean and std. No augmentation, as in the
    Split-(Fashion-)MNIST literature."""
    return Compose([ToTensor("L"), PadTo(size), Normalize(mean, std)])
