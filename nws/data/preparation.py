"""How an image file becomes a task's input: the task's test-time transform, as data.

Every run records each task's :class:`Preparation` in its manifest (the runner does, for every method and every
benchmark that describes its data), so that ``nws predict``, ``nws export`` and :class:`nws.serve.TaskServer`
apply to a user's image exactly what the task's test images went through. As JSON::

    {"mode": "RGB", "size": null,
     "steps": [{"step": "resize", "shorter_side": 256}, {"step": "center_crop", "size": 224},
               {"step": "to_tensor", "mode": "RGB"},
               {"step": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}],
     "input_shape": [3, 224, 224], "mean": [...], "std": [...], "note": ""}

An image is decoded (Pillow), converted to ``mode`` (``L``: one channel, ``RGB``: three), resized (bilinear) to
``size`` (height, width) where that is set and the image differs, then put through ``steps`` in order
(:mod:`nws.data.transforms`: ``resize`` to ``size`` or to a ``shorter_side``, ``center_crop``, ``to_tensor``:
pixel / 255, ``pad_to``: zero padding, ``normalize``: ``(x - mean) / std`` per channel). ``input_shape`` is
the tensor the network takes (without the batch axis); ``mean`` and ``std`` repeat the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor

from nws.data.transforms import Compose, Resize, step_from_json
from nws.errors import NWSError

MODES = {"L": 1, "RGB": 3}


class PreparationError(NWSError):
    """A recorded preparation that cannot be read, or an image it cannot be applied to."""


@dataclass(frozen=True)
class Preparation:
    """How an image file becomes a task's input tensor (see the module docstring): its ``mode`` (``L`` or
    ``RGB``), the ``size`` (height, width) of the task's images if they all have one (a file of another size is
    resized to it first), the ``steps`` of the test-time transform, and a ``note`` for a reader."""

    mode: str
    steps: tuple[dict[str, Any], ...]
    size: tuple[int, int] | None = None
    note: str = ""
    _transform: Compose = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PreparationError(f"preparation: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            transform = Compose([step_from_json(s) for s in self.steps])
        except ValueError as err:
            raise PreparationError(f"preparation: {err}") from None
        if not any(s.get("step") == "to_tensor" for s in self.steps):
            raise PreparationError("preparation: no to_tensor step")
        object.__setattr__(self, "_transform", transform)

    @classmethod
    def of(cls, mode: str, transform: Compose, size: Sequence[int] | None = None, note: str = "") -> Preparation:
        """The preparation whose steps are ``transform``'s (a deterministic test-time transform)."""
        return cls(mode, tuple(transform.to_json()), None if size is None else (int(size[0]), int(size[1])), note)

    @property
    def channels(self) -> int:
        return MODES[self.mode]

    def _normalize(self) -> dict[str, Any]:
        return next((s for s in self.steps if s.get("step") == "normalize"), {})

    @property
    def mean(self) -> list[float] | None:
        return self._normalize().get("mean")

    @property
    def std(self) -> list[float] | None:
        return self._normalize().get("std")

    def transform(self) -> Compose:
        """The steps alone: for an image already of ``mode`` and ``size``, or a ``uint8 (C, H, W)`` tensor."""
        return self._transform

    def __call__(self, image: Image.Image) -> Tensor:
        """``image`` (any Pillow image) as the network's input ``(C, H, W)``."""
        image = image.convert(self.mode)
        if self.size is not None and image.size != (self.size[1], self.size[0]):
            image = Resize(self.size)(image)
        return self._transform(image)

    @property
    def input_shape(self) -> list[int]:
        """The input tensor's shape ``[C, H, W]``."""
        probe = Image.new(self.mode, (self.size[1], self.size[0]) if self.size else (64, 48))
        return list(self(probe).shape)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": None if self.size is None else list(self.size),
                "steps": [dict(s) for s in self.steps], "input_shape": self.input_shape, "mean": self.mean,
                "std": self.std, "note": self.note}

    @classmethod
    def from_json(cls, d: Any, what: str = "preparation") -> Preparation:
        """The preparation a run recorded; :class:`PreparationError` naming ``what`` for anything else."""
        try:
            size = d.get("size")
            if size is not None and not (isinstance(size, list) and len(size) == 2
                                         and all(isinstance(v, int) and v > 0 for v in size)):
                raise PreparationError(f"bad size {size!r}")
            if not isinstance(d["steps"], list) or not isinstance(d.get("note", ""), str):
                raise PreparationError("bad steps or note")
            return cls(d["mode"], tuple(d["steps"]), None if size is None else (size[0], size[1]), d.get("note", ""))
        except (AttributeError, KeyError, TypeError, PreparationError) as err:
            raise PreparationError(f"{what} is not a preparation nws reads ({err})") from None
