"""The task store: one directory per run holding the pools, one file per task, and a manifest.

Every file is safetensors (no pickle on any load path) with a format version and metadata: the model
spec and layer shapes, pool and group sizes, and for a task its classes and the fingerprint of the pools
it was encoded against. Writes are atomic (temporary file in the same directory, fsync, rename, fsync of
the directory), a file is listed in the manifest only once it is complete under its final name, and the
manifest records each file's size and sha256 and carries a checksum of its own content. Every read is
verified, and every problem with a file raises :class:`StoreError`. ``docs/reliability.md`` describes the
formats and guarantees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import signal
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.codes import code_layout, decode, encode
from nws.convert import convert, nws_layers
from nws.errors import NWSError
from nws.packing import CodesError, pack_codes, unpack_codes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POOLS = "pools.safetensors"
SOURCE = "source.safetensors"
CRASH_ENV = "NWS_CRASH_AT"

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9]{1,9}")


class StoreError(NWSError):
    """A store or file that cannot be used as asked (missing, corrupt, newer format, mismatched)."""


def task_file(index: int) -> str:
    return f"task_{index:03d}.safetensors"


def crash_point(name: str, stage: str) -> None:
    """Test hook of the fault-injection tests: SIGKILL this process when ``$NWS_CRASH_AT`` is ``name:stage``.

    :func:`atomic_write` calls it at stage ``written`` (temporary file complete and fsynced, not yet renamed)
    and ``renamed`` (file in place, the manifest not yet updated). Unset in normal use, it does nothing.
    """
    if os.environ.get(CRASH_ENV) == f"{name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a mix.

    The bytes go to a temporary file next to ``path`` (``.NAME.XXXXXXXX.tmp``), which is flushed, fsynced
    and renamed over ``path``; then the directory is fsynced so the rename itself is durable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(path.name, "written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    crash_point(path.name, "renamed")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_file_name(name: Any) -> str:
    """``name`` if it is a plain file name inside a run directory (no path, not hidden); else :class:`StoreError`."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise StoreError(f"{name!r} is not a valid file name in a run directory")
    return name


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
    def from_json(cls, d: Any, what: str = "file metadata") -> ModelSpec:
        """The spec in ``d`` (as :meth:`to_json` writes it); :class:`StoreError` for anything else."""
        ok = (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("kwargs"), dict)
              and all(_is_int(d.get(k)) and d[k] >= 1 for k in ("num_classes", "pool_size", "group_size"))
              and _str_list(d.get("exclude")))
        if not ok:
            raise StoreError(f"{what} has a bad model spec")
        return cls(d["name"], d["num_classes"], dict(d["kwargs"]), d["pool_size"], d["group_size"],
                   tuple(d["exclude"]))


def build_model(spec: ModelSpec, what: str) -> nn.Module:
    """``spec.build()``, with a :class:`StoreError` naming ``what`` if the spec cannot be built."""
    try:
        return spec.build()
    except (ValueError, TypeError, RuntimeError) as err:
        raise StoreError(f"{what}: cannot build its model {spec.name!r} ({_first_line(err)})") from None


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


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


# ----------------------------------------------------------------------------------- file format


def pack_file(kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    """A safetensors file of ``kind`` whose bytes depend on its content alone.

    safetensors writes its header in hash-map order, which changes from process to process; the header is
    rewritten with sorted keys (and padded to 8 bytes as safetensors does), so equal content gives equal
    bytes and a resumed run reproduces an uninterrupted one's files exactly.
    """
    header = {"format": kind, "version": str(FORMAT_VERSION),
              **{k: json.dumps(v) for k, v in meta.items()}}
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
    (n,) = struct.unpack("<Q", data[:8])
    head = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


def unpack_file(data: bytes, kind: str, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata of a safetensors file of ``kind``; :class:`StoreError` for anything else."""
    if len(data) < 8:
        raise StoreError(f"{what} is empty or truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise StoreError(f"{what} is truncated (header)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} has a corrupt header ({_first_line(err)})") from None
    raw = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise StoreError(f"{what} has a corrupt header (no nws metadata)")
    if raw.get("format") != kind:
        raise StoreError(f"{what} is not an nws {kind.removeprefix('nws-')} file (format {raw.get('format')!r})")
    if not _VERSION.fullmatch(raw.get("version", "")) or int(raw["version"]) < 1:
        raise StoreError(f"{what} has a corrupt format version")
    if int(raw["version"]) > FORMAT_VERSION:
        raise StoreError(f"{what} has format version {raw['version']}, newer than this nws reads "
                         f"({FORMAT_VERSION}); upgrade nws")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} has corrupt metadata ({_first_line(err)})") from None
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on corrupt data
        raise StoreError(f"{what} is corrupt ({_first_line(err)})") from None
    return tensors, meta


def _meta(meta: dict[str, Any], key: str, what: str) -> Any:
    if key not in meta:
        raise StoreError(f"{what} lacks its {key!r} metadata")
    return meta[key]


def _check_state(state: dict[str, Tensor], expected: dict[str, Tensor], what: str) -> None:
    """``state`` has exactly ``expected``'s keys, shapes and dtypes, and only finite values."""
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
        raise StoreError(f"{what}: stored state does not match the model (missing {missing}, unexpected {unexpected})")
    for key, value in state.items():
        if value.shape != expected[key].shape or value.dtype != expected[key].dtype:
            raise StoreError(f"{what}: {key} is {value.dtype} {tuple(value.shape)}, the model needs "
                             f"{expected[key].dtype} {tuple(expected[key].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise StoreError(f"{what}: {key} holds non-finite values")


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
    return pack_file("nws-pools", dict(books), {"spec": spec.to_json(), "layers": layer_shapes(model),
                                            "fingerprint": pools_fingerprint(books)})


def read_pools(data: bytes, what: str) -> tuple[dict[str, Tensor], str, ModelSpec]:
    """A pools file's codebooks by layer (in layer order), their fingerprint, and the run's model spec."""
    tensors, meta = unpack_file(data, "nws-pools", what)
    spec = ModelSpec.from_json(_meta(meta, "spec", what), what)
    layers = _meta(meta, "layers", what)
    if not isinstance(layers, dict) or set(layers) != set(tensors):
        raise StoreError(f"{what} is corrupt (layers and tensors differ)")
    books = {k: tensors[k] for k in layers}
    for name, book in books.items():
        if book.dim() != 2 or book.dtype != torch.float32 or not torch.isfinite(book).all():
            raise StoreError(f"{what}: the pool of layer {name} is not a finite float32 matrix")
    fingerprint = pools_fingerprint(books)
    if fingerprint != _meta(meta, "fingerprint", what):
        raise StoreError(f"{what} is corrupt (fingerprint mismatch)")
    return books, fingerprint, spec


def task_bytes(model: nn.Module, spec: ModelSpec, task: dict[str, Any], pools_sha: str) -> tuple[bytes, dict[str, int]]:
    """A task file's bytes, and its size split into indices / batchnorm / other (summing to the file size)."""
    codes = encode(model)
    packed = pack_codes(codes, {name: layer.pool.num_entries for name, layer in nws_layers(model)})
    bn, other = split_state(model)
    tensors = {"codes": torch.frombuffer(bytearray(packed), dtype=torch.uint8),
               **{f"bn.{k}": v for k, v in bn.items()}, **{f"other.{k}": v for k, v in other.items()}}
    data = pack_file("nws-task", tensors, {"spec": spec.to_json(), "layers": layer_shapes(model), "task": task,
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


def _task_record(task: Any, what: str) -> dict[str, Any]:
    if not (isinstance(task, dict) and _is_int(task.get("index")) and task["index"] >= 0
            and isinstance(task.get("name"), str) and _str_list(task.get("classes")) and task["classes"]):
        raise StoreError(f"{what} has a bad task record")
    return task


def _packed_codes(tensors: dict[str, Tensor], layout: dict[str, tuple[int, int]], what: str) -> dict[str, Tensor]:
    """The codes of a task file's tensors, decoded only if their header matches ``layout``."""
    codes = tensors.get("codes")
    if codes is None or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise StoreError(f"{what} has no codes (a 1-D uint8 tensor)")
    try:
        return unpack_codes(codes.numpy().tobytes(), layout)
    except CodesError as err:
        raise StoreError(f"{what}: corrupt codes ({_first_line(err)})") from None


def task_codes(data: bytes, books: dict[str, Tensor], pools_sha: str, what: str) -> dict[str, Tensor]:
    """A task file's codes alone, without building its model: the layout the codes must have (pool entries,
    number of kernels per layer) comes from the file's layer shapes and the run's pools."""
    tensors, meta = unpack_file(data, "nws-task", what)
    if _meta(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    layers = _meta(meta, "layers", what)
    if not isinstance(layers, dict) or set(layers) != set(books):
        raise StoreError(f"{what}: its layers do not match the run's pools")
    layout = {}
    for name, book in books.items():
        entry = layers[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and shape and all(_is_int(v) and v > 0 for v in shape)
                and entry.get("entries") == book.shape[0] and math.prod(shape) % book.shape[1] == 0):
            raise StoreError(f"{what}: layer {name} has a bad shape record")
        layout[name] = (book.shape[0], math.prod(shape) // book.shape[1])
    return _packed_codes(tensors, layout, what)


def model_from_task(data: bytes, books: dict[str, Tensor], pools_sha: str, run_spec: ModelSpec,
                    what: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a task's model from its file's bytes and the run's pools alone.

    ``run_spec`` is the run's model spec (from its pools file): the task must be the same architecture and
    NWS settings with its own number of classes. Returns the model (eval mode) and the task record
    (index, name, classes); :class:`StoreError` for anything that is not such a task.
    """
    tensors, meta = unpack_file(data, "nws-task", what)
    task = _task_record(_meta(meta, "task", what), what)
    spec = ModelSpec.from_json(_meta(meta, "spec", what), what)
    if _meta(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    if spec.num_classes != len(task["classes"]):
        raise StoreError(f"{what}: its model has {spec.num_classes} classes, its task {len(task['classes'])}")
    if dataclasses.replace(spec, num_classes=run_spec.num_classes) != run_spec:
        raise StoreError(f"{what} is for another architecture or NWS settings than this run's")
    model = build_model(spec, what)
    if layer_shapes(model) != _meta(meta, "layers", what):
        raise StoreError(f"{what}: its layer shapes do not match the architecture {spec.name!r}")
    load_pools_into(model, books, what)
    decode(model, _packed_codes(tensors, code_layout(model), what))
    state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(("bn.", "other."))}
    if len(state) + 1 != len(tensors):
        raise StoreError(f"{what} holds unexpected tensors")
    bn, other = split_state(model)
    _check_state(state, {**bn, **other}, what)
    model.load_state_dict(state, strict=False)
    return model.eval(), task


def model_from_source(data: bytes, books: dict[str, Tensor], run_spec: ModelSpec, what: str) -> nn.Module:
    """Rebuild the pool-pretrained network from its file's bytes, with the run's pools loaded and frozen."""
    tensors, meta = unpack_file(data, "nws-source", what)
    spec = ModelSpec.from_json(_meta(meta, "spec", what), what)
    if spec != run_spec:
        raise StoreError(f"{what} is for another architecture or NWS settings than this run's pools")
    model = build_model(spec, what)
    _check_state(tensors, model.state_dict(), what)
    model.load_state_dict(tensors)
    load_pools_into(model, books, what)
    return model


# ----------------------------------------------------------------------------------- the manifest


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (all but its ``checksum``) in canonical JSON: any change of meaning
    shows, whatever the layout of the file."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file's bytes: readable JSON, its checksum last."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "checksum"}))
    return json.dumps({**body, "checksum": manifest_checksum(body)}, indent=1).encode()


def parse_manifest(data: bytes, what: str = MANIFEST) -> dict[str, Any]:
    """A manifest's content, checked in full (format, version, checksum, every entry's types);
    :class:`StoreError` for anything else."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} is corrupt ({_first_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "nws-run":
        raise StoreError(f"{what} is not an nws run manifest")
    version = manifest.get("version")
    if not _is_int(version) or version < 1:
        raise StoreError(f"{what} has a corrupt format version")
    if version > FORMAT_VERSION:
        raise StoreError(f"{what} has format version {version}, newer than this nws reads ({FORMAT_VERSION});"
                         " upgrade nws")
    try:
        intact = manifest.get("checksum") == manifest_checksum(manifest)
    except (ValueError, RecursionError):
        intact = False
    if not intact:
        raise StoreError(f"{what} is corrupt (its checksum does not match its content)")
    problem = _manifest_problem(manifest)
    if problem:
        raise StoreError(f"{what} is corrupt ({problem})")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's entries, or None."""
    files, tasks = m.get("files"), m.get("tasks")
    if not isinstance(files, dict) or not isinstance(tasks, list):
        return "bad files or tasks entry"
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name):
            return f"bad file name {name!r}"
        if not (isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            return f"bad entry for {name}"
    seen = set()
    for t in tasks:
        if not (isinstance(t, dict) and _is_int(t.get("index")) and t["index"] >= 0 and t["index"] not in seen
                and isinstance(t.get("file"), str) and t["file"] in files and isinstance(t.get("name"), str)
                and _str_list(t.get("classes"))):
            return "bad task entry"
        seen.add(t["index"])
        if not all(_is_number(t[k]) for k in ("acc_after_training", "acc_from_storage", "float32_model") if k in t):
            return f"bad numbers in task {t['index']}"
        sizes = t.get("bytes", {})
        if not (isinstance(sizes, dict) and all(_is_int(v) for v in sizes.values())):
            return f"bad sizes in task {t['index']}"
    if "spec" in m:
        try:
            ModelSpec.from_json(m["spec"])
        except StoreError:
            return "bad model spec"
    source = m.get("source", {})
    if not (isinstance(source, dict) and isinstance(source.get("name", ""), str)
            and _is_number(source.get("accuracy", 0))):
        return "bad source entry"
    config = m.get("config", {})
    data = config.get("data", {}) if isinstance(config, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get("name", ""), str)
            and isinstance(data.get("root"), (str, type(None))) and _is_int(config.get("seed", 0))):
        return "bad config entry"
    return None


# ----------------------------------------------------------------------------------- the store


class TaskStore:
    """A run directory: pools, per-task files and a manifest; serves every task's model from storage.

    ``TaskStore(path)`` opens an existing store (``create=True`` makes a new one and refuses a directory
    that already holds a run). ``model(i)`` returns task ``i``'s network rebuilt from storage alone
    (cached); ``tasks()`` lists the tasks with accuracy and size; ``check()`` verifies every listed file.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        self._cache: dict[int, nn.Module] = {}
        self._pools: tuple[dict[str, Tensor], str, ModelSpec] | None = None
        if create:
            if (self.root / MANIFEST).exists():
                raise StoreError(f"{self.root} already holds a run; pass --resume to continue it or choose"
                                 " another output directory")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(f"cannot create the run directory {self.root} ({err.strerror})") from None
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
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {path} ({err.strerror})") from None
        return parse_manifest(data, str(path))

    def write_manifest(self) -> None:
        atomic_write(self.root / MANIFEST, manifest_bytes(self.manifest))

    # -- files
    def write(self, name: str, data: bytes) -> None:
        """Write a file atomically, then record it in the manifest (also atomically)."""
        atomic_write(self.root / check_file_name(name), data)
        self.manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
        self.write_manifest()

    def remove(self, name: str) -> None:
        """Unlist a file (atomically), then delete it: a crash in between leaves an unlisted file, never a
        listed one that is missing."""
        if self.manifest["files"].pop(check_file_name(name), None) is not None:
            self.write_manifest()
        (self.root / name).unlink(missing_ok=True)

    def read(self, name: str) -> bytes:
        """A file's bytes, verified against the manifest's size and sha256."""
        entry = self.manifest["files"].get(check_file_name(name))
        if entry is None:
            raise StoreError(f"{self.root / name} is not recorded in the run's manifest")
        try:
            data = (self.root / name).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {self.root / name} ({err.strerror})") from None
        if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
            raise StoreError(f"{self.root / name} is corrupt (size or sha256 differs from the manifest)")
        return data

    def check(self) -> None:
        """Verify every file the manifest lists (size and sha256); :class:`StoreError` names the first bad one."""
        for name in self.manifest["files"]:
            self.read(name)

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files an interrupted :func:`atomic_write` left behind; returns their paths."""
        stale = [p for p in self.root.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # -- pools and source network
    def save_pools(self, model: nn.Module, spec: ModelSpec) -> None:
        self.write(POOLS, pools_bytes(model, spec))
        self.manifest["spec"] = spec.to_json()
        self._pools = None
        self.write_manifest()

    def _read_pools(self) -> tuple[dict[str, Tensor], str, ModelSpec]:
        if self._pools is None:
            what = str(self.root / POOLS)
            books, fingerprint, spec = read_pools(self.read(POOLS), what)
            if "spec" in self.manifest and self.manifest["spec"] != spec.to_json():
                raise StoreError(f"{what} and the manifest disagree on the model spec")
            self._pools = (books, fingerprint, spec)
        return self._pools

    def pools(self) -> tuple[dict[str, Tensor], str]:
        """The run's codebooks by layer, and their fingerprint."""
        books, fingerprint, _ = self._read_pools()
        return books, fingerprint

    def spec(self) -> ModelSpec:
        """The run's model spec (architecture and NWS settings; ``num_classes`` of the source task)."""
        return self._read_pools()[2]

    def save_source(self, model: nn.Module, spec: ModelSpec) -> None:
        """The pool-pretrained network: the starting weights of the first task."""
        self.write(SOURCE, pack_file("nws-source", model.state_dict(), {"spec": spec.to_json()}))

    def load_source(self) -> nn.Module:
        """The pool-pretrained network rebuilt from storage, its pools loaded from the pools file and frozen."""
        books, _, spec = self._read_pools()
        return model_from_source(self.read(SOURCE), books, spec, str(self.root / SOURCE))

    # -- tasks
    def save_task(self, index: int, model: nn.Module, spec: ModelSpec, name: str, classes: list[str],
                  **record: Any) -> dict[str, int]:
        """Store task ``index`` (codes, BatchNorm, other state) and list it in the manifest; returns its sizes.

        The task file is complete under its final name before the manifest lists it, so a crash in between
        leaves the task unlisted (to be learned again on resume), never listed and unreadable.
        """
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

    def _task_entry(self, index: int) -> dict[str, Any]:
        entries = [t for t in self.manifest["tasks"] if t["index"] == index]
        if not entries:
            raise StoreError(f"{self.root} has no task {index} (tasks: {[t['index'] for t in self.manifest['tasks']]})")
        return entries[0]

    def model(self, index: int) -> nn.Module:
        """Task ``index``'s network rebuilt from the pools and its task file alone (cached, eval mode)."""
        if index not in self._cache:
            entry = self._task_entry(index)
            what = str(self.root / entry["file"])
            books, fingerprint, spec = self._read_pools()
            model, task = model_from_task(self.read(entry["file"]), books, fingerprint, spec, what)
            if task["index"] != index or task["name"] != entry["name"]:
                raise StoreError(f"{what} holds task {task['index']} ({task['name']}), the manifest lists it as "
                                 f"task {index} ({entry['name']})")
            self._cache[index] = model
        return self._cache[index]

    def codes(self, index: int) -> dict[str, Tensor]:
        """Task ``index``'s pool indices per layer, read from its task file (no model is built)."""
        fname = self._task_entry(index)["file"]
        books, fingerprint, _ = self._read_pools()
        return task_codes(self.read(fname), books, fingerprint, str(self.root / fname))
