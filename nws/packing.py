"""Compact storage of a task's codes, near the entropy limit.

:func:`pack_codes` entropy-codes each layer's indices: the layer's index histogram (Rice-coded, so the
table overhead is paid and counted) and an rANS stream under that histogram (``constriction``), which
together cost within a fraction of a percent of the layer's empirical entropy. A layer too small to repay
its histogram is stored as fixed-width indices instead. Lossless.

Format (version 2), all integers unsigned LEB128 varints::

    b"NWSC" version:u8 layers
    per layer: len(name) name:utf-8 entries count mode      (mode 0: fixed width, m > 0: Rice parameter m-1)
    len(table) len(stream)/4 table stream                   (table: the layers' bits, MSB first; stream: u32 LE)
"""

from __future__ import annotations

from collections.abc import Mapping

import constriction
import numpy as np
import torch
from torch import Tensor

from nws.errors import NWSError

MAGIC = b"NWSC"
VERSION = 2
RAW = 0  # mode of a layer stored as fixed-width indices


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


def _rice_decode(bits: np.ndarray, zeros: np.ndarray, pos: int, count: int, k: int) -> tuple[np.ndarray, int]:
    """``count`` Rice-coded values starting at bit ``pos`` (``zeros``: every zero bit's position), and the
    position after them."""
    first = int(np.searchsorted(zeros, pos))
    ends = zeros[first : first + count]
    if len(ends) < count or ends[-1] + 1 + count * k > len(bits):
        raise CodesError("packed codes are truncated or corrupt (histogram)")
    q = np.diff(ends, prepend=pos - 1) - 1
    end = int(ends[-1]) + 1 + count * k
    low = bits[ends[-1] + 1 : end].reshape(count, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
    return (q.astype(np.int64) << k) | low, end


def _width(k: int) -> int:
    """Bits of a fixed-width index into ``k`` entries."""
    return (k - 1).bit_length()


def _raw_bits(idx: np.ndarray, width: int) -> np.ndarray:
    return ((idx[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).ravel()


def _model(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


class _Reader:
    """Bounds-checked reading of a packed header: every overrun is a :class:`CodesError`."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def varint(self) -> int:
        value = 0
        for shift in range(0, 63, 7):
            if self.pos >= len(self.data):
                raise CodesError("packed codes are truncated (header)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise CodesError("packed codes have a corrupt header (varint too long)")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise CodesError("packed codes are truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]


def pack_codes(codes: Mapping[str, Tensor], pool_sizes: Mapping[str, int] | int) -> bytes:
    """Entropy-code ``codes`` (as :func:`encode` returns them) into bytes; :func:`unpack_codes` inverts it."""
    layers = []
    for name, indices in codes.items():
        k = pool_sizes if isinstance(pool_sizes, int) else pool_sizes[name]
        idx = np.asarray(indices.detach().cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= k):
            raise ValueError(f"{name}: indices out of range for a pool of {k} entries")
        layers.append((name, k, idx, np.bincount(idx, minlength=k)))
    header, tables, coded = [_varint(len(layers))], [], []
    for name, k, idx, counts in layers:
        rice = _best_rice_k(counts)
        bits = _rice_bits(counts, rice)
        mode = rice + 1
        # A small layer can cost less as plain fixed-width indices than as a histogram plus its entropy.
        if idx.size * _width(k) < len(bits) + entropy_bits(idx, k):
            mode, bits = RAW, _raw_bits(idx, _width(k))
        else:
            coded.append((k, idx, counts))
        encoded = name.encode()
        header += [_varint(len(encoded)), encoded, _varint(k), _varint(idx.size), bytes([mode])]
        tables.append(bits)
    coder = constriction.stream.stack.AnsCoder()
    for k, idx, counts in reversed(coded):
        if idx.size and k > 1:
            coder.encode_reverse(idx.astype(np.int32), _model(counts))
    stream = coder.get_compressed().astype("<u4")
    table = np.packbits(np.concatenate(tables)) if tables else np.zeros(0, np.uint8)
    return b"".join([MAGIC, bytes([VERSION]), *header, _varint(table.size), _varint(stream.size),
                     table.tobytes(), stream.tobytes()])


def _read_header(reader: _Reader) -> list[tuple[str, int, int, int]]:
    if len(reader.data) <= len(MAGIC) or reader.data[: len(MAGIC)] != MAGIC:
        raise CodesError("not a packed-codes stream (bad magic or too short)")
    version = reader.take(len(MAGIC) + 1)[-1]
    if version != VERSION:
        raise CodesError(f"packed codes of format version {version}; this nws reads version {VERSION}")
    specs, names = [], set()
    for _ in range(reader.varint()):
        try:
            name = reader.take(reader.varint()).decode()
        except UnicodeDecodeError:
            raise CodesError("packed codes have a corrupt header (layer name)") from None
        k, n, mode = reader.varint(), reader.varint(), reader.take(1)[0]
        if not (1 <= k < 1 << 31 and n < 1 << 31 and mode <= 32) or name in names:
            raise CodesError("packed codes have a corrupt header (bad layer entry)")
        specs.append((name, k, n, mode))
        names.add(name)
    return specs


def unpack_codes(data: bytes, layout: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Tensor]:
    """Inverse of :func:`pack_codes`. Raises :class:`CodesError` on anything but a valid stream.

    ``layout`` (per layer ``(pool entries, number of indices)``, e.g. :func:`nws.codes.code_layout` of the
    model the codes are for) is checked against the header before anything is decoded, so an untrusted
    stream cannot make the reader allocate more than the model's own indices.
    """
    reader = _Reader(bytes(data), 0)
    specs = _read_header(reader)
    if layout is not None and {name: (k, n) for name, k, n, _ in specs} != dict(layout):
        raise CodesError("packed codes are for other layers, pool sizes or layer sizes than expected")
    n_table, n_words = reader.varint(), reader.varint()
    table, stream = reader.take(n_table), reader.take(4 * n_words)
    if reader.pos != len(reader.data):
        raise CodesError("packed codes have trailing bytes")
    bits = np.unpackbits(np.frombuffer(table, np.uint8))
    zeros = np.flatnonzero(bits == 0)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4").astype(np.uint32))
    out, pos = {}, 0
    for name, k, n, mode in specs:
        if mode == RAW:
            w = _width(k)
            if pos + n * w > len(bits):
                raise CodesError("packed codes are truncated (fixed-width indices)")
            raw = bits[pos : pos + n * w].reshape(n, w).astype(np.int64) @ (1 << np.arange(w - 1, -1, -1))
            pos += n * w
            if n and raw.max() >= k:
                raise CodesError(f"{name}: index out of range")
            out[name] = torch.from_numpy(raw.astype(np.int64))
            continue
        counts, pos = _rice_decode(bits, zeros, pos, k, mode - 1)
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
    if len(bits) - pos >= 8 or bits[pos:].any():
        raise CodesError("packed codes have trailing data in the tables")
    if not coder.is_empty():
        raise CodesError("packed codes have trailing data in the index stream")
    return out
