"""The task-file format: the safetensors files of a run, their metadata, and models rebuilt from them.

Every file is a safetensors container (:mod:`nws.container`) whose metadata holds its ``format``
(``nws-pools``, ``nws-source``, ``nws-reference``, ``nws-task``), a format ``version`` and JSON-encoded
entries: the model spec and layer shapes, pool and group sizes, and for a task its classes and the fingerprint
of the pools it was encoded against. Readers check everything (format, version, metadata types, spec, shapes,
fingerprint, codes layout before decoding, tensor names, shapes, dtypes, finite values) and raise
:class:`StoreError` for any problem. Where the files live and how they are listed is :mod:`nws.store`.

A task file of format 2 (written now) holds its indices coded against a reference assignment the reader
also holds (:mod:`nws.packing`): the source network's indices, stored once per run as ``nws-reference``
(``"reference": "source"``), or an earlier task's indices (``"reference": j``); its BatchNorm state and
its other state (biases, unsearched layers) as one flat tensor per kind and dtype (``bn.float32``,
``other.float32``), in the model's state-dict order, without the ``num_batches_tracked`` counters that
BatchNorm reads only when its momentum is None; and as metadata only its task record, the pools'
fingerprint and its reference (the model spec is the run's, with the task's number of classes). Readers read
this format only; ``nws upgrade`` (:mod:`nws.upgrade`) converts a run of an earlier one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.codes import code_layout, decode, encode
from nws.container import (check_state, first_line, flatten_state, meta_entry, nbytes, pack_file, unflatten_state,
                           unpack_file)
from nws.convert import nws_layers
from nws.errors import StoreError
from nws.bitcodes import CodesError
from nws.packing import Layout, pack_codes
from nws.unpacking import unpack_codes
from nws.spec import ModelSpec, is_int, str_list

FORMAT_VERSION = 1  # pools, source and reference files
TASK_VERSION = 2  # task files
SOURCE_REFERENCE = "source"  # a task coded against the run's reference (the source network's indices)


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


def stored_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """What a task file of format 2 stores besides its codes: :func:`split_state` without the
    ``num_batches_tracked`` counters of BatchNorm layers that never read them (their momentum is set)."""
    bn, other = split_state(model)
    unused = {f"{n}.num_batches_tracked" if n else "num_batches_tracked" for n, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.momentum is not None}
    return {k: v for k, v in bn.items() if k not in unused}, other


def packed_tensor(packed: bytes) -> Tensor:
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.zeros(0, dtype=torch.uint8)


def task_bytes(model: nn.Module, task: dict[str, Any], pools_sha: str, reference: Mapping[str, Tensor],
               against: str | int = SOURCE_REFERENCE, bn_dtype: str = "float32") -> tuple[bytes, dict[str, int]]:
    """A task file's bytes (format 2), and its size split into indices / batchnorm / other (summing to the
    file size).

    The indices are coded against ``reference``, which every reader must hold: the run's reference (the source
    network's indices, ``against`` ``"source"``) or task ``against``'s indices; with the pools, so a changed
    kernel's new entry is coded by its rank among its old entry's neighbours (:mod:`nws.packing`). BatchNorm is
    stored as ``bn_dtype`` (:func:`nws.container.flatten_state`).
    """
    books = model_codebooks(model)
    packed = pack_codes(encode(model), {name: book.shape[0] for name, book in books.items()},
                        reference=reference, pools=books)
    bn, other = stored_state(model)
    flat_bn = flatten_state("bn", bn, bn_dtype)
    tensors = {"codes": packed_tensor(packed), **flat_bn, **flatten_state("other", other)}
    data = pack_file("nws-task", tensors, {"task": task, "pools_fingerprint": pools_sha, "reference": against},
                     TASK_VERSION)
    sizes = {"indices": len(packed), "batchnorm": nbytes(flat_bn.values())}
    sizes["other"] = len(data) - sizes["indices"] - sizes["batchnorm"]
    return data, sizes


def reference_bytes(model: nn.Module, pools_sha: str) -> bytes:
    """The run's reference file: ``model``'s (the source network's) indices, coded alone."""
    books = model_codebooks(model)
    packed = pack_codes(encode(model), {name: book.shape[0] for name, book in books.items()})
    return pack_file("nws-reference", {"codes": packed_tensor(packed)}, {"pools_fingerprint": pools_sha})


def read_reference(data: bytes, layout: Layout, pools_sha: str, what: str) -> dict[str, Tensor]:
    """The indices of a reference file, for ``layout`` (the source network's, :func:`nws.codes.code_layout`)."""
    tensors, meta = unpack_file(data, "nws-reference", what)
    if meta_entry(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    if set(tensors) != {"codes"}:
        raise StoreError(f"{what} holds unexpected tensors")
    return _packed_codes(tensors, layout, what)


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


def _packed_codes(tensors: dict[str, Tensor], layout: Layout, what: str, reference: Mapping[str, Tensor] | None = None,
                  pools: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The codes of a file's tensors, decoded only if their header matches ``layout`` (and ``reference`` and
    ``pools``, where the codes were coded against them)."""
    codes = tensors.get("codes")
    if codes is None or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise StoreError(f"{what} has no codes (a 1-D uint8 tensor)")
    try:
        return unpack_codes(codes.numpy().tobytes(), layout, reference=reference, pools=pools)
    except CodesError as err:
        raise StoreError(f"{what}: corrupt codes ({first_line(err)})") from None


# The reference assignments a reader holds, by what a task file names: "source" (the run's reference) or an
# earlier task's index.
References = Callable[[str | int], Mapping[str, Tensor]]


@dataclasses.dataclass
class TaskFile:
    """A task file, parsed and checked up to its codes and state (which need the model and the reference)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    task: dict[str, Any]  # index, name, classes
    reference: str | int  # what the codes are coded against: "source" or an earlier task's index
    what: str


def read_task_file(data: bytes, pools_sha: str, what: str) -> TaskFile:
    """A task file's header: format, version, task record, the pools it was encoded against, its reference."""
    tensors, meta = unpack_file(data, "nws-task", what, TASK_VERSION)
    task = _task_record(meta_entry(meta, "task", what), what)
    if meta_entry(meta, "pools_fingerprint", what) != pools_sha:
        raise StoreError(f"{what} was encoded against different pools than this run's")
    reference = meta_entry(meta, "reference", what)
    if not (reference == SOURCE_REFERENCE or (is_int(reference) and 0 <= reference < task["index"])):
        raise StoreError(f"{what} has a bad reference record ({str(reference)[:40]!r})")
    return TaskFile(tensors, meta, task, reference, what)


def task_spec(tf: TaskFile, run_spec: ModelSpec) -> ModelSpec:
    """The task's model spec: the run's (``run_spec``, from its pools file) with the task's number of classes."""
    return dataclasses.replace(run_spec, num_classes=len(tf.task["classes"]))


def task_codes(tf: TaskFile, layout: Layout, books: dict[str, Tensor], references: References | None) -> dict[str, Tensor]:
    """The task's codes for ``layout`` (its model's, :func:`nws.codes.code_layout`), decoded against the
    reference it names (from ``references``)."""
    if references is None:
        raise StoreError(f"{tf.what} is coded against {_describe(tf.reference)}, which this reader lacks")
    return _packed_codes(tf.tensors, layout, tf.what, references(tf.reference), books)


def _describe(reference: str | int) -> str:
    return "the run's reference" if reference == SOURCE_REFERENCE else f"task {reference}'s indices"


def build_task(tf: TaskFile, books: dict[str, Tensor], run_spec: ModelSpec, references: References | None = None,
               codes: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The task's model (eval mode) from its file and the run's pools, and its ``codes`` if already decoded
    (else decoded here against the reference it names)."""
    what = tf.what
    model = build_model(task_spec(tf, run_spec), what)
    load_pools_into(model, books, what)
    decode(model, codes if codes is not None else task_codes(tf, code_layout(model), books, references))
    if any(k != "codes" and not k.startswith(("bn.", "other.")) for k in tf.tensors):
        raise StoreError(f"{what} holds unexpected tensors")
    bn, other = stored_state(model)
    state = {**unflatten_state(tf.tensors, "bn", bn, what), **unflatten_state(tf.tensors, "other", other, what)}
    model.load_state_dict(state, strict=False)
    return model.eval()


def model_from_task(data: bytes, books: dict[str, Tensor], pools_sha: str, run_spec: ModelSpec, what: str,
                    references: References | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a task's model from its file's bytes, the run's pools and the reference its codes name.

    ``run_spec`` is the run's model spec (from its pools file): the task is the same architecture and NWS
    settings with its own number of classes. Returns the model (eval mode) and the task record (index, name,
    classes); :class:`StoreError` for anything that is not such a task.
    """
    tf = read_task_file(data, pools_sha, what)
    return build_task(tf, books, run_spec, references), tf.task


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
