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
