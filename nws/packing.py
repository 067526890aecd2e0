"""Compact storage of a task's codes, near the entropy limit.

:func:`pack_codes` entropy-codes each layer's indices: the layer's index histogram (Rice-coded, so the
table overhead is paid and counted) and an rANS stream under that histogram (``constriction``), which
together cost within a fraction of a percent of the layer's empirical entropy. A layer too small to repay
its histogram is stored as fixed-width indices instead (``"rice": null`` in the header). Lossless.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import constriction
import numpy as np
import torch
from torch import Tensor

from nws.errors import NWSError

MAGIC = b"NWSC"
VERSION = 1


class CodesError(NWSError):
    """Packed codes that cannot be read (truncated, corrupt, or of an unknown version)."""


def entropy_bits(indices: Tensor | np.ndarray, num_entries: int | None = None) -> float:
    """``N * H``: the empirical-entropy bound, in bits, for storing ``indices`` with a known histogram."""
    counts = np.bincount(np.asarray(indices, dtype=np.int64), minlength=num_entries or 0)
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


# Rice coding of the histograms, unary parts first: each count c costs (c >> k) ones and a zero, then all
# counts' k low bits follow, so both halves decode with array operations.

def _rice_bits(values: np.ndarray, k: int) -> np.ndarray:
    q = values >> k
    unary = np.zeros(int(q.sum()) + len(values), dtype=np.uint8)
    ends = np.cumsum(q + 1) - 1
    unary[:] = 1
    unary[ends] = 0
    low = ((values[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).ravel()
    return np.concatenate([unary, low])


def _best_rice_k(values: np.ndarray) -> int:
    costs = [int(((values >> k) + 1 + k).sum()) for k in range(32)]
    return int(np.argmin(costs))


def _rice_decode(bits: np.ndarray, count: int, k: int) -> np.ndarray:
    zeros = np.flatnonzero(bits == 0)[:count]
    if count == 0 or len(zeros) < count or len(bits) != zeros[-1] + 1 + count * k:
        raise CodesError("packed codes are truncated or corrupt (histogram)")
    q = np.diff(zeros, prepend=-1) - 1
    low = bits[zeros[-1] + 1 :].reshape(count, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
    return (q.astype(np.int64) << k) | low


def _width(k: int) -> int:
    """Bits of a fixed-width index into ``k`` entries."""
    return (k - 1).bit_length()


def _raw_bits(idx: np.ndarray, width: int) -> np.ndarray:
    return ((idx[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).ravel()


def _model(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def pack_codes(codes: Mapping[str, Tensor], pool_sizes: Mapping[str, int] | int) -> bytes:
    """Entropy-code ``codes`` (as :func:`encode` returns them) into bytes; :func:`unpack_codes` inverts it."""
    layers = []
    for name, indices in codes.items():
        k = pool_sizes if isinstance(pool_sizes, int) else pool_sizes[name]
        idx = np.asarray(indices.detach().cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= k):
            raise ValueError(f"{name}: indices out of range for a pool of {k} entries")
        layers.append((name, k, idx, np.bincount(idx, minlength=k)))
    header, tables, coded = [], [], []
    for name, k, idx, counts in layers:
        rice = _best_rice_k(counts)
        bits = _rice_bits(counts, rice)
        # A small layer can cost less as plain fixed-width indices than as a histogram plus its entropy.
        if idx.size * _width(k) < len(bits) + entropy_bits(idx, k):
            rice, bits = None, _raw_bits(idx, _width(k))
        else:
            coded.append((k, idx, counts))
        header.append({"name": name, "entries": k, "count": int(idx.size), "rice": rice, "table_bits": len(bits)})
        tables.append(bits)
    coder = constriction.stream.stack.AnsCoder()
    for k, idx, counts in reversed(coded):
        if idx.size and k > 1:
            coder.encode_reverse(idx.astype(np.int32), _model(counts))
    stream = coder.get_compressed().astype("<u4").tobytes()
    table = np.packbits(np.concatenate(tables)) if tables else np.zeros(0, np.uint8)
    head = json.dumps({"layers": header}, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<BIII", VERSION, len(head), len(table), len(stream)) + head + table.tobytes() + stream


def unpack_codes(data: bytes) -> dict[str, Tensor]:
    """Inverse of :func:`pack_codes`. Raises :class:`CodesError` on anything but a valid stream."""
    fixed = len(MAGIC) + struct.calcsize("<BIII")
    if len(data) < fixed or data[: len(MAGIC)] != MAGIC:
        raise CodesError("not a packed-codes stream (bad magic or too short)")
    version, n_head, n_table, n_stream = struct.unpack_from("<BIII", data, len(MAGIC))
    if version != VERSION:
        raise CodesError(f"packed codes of format version {version}; this nws reads version {VERSION}")
    if len(data) != fixed + n_head + n_table + n_stream or n_stream % 4:
        raise CodesError("packed codes are truncated or have trailing bytes")
    try:
        header = json.loads(data[fixed : fixed + n_head])["layers"]
        specs = [(h["name"], h["entries"], h["count"], h["rice"], h["table_bits"]) for h in header]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CodesError(f"packed codes have a corrupt header ({err})") from None
    for name, k, n, rice, table_bits in specs:
        if not (isinstance(name, str) and all(type(v) is int for v in (k, n, table_bits))
                and 1 <= k < 1 << 31 and 0 <= n < 1 << 31 and 0 <= table_bits <= 8 * n_table
                and (table_bits == n * _width(k) if rice is None else type(rice) is int and 0 <= rice < 32
                     and k <= table_bits)):
            raise CodesError("packed codes have a corrupt header (bad layer entry)")
    bits = np.unpackbits(np.frombuffer(data, np.uint8, n_table, fixed + n_head))
    words = np.frombuffer(data, "<u4", n_stream // 4, fixed + n_head + n_table).astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    out, pos = {}, 0
    for name, k, n, rice, table_bits in specs:
        if pos + table_bits > len(bits):
            raise CodesError("packed codes are truncated (histogram)")
        if rice is None:
            w = _width(k)
            raw = bits[pos : pos + table_bits].reshape(n, w).astype(np.int64) @ (1 << np.arange(w - 1, -1, -1))
            pos += table_bits
            if n and raw.max() >= k:
                raise CodesError(f"{name}: index out of range")
            out[name] = torch.from_numpy(raw.astype(np.int64))
            continue
        counts = _rice_decode(bits[pos : pos + table_bits], k, rice)
        pos += table_bits
        if counts.sum() != n:
            raise CodesError(f"{name}: histogram does not match the number of indices")
        if n == 0 or k == 1:
            out[name] = torch.zeros(n, dtype=torch.long)
            continue
        try:
            idx = coder.decode(_model(counts), n)
        except Exception as err:  # constriction raises its own error types on a corrupt stream
            raise CodesError(f"{name}: corrupt index stream ({err})") from None
        if np.bincount(idx, minlength=k)[:k].tolist() != counts.tolist() or idx.max() >= k:
            raise CodesError(f"{name}: corrupt index stream (decoded histogram differs)")
        out[name] = torch.from_numpy(idx.astype(np.int64))
    if not coder.is_empty():
        raise CodesError("packed codes have trailing data in the index stream")
    return out
