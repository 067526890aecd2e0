"""A model spec: everything needed to rebuild a searchable model (builder, its arguments, NWS settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nws.convert import convert
from nws.errors import StoreError
from nws.models import create_model


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (JSON's integers, as readers of untrusted metadata must check them)."""
    return isinstance(value, int) and not isinstance(value, bool)


def str_list(value: Any) -> bool:
    """A list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a searchable model: builder name and kwargs, classes, NWS settings, and
    ``biases``: Conv2d or Linear layers given a bias the builder does not make (models of runs made before the
    builders dropped their biases, as ``nws upgrade`` records them)."""

    name: str
    num_classes: int
    kwargs: dict[str, Any]
    pool_size: int
    group_size: int
    exclude: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The converted model (pools still random: load them with :func:`load_pools_into`)."""
        model = create_model(self.name, num_classes=num_classes or self.num_classes, **self.kwargs)
        for name in self.biases:
            layer = dict(model.named_modules()).get(name)
            if not (isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is None):
                raise ValueError(f"{name!r} is not a Conv2d or Linear layer without a bias")
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        return convert(model, pool_size=self.pool_size, group_size=self.group_size, exclude=list(self.exclude))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "kwargs": self.kwargs,
                "pool_size": self.pool_size, "group_size": self.group_size, "exclude": list(self.exclude),
                **({"biases": list(self.biases)} if self.biases else {})}

    @classmethod
    def from_json(cls, d: Any, what: str = "file metadata") -> ModelSpec:
        """The spec in ``d`` (as :meth:`to_json` writes it); :class:`StoreError` for anything else."""
        ok = (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("kwargs"), dict)
              and all(is_int(d.get(k)) and d[k] >= 1 for k in ("num_classes", "pool_size", "group_size"))
              and str_list(d.get("exclude")) and str_list(d.get("biases", [])))
        if not ok:
            raise StoreError(f"{what} has a bad model spec")
        return cls(d["name"], d["num_classes"], dict(d["kwargs"]), d["pool_size"], d["group_size"],
                   tuple(d["exclude"]), tuple(d.get("biases", [])))
