"""A small task store built without training (random pools and weights), for the store, fuzz and CLI tests.

Its manifest names the digits benchmark, so ``nws eval`` can evaluate it; the tasks are the benchmark's five
two-digit tasks with untrained weights.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nws.convert import freeze_pools, nws_layers
from nws.methods.base import resize_classifier
from nws.methods.nws import TaskStore
from nws.spec import ModelSpec
from nws.store import MANIFEST, manifest_bytes, sha256

SPEC = ModelSpec("convnet", 10, {"in_channels": 1, "widths": [8, 16]}, pool_size=16, group_size=1)


def make_store(root: Path, num_tasks: int = 5, seed: int = 0, spec: ModelSpec = SPEC,
               key_every: int | None = None, bn_dtype: str = "float32") -> TaskStore:
    """A complete store at ``root``: pools, source network, reference and ``num_tasks`` tasks (indices 0 ..),
    each coded against the reference, or with ``key_every`` against the previous task except every
    ``key_every``-th (``model.code_reference: previous``); BatchNorm stored as ``bn_dtype``."""
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        for _, layer in nws_layers(model):
            layer.pool.codebook.normal_()
    freeze_pools(model)
    store = TaskStore(root, create=True)
    store.manifest["config"] = {"seed": 1993, "data": {"name": "digits", "root": None}}
    store.save_pools(model, spec)
    store.save_source(model, spec)
    store.save_reference()
    store.manifest["source"] = {"name": "source", "accuracy": 0.5}
    store.write_manifest()
    for i in range(num_tasks):
        task = TaskStore(root).load_source()
        torch.manual_seed(1000 * seed + i)  # each task's draws its own, whatever the store drew before
        resize_classifier(task, "fc", 2, seed=i)
        with torch.no_grad():
            for p in task.parameters():
                p.add_(0.1 * torch.randn_like(p))
            for name, buf in task.named_buffers():
                if name.endswith("running_mean"):
                    buf.normal_()
        against = i - 1 if key_every and i % key_every else "source"
        store.save_task(i, task, f"digits {2 * i}/{2 * i + 1}", [str(2 * i), str(2 * i + 1)], against, bn_dtype,
                        acc_after_training=0.5, float32_model=1000)
    return TaskStore(root)


def load_everything(root: Path) -> TaskStore:
    """Open the store and rebuild all it holds (pools, source, every task); raises what the store raises."""
    store = TaskStore(root)
    store.pools()
    store.load_source()
    for t in store.tasks():
        store.model(t["index"])
    return store


def tensor_span(data: bytes, key: str) -> tuple[int, int]:
    """Where tensor ``key``'s bytes lie in a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def reseal(root: Path, name: str) -> None:
    """Record ``name``'s current bytes in the manifest (size, sha256, checksum), as if it had been written so:
    the readers then see the file's content itself, not just a checksum mismatch."""
    manifest = json.loads((root / MANIFEST).read_bytes())
    data = (root / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
    (root / MANIFEST).write_bytes(manifest_bytes(manifest))


def edit_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """A safetensors file's bytes with its JSON header changed by ``edit`` (the tensor data unchanged)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


def edit_meta(data: bytes, key: str, edit: Callable[[Any], Any]) -> bytes:
    """A file's bytes with its metadata entry ``key`` (JSON-decoded) replaced by ``edit(value)``."""
    def change(header: dict[str, Any]) -> None:
        meta = header["__metadata__"]
        meta[key] = json.dumps(edit(json.loads(meta[key])))

    return edit_header(data, change)
