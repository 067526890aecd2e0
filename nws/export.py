"""A task's network as a file that runs without nws, with how its inputs are prepared.

``export(run, task, format, out)`` writes task ``task``'s plain network (NWS layers materialised: ordinary
``Conv2d``/``Linear`` with the searched weights; any method's run) as

- ``safetensors``: its state dict (the keys of the unconverted model's), and in the metadata the task, its
  classes, its preparation and, where the run was made by ``nws run`` with a registered builder, the
  ``architecture`` (``nws.models`` builder name, arguments, number of classes). Loading it needs the network's
  Python class: your own model's, or nws's builder (``docs/integrate.md``);
- ``torchscript``: ``torch.jit.trace`` of it (``torch.jit.load``: needs torch only), the preparation inside as
  the extra file ``preparation.json``;
- ``onnx``: ``torch.onnx.export`` (the ``torch.export`` based exporter: needs the ``onnx`` and ``onnxscript``
  packages, ``pip install neural-weight-search[onnx]``), a dynamic batch axis, input ``input``, output
  ``logits``, the preparation in the model's metadata (``nws_export``); onnxruntime runs it.

Beside ``out`` goes ``<out without suffix>.json``: the task, its classes, its preparation, the input's shape and
names (the same for every format). The files are written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nws.errors import NWSError
from nws.serve import TaskServer
from nws.store import atomic_write

FORMATS = ("safetensors", "torchscript", "onnx")
EXPORT_FORMAT = "nws-export"
EXPORT_VERSION = 1
INPUT, OUTPUT = "input", "logits"


class ExportError(NWSError):
    """An export that cannot be made: a bad output path, a missing optional package."""


def description(server: TaskServer, index: int) -> dict[str, Any]:
    """What the JSON beside an exported file says: the task, its classes, its preparation, input and output."""
    preparation = server.preparation(index)
    task = next(t for t in server.tasks if t["index"] == index)
    described = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "run": str(Path(server.store.root).resolve()),
                 "method": server.store.method, "task": task, "preparation": preparation.to_json(),
                 "input": {"name": INPUT, "shape": ["batch", *preparation.input_shape]},
                 "output": {"name": OUTPUT, "shape": ["batch", len(task["classes"])], "classes": task["classes"]}}
    architecture = _architecture(server, index)
    if architecture is not None:
        described["architecture"] = architecture
    return described


def _architecture(server: TaskServer, index: int) -> dict[str, Any] | None:
    """The ``nws.models`` builder, arguments and class count that make the task's plain network (its state dict
    loads into it exactly), as the run's config names them; None where it does not (a run made otherwise)."""
    from nws.models import create_model

    config = server.store.manifest.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return None
    kwargs = {"in_channels": server.preparation(index).channels, **(model.get("kwargs") or {})}
    classes = len(server.classes(index))
    try:
        create_model(model["name"], num_classes=classes, **kwargs).load_state_dict(server.network(index).state_dict())
    except (NWSError, TypeError, ValueError, RuntimeError, KeyError):
        return None
    return {"builder": model["name"], "kwargs": kwargs, "num_classes": classes}


def _safetensors(network: nn.Module, described: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    meta = {"format": EXPORT_FORMAT, **{k: json.dumps(described[k]) for k in ("task", "preparation", "input",
                                                                          "output", "architecture") if k in described}}
    return save(state, metadata=meta)


def _torchscript(network: nn.Module, example: torch.Tensor, described: dict[str, Any]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"preparation.json": json.dumps(described)})
    return buffer.getvalue()


def _onnx(network: nn.Module, example: torch.Tensor, described: dict[str, Any]) -> bytes:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise ExportError(f"--format onnx needs the package {err.name}: pip install 'neural-weight-search[onnx]'") \
            from None
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # e.g. that torchvision's operators are not registered
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(network, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    finally:
        logger.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"nws_export": json.dumps(described)})
    return proto.SerializeToString()


def export(run: str | os.PathLike, task: int | str, fmt: str, out: str | os.PathLike) -> list[Path]:
    """Write task ``task`` of the run at ``run`` as ``fmt`` (one of :data:`FORMATS`) to ``out``, and its
    description (:func:`description`) beside it as ``<out without suffix>.json``; returns both paths."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    beside = out.with_suffix(".json")
    if out.suffix == ".json":
        raise ExportError(f"--out {out}: a .json name is the description's; name the network file otherwise")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist")
    server = TaskServer(run, cache_size=1)
    index = server.index(task)
    described = description(server, index)
    network = server.network(index)
    example = torch.zeros(1, *described["preparation"]["input_shape"])
    if fmt == "safetensors":
        data = _safetensors(network, described)
    elif fmt == "torchscript":
        data = _torchscript(network, example, described)
    else:
        data = _onnx(network, example, described)
    try:
        atomic_write(out, data)
        atomic_write(beside, (json.dumps(described, indent=1) + "\n").encode())
    except OSError as err:
        raise ExportError(f"cannot write {out} ({err.strerror or err})") from None
    return [out, beside]


__all__ = ["EXPORT_FORMAT", "ExportError", "FORMATS", "description", "export"]
