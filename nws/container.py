"""The safetensors container every run file uses, whatever its method: a ``format`` name, a format ``version``
and JSON-encoded metadata entries in the header, tensors after it; no pickle on any load path.

:func:`pack_file` writes one so that equal content gives equal bytes; :func:`unpack_file` reads one back,
checking its format name and that its version is the current one (an earlier one is refused with the command
that converts the run, ``nws upgrade``; a newer one with "upgrade nws"); :func:`read_file` reads any version
(for ``nws upgrade``). Every problem is a :class:`~nws.errors.StoreError` naming the file. The formats of the
files themselves are their methods' (NWS's: :mod:`nws.taskfile`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from nws.batchnorm import batchnorm_names, decode_folded, encode_folded, folded_keys
from nws.errors import StoreError

_VERSION = re.compile(r"[0-9]{1,9}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def upgrade_hint(what: str | Path) -> str:
    """The command that converts the run holding ``what`` (a file of it, or the run directory itself)."""
    path = Path(what)
    return f"nws upgrade {path if path.is_dir() or path.suffix == '' else path.parent}"


def pack_file(kind: str, tensors: dict[str, Tensor], meta: dict[str, Any], version: int = 1) -> bytes:
    """A safetensors file of ``kind`` whose bytes depend on its content alone.

    safetensors writes its header in hash-map order, which changes from process to process; the header is
    rewritten with sorted keys (and padded to 8 bytes as safetensors does), so equal content gives equal
    bytes and a resumed run reproduces an uninterrupted one's files exactly.
    """
    header = {"format": kind, "version": str(version),
              **{k: json.dumps(v) for k, v in meta.items()}}
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
    (n,) = struct.unpack("<Q", data[:8])
    head = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


def read_file(data: bytes, kind: str, what: str) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """Tensors, metadata and format version of a safetensors file of ``kind``, whatever its version;
    :class:`StoreError` for anything else."""
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
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} has corrupt metadata ({first_line(err)})") from None
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on corrupt data
        raise StoreError(f"{what} is corrupt ({first_line(err)})") from None
    return tensors, meta, int(raw["version"])


def check_version(version: int, current: int, what: str) -> None:
    """A file of format ``version`` is readable only at ``current``: an earlier one is refused with the command
    that converts its run, a newer one with "upgrade nws"."""
    if version < current:
        raise StoreError(f"{what} has format version {version}, of an earlier nws; convert the run with "
                         f"`{upgrade_hint(what)}`")
    if version > current:
        raise StoreError(f"{what} has format version {version}, newer than this nws reads ({current}); upgrade nws")


def unpack_file(data: bytes, kind: str, what: str, version: int = 1) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata of a safetensors file of ``kind`` in format ``version`` (the current one of its
    kind); :class:`StoreError` for anything else."""
    tensors, meta, found = read_file(data, kind, what)
    check_version(found, version, what)
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


def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors)


# How a file may store a kind of float32 state: float32 (as it is), float16 / bfloat16 (rounded: lossy), or
# int8 (BatchNorm folded onto its grid by nws.batchnorm.fold_batchnorm: exact).
STATE_STORAGE = ("float32", "float16", "bfloat16", "int8")
FLOATS = ("float32", "float16", "bfloat16")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _folded_part(state: dict[str, Tensor]) -> list[str]:
    """The keys of ``state`` that folded BatchNorm layers store (every layer's weight, bias and statistics)."""
    return [key for key in folded_keys(batchnorm_names(state)) if key in state]


def flatten_state(kind: str, state: dict[str, Tensor], storage: str = "float32") -> dict[str, Tensor]:
    """``state`` as one flat tensor per dtype, named ``KIND.DTYPE``, its entries in ``state``'s order: one
    header entry per kind instead of one per tensor (the reader knows the entries from the model). Float32
    entries are stored as ``storage``: float32; float16 or bfloat16 (lossy; a value float16 cannot hold is
    refused); or, for the BatchNorm layers of a network folded onto the grid (:mod:`nws.batchnorm`), ``int8``:
    ``KIND.int8`` and ``KIND.exp``, exact (a state that is not folded is refused)."""
    if storage not in STATE_STORAGE:
        raise ValueError(f"state storage must be one of {', '.join(STATE_STORAGE)}, got {storage!r}")
    out: dict[str, Tensor] = {}
    if storage == "int8":
        folded = _folded_part(state)
        try:
            out = {f"{kind}.{k}": v for k, v in encode_folded({k: state[k].detach().cpu() for k in folded}).items()}
        except ValueError as err:
            raise StoreError(f"{kind}: {err}; fold it first (nws.batchnorm.fold_batchnorm)") from None
        state = {k: v for k, v in state.items() if k not in folded}
    dtype = getattr(torch, storage) if storage in FLOATS else torch.float32
    groups: dict[str, list[Tensor]] = {}
    for key, value in state.items():
        value = value.detach().reshape(-1).cpu()
        if value.dtype == torch.float32 and dtype != torch.float32:
            value = value.to(dtype)
            if not torch.isfinite(value).all():
                raise StoreError(f"{key} holds a value beyond {storage}'s range: store it as bfloat16 or float32 "
                                 "(model.bn_dtype)")
        groups.setdefault(f"{kind}.{_dtype_name(value.dtype)}", []).append(value)
    return {**out, **{name: torch.cat(parts) for name, parts in groups.items()}}


def _float_name(tensors: dict[str, Tensor], kind: str, what: str) -> str:
    """The name of the flat tensor holding ``kind``'s float32 entries, which a file may store in any one of
    :data:`FLOATS` (every other dtype is stored as itself)."""
    names = [name for name in (f"{kind}.{d}" for d in FLOATS) if name in tensors]
    if len(names) > 1:
        raise StoreError(f"{what} stores its {kind} floats in more than one precision ({', '.join(names)})")
    return names[0] if names else f"{kind}.float32"


def unflatten_state(tensors: dict[str, Tensor], kind: str, expected: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_state` for a model whose state of ``kind`` is ``expected``: the file's
    ``KIND.*`` tensors must hold exactly those entries' values (dtypes and total lengths), all finite; values
    stored in a lower float precision come back as float32, folded BatchNorm as exactly what was folded."""
    state: dict[str, Tensor] = {}
    if f"{kind}.int8" in tensors or f"{kind}.exp" in tensors:
        folded = _folded_part(expected)
        try:
            state = decode_folded({"int8": tensors.get(f"{kind}.int8"), "exp": tensors.get(f"{kind}.exp")},
                                  {k: expected[k] for k in folded})
        except ValueError as err:
            raise StoreError(f"{what}: {err}") from None
        tensors = {k: v for k, v in tensors.items() if k not in (f"{kind}.int8", f"{kind}.exp")}
    used: dict[str, int] = {}
    floats = _float_name(tensors, kind, what)
    for key, ref in expected.items():
        if key in state:
            continue
        name = floats if ref.dtype == torch.float32 else f"{kind}.{_dtype_name(ref.dtype)}"
        flat = tensors.get(name)
        if flat is None or flat.dim() != 1 or f"{kind}.{_dtype_name(flat.dtype)}" != name:
            raise StoreError(f"{what}: no {name} tensor (1-D {name.split('.', 1)[1]}) for the model's {key}")
        start = used.get(name, 0)
        if start + ref.numel() > flat.numel():
            raise StoreError(f"{what}: {name} holds {flat.numel()} values, fewer than the model needs")
        state[key] = flat[start : start + ref.numel()].reshape(ref.shape).to(ref.dtype)
        used[name] = start + ref.numel()
    for name, flat in tensors.items():
        if name.startswith(f"{kind}.") and used.get(name) != flat.numel():
            raise StoreError(f"{what}: {name} holds {flat.numel()} values, the model needs {used.get(name, 0)}")
    state = {key: state[key] for key in expected}
    check_state(state, expected, what)
    return state
