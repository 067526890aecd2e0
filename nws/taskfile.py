"""The task-file format: the safetensors files of a run, their metadata, and models rebuilt from them.

Every file is safetensors (no pickle on any load path) whose metadata holds its ``format`` (``nws-pools``,
``nws-source``, ``nws-task``, or a baseline's kind), a format ``version`` and JSON-encoded entries: the model
spec and layer shapes, pool and group sizes, and for a task its classes and the fingerprint of the pools it
was encoded against. Readers check everything (format, version, metadata types, spec, shapes, fingerprint,
codes layout before decoding, tensor names, shapes, dtypes, finite values) and raise :class:`StoreError` for
any problem. Where the files live and how they are listed is :mod:`nws.store`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import math
import re
import struct
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.codes import code_layout, decode, encode
from nws.convert import nws_layers
from nws.errors import StoreError
from nws.packing import CodesError, pack_codes, unpack_codes
from nws.spec import ModelSpec

FORMAT_VERSION = 1
_VERSION = re.compile(r"[0-9]{1,9}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def build_model(spec: ModelSpec, what: str) -> nn.Module:
    """``spec.build()``, with a :class:`StoreError` naming ``what`` if the spec cannot be built."""
    try:
        return spec.build()
    except (ValueError, TypeError, RuntimeError) as err:
        raise StoreError(f"{what}: cannot build its model {spec.name!r} ({first_line(err)})") from None


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
        raise StoreError(f"{what} has a corrupt header ({first_line(err)})") from None
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
        raise StoreError(f"{what} has corrupt metadata ({first_line(err)})") from None
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on corrupt data
        raise StoreError(f"{what} is corrupt ({first_line(err)})") from None
    return tensors, meta


def meta_entry(meta: dict[str, Any], key: str, what: str) -> Any:
    """``meta[key]``; :class:`StoreError` naming ``what`` if the file lacks it."""
    if key not in meta:
        raise StoreError(f"{what} lacks its {key!r} metadata")
    return meta[key]


def check_state(state: dict[str, Tensor], expected: dict[str, Tensor], what: str) -> None:
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
    spec = ModelSpec.from_json(meta_entry(meta, "spec", what), what)
    layers = meta_entry(meta, "layers", what)
    if not isinstance(layers, dict) or set(layers) != set(tensors):
        raise StoreError(f"{what} is corrupt (layers and tensors differ)")
    books = {k: tensors[k] for k in layers}
    for name, book in books.items():
        if book.dim() != 2 or book.dtype != torch.float32 or not torch.isfinite(book).all():
            raise StoreError(f"{what}: the pool of layer {name} is not a finite float32 matrix")
    fingerprint = pools_fingerprint(books)
    if fingerprint != meta_entry(meta, "fingerprint", what):
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
    if not (isinstance(task, dict) and is_int(task.get("index")) and task["index"] >= 0
            and isinstance(task.get("name"), str) and str_list(task.get("classes")) and task["classes"]):
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
        raise StoreError(f"{what}: corrupt codes ({first_line(err)})") from None


def task_codes(data: bytes, books: dict[str, Tensor], pools_sha: str, what: str) -> dict[str, Tensor]:
    """A task file's codes alone, without building its model: the layout the codes must have (pool entries,
    number of kernels per layer) comes from the file's layer shapes and the run's pools."""
    tensors, meta = unpack_file(data, "nws-task", what)
    if meta_entry(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    layers = meta_entry(meta, "layers", what)
    if not isinstance(layers, dict) or set(layers) != set(books):
        raise StoreError(f"{what}: its layers do not match the run's pools")
    layout = {}
    for name, book in books.items():
        entry = layers[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and shape and all(is_int(v) and v > 0 for v in shape)
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
    task = _task_record(meta_entry(meta, "task", what), what)
    spec = ModelSpec.from_json(meta_entry(meta, "spec", what), what)
    if meta_entry(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    if spec.num_classes != len(task["classes"]):
        raise StoreError(f"{what}: its model has {spec.num_classes} classes, its task {len(task['classes'])}")
    if dataclasses.replace(spec, num_classes=run_spec.num_classes) != run_spec:
        raise StoreError(f"{what} is for another architecture or NWS settings than this run's")
    model = build_model(spec, what)
    if layer_shapes(model) != meta_entry(meta, "layers", what):
        raise StoreError(f"{what}: its layer shapes do not match the architecture {spec.name!r}")
    load_pools_into(model, books, what)
    decode(model, _packed_codes(tensors, code_layout(model), what))
    state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(("bn.", "other."))}
    if len(state) + 1 != len(tensors):
        raise StoreError(f"{what} holds unexpected tensors")
    bn, other = split_state(model)
    check_state(state, {**bn, **other}, what)
    model.load_state_dict(state, strict=False)
    return model.eval(), task


def source_bytes(model: nn.Module, spec: ModelSpec) -> bytes:
    """The pool-pretrained network's file: its whole state dict (the first task's starting point)."""
    return pack_file("nws-source", model.state_dict(), {"spec": spec.to_json()})


def model_from_source(data: bytes, books: dict[str, Tensor], run_spec: ModelSpec, what: str) -> nn.Module:
    """Rebuild the pool-pretrained network from its file's bytes, with the run's pools loaded and frozen."""
    tensors, meta = unpack_file(data, "nws-source", what)
    spec = ModelSpec.from_json(meta_entry(meta, "spec", what), what)
    if spec != run_spec:
        raise StoreError(f"{what} is for another architecture or NWS settings than this run's pools")
    model = build_model(spec, what)
    check_state(tensors, model.state_dict(), what)
    model.load_state_dict(tensors)
    load_pools_into(model, books, what)
    return model


# ----------------------------------------------------------------------------------- the reference's file sizes


def _saved_size(obj: Any) -> int:
    """Bytes that ``torch.save`` writes for ``obj`` (into memory; nothing is read back)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def reference_task_bytes(model: nn.Module) -> dict[str, int]:
    """A task's size as the reference implementation stores it (``docs/reference.md``, row 6), computed, never
    written. ``indices``: every NWS layer's indices as int16, concatenated in module order and lzma-compressed
    twice, as its ``lzma.open(path, "wb").write(lzma.compress(codes))`` writes them; ``batchnorm``: its
    ``torch.save`` of the list of the network's BatchNorm modules (as ``nn.BatchNorm2d``, this torch's pickle)."""
    codes = [c.reshape(-1) for c in encode(model).values()]
    raw = torch.cat(codes).to(torch.int16).numpy().tobytes() if codes else b""
    norms = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            norm = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            norm.load_state_dict(m.state_dict())
            norms.append(norm)
    return {"indices": len(lzma.compress(lzma.compress(raw))), "batchnorm": _saved_size(norms)}


def reference_pools_bytes(books: dict[str, Tensor]) -> int:
    """The size of the reference implementation's pools file for these pools (``docs/reference.md``, row 6),
    computed, never written: its ``torch.save`` of one quantiser module per layer, each holding the pool
    ``embed``, ``embed_avg`` and ``acum_embed_sum`` (``d x K`` each) and ``cluster_size`` and
    ``acum_embed_onehot_sum`` (``K`` each) in float32, and ``dim``, ``n_embed``, ``decay``, ``eps``. The size
    depends on the shapes alone. The modules pickled here are plain ``nn.Module`` s: their class path differs
    from the reference's ``models.quantizer.Quantize`` by a few bytes, which the 64-byte alignment of torch's
    archive records absorbs or rounds to 64."""
    quantisers = []
    for book in books.values():
        k, d = book.shape
        q = nn.Module()
        q.dim, q.n_embed, q.decay, q.eps = d, k, 0.99, 1e-5
        for name, shape in (("embed", (d, k)), ("cluster_size", (k,)), ("embed_avg", (d, k)),
                            ("acum_embed_sum", (d, k)), ("acum_embed_onehot_sum", (k,))):
            q.register_buffer(name, torch.zeros(shape))
        quantisers.append(q)
    return _saved_size(quantisers)
