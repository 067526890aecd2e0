"""The task store: one directory per run holding the pools, one file per task, and a manifest.

Every file is safetensors (no pickle on any load path) with a format version and metadata: the model
spec and layer shapes, pool and group sizes, and for a task its classes and the fingerprint of the pools
it was encoded against. Writes are atomic (temporary file, fsync, rename), and the manifest records each
file's size and sha256, so a crash never leaves a half-written file under a final name and every read is
verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.codes import decode, encode
from nws.convert import convert, nws_layers
from nws.errors import NWSError
from nws.packing import pack_codes, unpack_codes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POOLS = "pools.safetensors"
SOURCE = "source.safetensors"


class StoreError(NWSError):
    """A store or file that cannot be used as asked (missing, corrupt, newer format, mismatched)."""


def task_file(index: int) -> str:
    return f"task_{index:03d}.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a searchable model: builder name and kwargs, classes, NWS settings."""

    name: str
    num_classes: int
    kwargs: dict[str, Any]
    pool_size: int
    group_size: int
    exclude: tuple[str, ...] = ()

    def build(self, num_classes: int | None = None) -> nn.Module:
        """The converted model (pools still random: load them with :func:`load_pools_into`)."""
        from nws.models import create_model

        model = create_model(self.name, num_classes=num_classes or self.num_classes, **self.kwargs)
        return convert(model, pool_size=self.pool_size, group_size=self.group_size, exclude=list(self.exclude))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "kwargs": self.kwargs,
                "pool_size": self.pool_size, "group_size": self.group_size, "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        try:
            return cls(str(d["name"]), int(d["num_classes"]), dict(d["kwargs"]), int(d["pool_size"]),
                       int(d["group_size"]), tuple(str(e) for e in d["exclude"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"bad model spec in file metadata ({err})") from None


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per NWS layer: weight shape, pool size and group size (what a task file must match)."""
    return {name: {"shape": list(layer.weight.shape), "entries": layer.pool.num_entries,
                   "group_size": layer.group_size} for name, layer in nws_layers(model)}


def pools_fingerprint(codebooks: dict[str, Tensor]) -> str:
    """sha256 over layer names and codebook bytes, in layer order: names one exact search space."""
    h = hashlib.sha256()
    for name, book in codebooks.items():
        h.update(name.encode() + b"\0")
        h.update(book.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def model_codebooks(model: nn.Module) -> dict[str, Tensor]:
    return {name: layer.pool.codebook for name, layer in nws_layers(model)}


# ----------------------------------------------------------------------------------- file format


def _pack(kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    header = {"format": kind, "version": str(FORMAT_VERSION), **{k: json.dumps(v) for k, v in meta.items()}}
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)


def _unpack(data: bytes, kind: str, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata of a safetensors file of ``kind``; :class:`StoreError` for anything else."""
    if len(data) < 8:
        raise StoreError(f"{what} is empty or truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise StoreError(f"{what} is truncated (header)")
    try:
        header = json.loads(data[8 : 8 + n])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict):
            raise ValueError("metadata is not a mapping")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise StoreError(f"{what} has a corrupt header ({err})") from None
    if raw.get("format") != kind:
        raise StoreError(f"{what} is not an nws {kind.removeprefix('nws-')} file (format {raw.get('format')!r})")
    try:
        version = int(raw.get("version", ""))
    except ValueError:
        raise StoreError(f"{what} has a corrupt format version") from None
    if version > FORMAT_VERSION:
        raise StoreError(f"{what} has format version {version}, newer than this nws reads ({FORMAT_VERSION});"
                         " upgrade nws")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on corrupt data
        raise StoreError(f"{what} is corrupt ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return tensors, meta


def _meta(meta: dict[str, Any], key: str, what: str) -> Any:
    if key not in meta:
        raise StoreError(f"{what} lacks its {key!r} metadata")
    return meta[key]


def split_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A task's stored state besides its codes: BatchNorm entries, and everything else (biases, unsearched layers).

    Searched weights (stored as codes) and pool buffers (stored once per run) are left out.
    """
    skip = set()
    for name, layer in nws_layers(model):
        prefix = f"{name}." if name else ""
        skip.add(prefix + "weight")
        skip.update(prefix + "pool." + b for b, _ in layer.pool.named_buffers())
    bn_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    bn, other = {}, {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        (bn if key.startswith(bn_prefixes) else other)[key] = value
    return bn, other


def nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pools_bytes(model: nn.Module, spec: ModelSpec) -> bytes:
    books = model_codebooks(model)
    return _pack("nws-pools", dict(books), {"spec": spec.to_json(), "layers": layer_shapes(model),
                                            "fingerprint": pools_fingerprint(books)})


def task_bytes(model: nn.Module, spec: ModelSpec, task: dict[str, Any], pools_sha: str) -> tuple[bytes, dict[str, int]]:
    """A task file's bytes, and its size split into indices / batchnorm / other (summing to the file size)."""
    codes = encode(model)
    packed = pack_codes(codes, {name: layer.pool.num_entries for name, layer in nws_layers(model)})
    bn, other = split_state(model)
    tensors = {"codes": torch.frombuffer(bytearray(packed), dtype=torch.uint8),
               **{f"bn.{k}": v for k, v in bn.items()}, **{f"other.{k}": v for k, v in other.items()}}
    data = _pack("nws-task", tensors, {"spec": spec.to_json(), "layers": layer_shapes(model), "task": task,
                                       "pools_fingerprint": pools_sha})
    sizes = {"indices": len(packed), "batchnorm": nbytes(bn.values())}
    sizes["other"] = len(data) - sizes["indices"] - sizes["batchnorm"]
    return data, sizes


def load_pools_into(model: nn.Module, books: dict[str, Tensor], what: str = "pools") -> None:
    """Copy pool codebooks into ``model``'s NWS layers (checked by name and shape) and freeze them."""
    layers = dict(nws_layers(model))
    if set(layers) != set(books):
        raise StoreError(f"{what} do not match the model's searched layers")
    for name, layer in layers.items():
        if books[name].shape != layer.pool.codebook.shape:
            raise StoreError(f"{what}: layer {name} has a pool of shape {tuple(books[name].shape)}, "
                             f"the model needs {tuple(layer.pool.codebook.shape)}")
        with torch.no_grad():
            layer.pool.codebook.copy_(books[name])
        layer.pool.freeze()


def model_from_task(data: bytes, books: dict[str, Tensor], pools_sha: str, what: str) -> tuple[nn.Module, dict]:
    """Rebuild a task's model from its file's bytes and the run's pools alone."""
    tensors, meta = _unpack(data, "nws-task", what)
    spec = ModelSpec.from_json(_meta(meta, "spec", what))
    task = _meta(meta, "task", what)
    if _meta(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    try:
        model = spec.build()
    except (ValueError, TypeError) as err:
        raise StoreError(f"{what}: cannot build its model ({err})") from None
    if layer_shapes(model) != _meta(meta, "layers", what):
        raise StoreError(f"{what}: its layer shapes do not match the architecture {spec.name!r}")
    load_pools_into(model, books, what)
    if "codes" not in tensors:
        raise StoreError(f"{what} has no codes")
    try:
        codes = unpack_codes(tensors["codes"].numpy().tobytes())
        decode(model, codes)
    except ValueError as err:
        raise StoreError(f"{what}: {err}") from None
    state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(("bn.", "other."))}
    expected = {k for part in split_state(model) for k in part}
    if set(state) != expected:
        raise StoreError(f"{what}: stored state does not match the model (missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise StoreError(f"{what}: {str(err).splitlines()[0]}") from None
    return model.eval(), task


# ----------------------------------------------------------------------------------- the store


class TaskStore:
    """A run directory: pools, per-task files and a manifest; serves every task's model from storage.

    ``TaskStore(path)`` opens an existing store (``create=True`` makes a new one). ``model(i)`` returns task
    ``i``'s network rebuilt from storage alone (cached); ``tasks()`` lists the tasks with accuracy and size.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        self._cache: dict[int, nn.Module] = {}
        self._pools: tuple[dict[str, Tensor], str] | None = None
        if create:
            if (self.root / MANIFEST).exists():
                raise StoreError(f"{self.root} already holds a run; pass --resume to continue it or choose"
                                 " another output directory")
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest: dict[str, Any] = {"format": "nws-run", "version": FORMAT_VERSION, "files": {},
                                             "tasks": []}
            self.write_manifest()
        else:
            self.manifest = self._read_manifest()

    # -- manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise StoreError(f"run directory {self.root} does not exist")
        if not path.is_file():
            raise StoreError(f"{self.root} is not an nws run (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_bytes())
            if not isinstance(manifest, dict) or manifest.get("format") != "nws-run":
                raise ValueError("not an nws run manifest")
            version = int(manifest["version"])
            files, tasks = manifest["files"], manifest["tasks"]
            if not isinstance(files, dict) or not isinstance(tasks, list):
                raise ValueError("bad files or tasks entry")
            for entry in files.values():
                int(entry["size"]), str(entry["sha256"])
            for t in tasks:
                int(t["index"]), str(t["file"]), str(t["name"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path} is corrupt ({err})") from None
        if version > FORMAT_VERSION:
            raise StoreError(f"{path} has format version {version}, newer than this nws reads; upgrade nws")
        return manifest

    def write_manifest(self) -> None:
        atomic_write(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    # -- files
    def write(self, name: str, data: bytes) -> None:
        """Write a file atomically, then record it in the manifest (also atomically)."""
        atomic_write(self.root / name, data)
        self.manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
        self.write_manifest()

    def read(self, name: str) -> bytes:
        """A file's bytes, verified against the manifest's size and sha256."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise StoreError(f"{self.root / name} is not recorded in the run's manifest")
        try:
            data = (self.root / name).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {self.root / name} ({err.strerror})") from None
        if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
            raise StoreError(f"{self.root / name} is corrupt (size or sha256 differs from the manifest)")
        return data

    # -- pools and source network
    def save_pools(self, model: nn.Module, spec: ModelSpec) -> None:
        self.write(POOLS, pools_bytes(model, spec))
        self.manifest["spec"] = spec.to_json()
        self._pools = None
        self.write_manifest()

    def pools(self) -> tuple[dict[str, Tensor], str]:
        """The run's codebooks by layer, and their fingerprint."""
        if self._pools is None:
            what = str(self.root / POOLS)
            tensors, meta = _unpack(self.read(POOLS), "nws-pools", what)
            order = list(_meta(meta, "layers", what))
            if set(order) != set(tensors):
                raise StoreError(f"{what} is corrupt (layers and tensors differ)")
            books = {k: tensors[k] for k in order}
            fingerprint = pools_fingerprint(books)
            if fingerprint != _meta(meta, "fingerprint", what):
                raise StoreError(f"{what} is corrupt (fingerprint mismatch)")
            self._pools = (books, fingerprint)
        return self._pools

    def save_source(self, model: nn.Module, spec: ModelSpec) -> None:
        """The pool-pretrained network: the starting weights of the first task."""
        self.write(SOURCE, _pack("nws-source", model.state_dict(), {"spec": spec.to_json()}))

    def load_source(self) -> nn.Module:
        what = str(self.root / SOURCE)
        tensors, meta = _unpack(self.read(SOURCE), "nws-source", what)
        spec = ModelSpec.from_json(_meta(meta, "spec", what))
        model = spec.build()
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            raise StoreError(f"{what} does not match its architecture ({str(err).splitlines()[0]})") from None
        load_pools_into(model, self.pools()[0], what)
        return model

    # -- tasks
    def save_task(self, index: int, model: nn.Module, spec: ModelSpec, name: str, classes: list[str],
                  **record: Any) -> dict[str, int]:
        """Store task ``index`` (codes, BatchNorm, other state) and list it in the manifest; returns its sizes."""
        task = {"index": index, "name": name, "classes": list(classes)}
        data, sizes = task_bytes(model, spec, task, self.pools()[1])
        fname = task_file(index)
        atomic_write(self.root / fname, data)
        self.manifest["files"][fname] = {"size": len(data), "sha256": sha256(data)}
        entry = {**task, "file": fname, "bytes": sizes, **record}
        self.manifest["tasks"] = [t for t in self.manifest["tasks"] if t["index"] != index] + [entry]
        self.manifest["tasks"].sort(key=lambda t: t["index"])
        self.write_manifest()
        self._cache.pop(index, None)
        return sizes

    def update_task(self, index: int, **record: Any) -> None:
        for t in self.manifest["tasks"]:
            if t["index"] == index:
                t.update(record)
        self.write_manifest()

    def tasks(self) -> list[dict[str, Any]]:
        """Every stored task: index, name, classes, file, bytes, and the accuracies recorded for it."""
        return [dict(t) for t in self.manifest["tasks"]]

    def model(self, index: int) -> nn.Module:
        """Task ``index``'s network rebuilt from the pools and its task file alone (cached, eval mode)."""
        if index not in self._cache:
            entries = [t for t in self.manifest["tasks"] if t["index"] == index]
            if not entries:
                raise StoreError(f"{self.root} has no task {index} (tasks: "
                                 f"{[t['index'] for t in self.manifest['tasks']]})")
            fname = entries[0]["file"]
            books, fingerprint = self.pools()
            self._cache[index] = model_from_task(self.read(fname), books, fingerprint, str(self.root / fname))[0]
        return self._cache[index]
