"""Compact storage of a task's codes, near the entropy limit, alone or against a reference assignment.

:func:`pack_codes` entropy-codes each layer's indices. Without a reference, a layer costs its index
histogram (Rice-coded, so the table overhead is paid and counted) and an rANS stream under that histogram
(``constriction``), within a fraction of a percent of the layer's empirical entropy (a layer too small to
repay a histogram is stored as fixed-width indices instead).

With a ``reference`` (another assignment of the same layers that the decoder also holds: the source
network's indices, or the previous task's), a layer costs only what differs from it:

- *which* indices changed: the gaps between changed positions, each split into an exponent-mantissa bucket
  (rANS under the layer's stored bucket histogram) and its remaining low bits (stored as they are). Changes
  cluster (whole filters move together), so this beats coding an independent changed/unchanged flag per
  index (``N * h(fraction changed)``).
- *what* they changed to, with whichever of these models is cheapest for the layer (the choice is stored):
  fixed width; the new indices' own histogram; the reference's histogram of the layer, smoothed by a stored
  weight (no table at all); or, given the pools, the new entry's *rank* among the old entry's pool
  neighbours (nearest first), bucketed like the gaps. A kernel that crosses into another cell during
  training mostly lands in a near neighbour of its old entry, so ranks are small.

Indices past the end of a shorter reference layer (a classifier that grew) are coded like new indices.
:func:`conditional_entropy_bits` is the estimate the coder is measured against.

Format (version 3), all integers unsigned LEB128 varints unless marked::

    b"NWSC" version:u8 crc:u32 crc(layout):u32 crc(reference, pools):u32 crc(codes):u32
    per layer, in name order: ref [c [buckets]] [model] [model]
    len(bits) len(stream)/4 bits stream           (bits: tables and raw bits, MSB first; stream: u32 LE)

    crc: CRC-32 of everything after it
    ref: 0 coded alone, 1 against a reference layer of the same length, else reference length + 1
    c: the number of changed indices; buckets (the gap table, when some but not all changed):
        largest bucket, rice | mantissa bits << 5 :u8
    model (of the changed indices' new values, then of the indices past the reference's end):
        kind:u8, then nothing (fixed width), rice:u8 (histogram), weight:u8 (prior) or buckets (ranks)

The layer names, pool sizes and lengths are not stored: the decoder is given them (the model's layout) and
checks their CRC before decoding anything, so an untrusted stream can never make it allocate more than the
model's own indices; the reference (and the pools, where ranks were used) are checked the same way, and the
decoded codes against their CRC. Format 2 streams (layer names in the header, no reference) still decode.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
from torch import Tensor

from nws.errors import NWSError

MAGIC = b"NWSC"
VERSION = 3
RAW = 0  # format 2: mode of a layer stored as fixed-width indices

# Models of a group of new indices (format 3).
FIXED, HISTOGRAM, PRIOR, RANK = 0, 1, 2, 3
RANK_MAX_ENTRIES = 1024  # larger pools are not ranked (a neighbour table takes 2 K^2 bytes)
PRIOR_WEIGHTS = 32  # prior weights 0, 1, 2, 4, ..., 2**30

Layout = Mapping[str, tuple[int, int]]


class CodesError(NWSError):
    """Packed codes that cannot be read (truncated, corrupt, of an unknown version, or for another layout,
    reference or pools than the ones given)."""


def entropy_bits(indices: Tensor | np.ndarray, num_entries: int | None = None) -> float:
    """``N * H``: the empirical-entropy bound, in bits, for storing ``indices`` with a known histogram."""
    counts = np.bincount(np.asarray(indices, dtype=np.int64), minlength=num_entries or 0)
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def conditional_entropy_bits(codes: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None,
                             pool_sizes: Mapping[str, int] | int) -> float:
    """The estimate a conditional coder is measured against, in bits: per layer, with ``m`` indices that
    have a reference and ``c`` of them changed, ``m * h(c / m)`` (an independent changed/unchanged flag per
    index) plus the empirical entropy of the new indices (the changed ones and any past the reference's
    end); a layer without reference costs its empirical entropy. No table or header is counted."""
    total = 0.0
    for name, indices in codes.items():
        k = pool_sizes if isinstance(pool_sizes, int) else pool_sizes[name]
        x = _as_array(indices)
        r = _as_array(reference[name]) if reference is not None and name in reference else x[:0]
        m = min(len(x), len(r))
        changed = np.flatnonzero(x[:m] != r[:m])
        total += m * _binary_entropy(len(changed) / m if m else 0.0)
        total += entropy_bits(np.concatenate([x[changed], x[m:]]), k)
    return total


def _as_array(indices: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, dtype=np.int64).ravel()


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
    if count == 0:
        return np.zeros(0, np.int64), pos
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


# Buckets: with M mantissa bits, a value v >= 1 below 2**(M + 1) is its own bucket; a larger one is bucketed by
# its octave and the M bits after its leading one, and its remaining low bits are stored as they are. Few
# values repay coarse buckets (a small table), many repay fine ones; the packer picks M per group.

def _bucket(v: np.ndarray, mantissa: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and number of low bits of each ``v >= 1``."""
    e = np.zeros(len(v), np.int64)
    for shift in (16, 8, 4, 2, 1):  # floor(log2 v), exactly, for v < 2**32
        e += np.where((v >> (e + shift)) > 0, shift, 0)
    small = v < 1 << (mantissa + 1)
    extra = np.where(small, 0, e - mantissa)
    top = (v >> extra) & ((1 << mantissa) - 1)
    bucket = np.where(small, v - 1, (1 << (mantissa + 1)) - 1 + ((e - mantissa - 1) << mantissa) + top)
    return bucket, extra


def _extra_widths(bucket: np.ndarray, mantissa: int) -> np.ndarray:
    t = bucket - ((1 << (mantissa + 1)) - 1)
    return np.where(t < 0, 0, (t >> mantissa) + 1)


def _unbucket(bucket: np.ndarray, low: np.ndarray, mantissa: int) -> np.ndarray:
    t = bucket - ((1 << (mantissa + 1)) - 1)
    top = (1 << mantissa) + (t & ((1 << mantissa) - 1))
    return np.where(t < 0, bucket + 1, (top << _extra_widths(bucket, mantissa)) | low)


def _low_bits(v: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ``widths[i]`` low bits of every ``v[i]``, MSB first, concatenated."""
    owner = np.repeat(np.arange(len(v)), widths)
    shift = np.repeat(np.cumsum(widths), widths) - np.arange(len(owner)) - 1
    return ((v[owner] >> shift) & 1).astype(np.uint8)


MANTISSAS = 4  # mantissa bits 0..3
# The largest bucket of a value below 2**31, per mantissa.
MAX_BUCKET = [int(_bucket(np.array([(1 << 31) - 1]), m)[0][0]) for m in range(MANTISSAS)]


# ------------------------------------------------------------------------------ neighbour ranks (pools)

def neighbour_order(codebook: Tensor | np.ndarray) -> np.ndarray:
    """``(K, K)``: row ``o`` lists every pool entry by its L2 distance to entry ``o`` (to about 4 significant
    digits), nearest first, ties by index. Computed in float32 one coordinate at a time (elementwise IEEE
    operations only, no BLAS), so the encoder and any decoder get the same table bit for bit. Cached by the
    codebook's bytes (read-only)."""
    if isinstance(codebook, Tensor):
        codebook = codebook.detach().cpu().numpy()
    book = np.ascontiguousarray(codebook, dtype="<f4")
    return _neighbour_order(book.shape, book.tobytes())


_TINY = np.float32(2.0**-126)  # the smallest normal float32


@functools.lru_cache(maxsize=64)
def _neighbour_order(shape: tuple[int, int], data: bytes, block: int = 64) -> np.ndarray:
    book = np.frombuffer(data, "<f4").reshape(shape)
    k, d = shape
    columns = [np.ascontiguousarray(book[:, j]) for j in range(d)]
    # Non-negative floats order like their bit patterns: one int32 sort key per pair, the distance's leading
    # bits above the entry's index (so near ties go by index).
    shift = max(1, _width(k))
    index = np.arange(k, dtype=np.int32)
    order = np.empty((k, k), np.int16)
    dist, diff = np.empty((block, k), np.float32), np.empty((block, k), np.float32)
    for start in range(0, k, block):  # blocks of rows that stay in cache
        rows = slice(start, min(k, start + block))
        total, term = dist[: rows.stop - start], diff[: rows.stop - start]
        total.fill(0)
        for j in range(d):
            np.subtract(book[rows, j, None], columns[j][None, :], out=term)
            np.multiply(term, term, out=term)
            np.copyto(term, 0, where=term < _TINY)  # the same whether or not the CPU flushes subnormals
            total += term
        keys = ((total.view(np.int32) >> shift) << shift) | index
        keys.sort(axis=1)
        order[rows] = keys & ((1 << shift) - 1)
    order.flags.writeable = False
    return order


def neighbour_rank(codebook: Tensor | np.ndarray) -> np.ndarray:
    """``(K, K)`` int16, the inverse of :func:`neighbour_order`: ``[o, k]`` is the rank of entry ``k`` among
    entry ``o``'s neighbours, the rank the coder codes when an index changes from ``o`` to ``k``. Read-only,
    cached like the order."""
    order = neighbour_order(codebook)
    return _neighbour_rank(order.shape, order.tobytes())


@functools.lru_cache(maxsize=64)
def _neighbour_rank(shape: tuple[int, int], data: bytes) -> np.ndarray:
    order = np.frombuffer(data, np.int16).reshape(shape).astype(np.int64)
    rank = np.empty(shape, np.int16)
    np.put_along_axis(rank, order, np.arange(shape[1], dtype=np.int16)[None, :], axis=1)
    rank.flags.writeable = False
    return rank


def buckets(values: np.ndarray, mantissa: int) -> tuple[np.ndarray, np.ndarray]:
    """The coder's bucket of each value ``>= 1`` (gaps between changes, neighbour ranks + 1) with
    ``mantissa`` bits, and the number of low bits stored as they are."""
    return _bucket(np.asarray(values, np.int64), mantissa)


def bucket_cost(values: np.ndarray) -> tuple[int, float, float]:
    """What the coder spends on values ``>= 1`` coded as buckets: the mantissa bits it picks, the bits of its
    stored bucket table (and header) and the bits of the values themselves (ideal rANS bits of the buckets
    plus their low bits)."""
    header, bits, _, cost = _bucket_plan(np.asarray(values, np.int64))
    table = len(bits[0]) + 8 * len(header)
    return header[-1] >> 5, float(table), float(cost - len(bits[0]))


def _crc(*parts: bytes | np.ndarray) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part if isinstance(part, bytes) else memoryview(np.ascontiguousarray(part)).cast("B"), crc)
    return crc


def _index_bytes(idx: np.ndarray, k: int) -> np.ndarray:
    """Indices in a canonical little-endian form (for CRCs)."""
    return idx.astype("<u2" if k <= 1 << 16 else "<u4")


def _layout_crc(layout: Layout, names: list[str]) -> int:
    parts = []
    for name in names:
        k, n = layout[name]
        encoded = name.encode()
        parts.append(_varint(len(encoded)) + encoded + _varint(k) + _varint(n))
    return _crc(b"".join(parts))


def _codes_crc(codes: Mapping[str, np.ndarray], layout: Layout, names: list[str]) -> int:
    return _crc(*[_index_bytes(codes[name], layout[name][0]) for name in names])


def _context_crc(reference: Mapping[str, np.ndarray], pools: Mapping[str, np.ndarray], layout: Layout,
                 names: list[str]) -> int:
    """CRC of what the decoder must hold besides the stream: the reference used (its length and indices per
    layer) and the pools of the layers coded by neighbour ranks."""
    parts: list[bytes | np.ndarray] = []
    for name in names:
        r = reference.get(name)
        parts.append(_varint(0 if r is None else len(r)))
        if r is not None:
            parts.append(_index_bytes(r, layout[name][0]))
    parts += [np.ascontiguousarray(pools[name], "<f4") for name in names if name in pools]
    return _crc(*parts)


# ------------------------------------------------------------------------------------------- encoding

@dataclass
class _Plan:
    """What a layer or a group of symbols adds to the stream: header bytes, bits, rANS segments (symbols and
    the histogram or probabilities they are coded under), and its cost in bits."""

    header: bytes = b""
    bits: list[np.ndarray] = field(default_factory=list)
    segments: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    cost: float = 0.0


def _ideal_bits(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Bits of symbols of histogram ``counts`` under a model with these (unnormalised) probabilities."""
    used = counts > 0
    p = probabilities[used] / probabilities.sum()
    return float(-(counts[used] * np.log2(p)).sum())


def _table_plan(symbols: np.ndarray, size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """A histogram of ``symbols`` over ``size`` values, its Rice parameter and its bits."""
    counts = np.bincount(symbols, minlength=size)
    rice = _best_rice_k(counts)
    return counts, rice, _rice_bits(counts, rice)


def _bucket_plan(values: np.ndarray) -> tuple[bytes, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]], float]:
    """Values >= 1 as buckets under a stored bucket histogram, plus their low bits, with the cheapest
    number of mantissa bits. Header: the largest bucket, then the Rice parameter and mantissa bits."""
    best = None
    for mantissa in range(MANTISSAS):
        bucket, widths = _bucket(values, mantissa)
        top = int(bucket.max())
        counts, rice, table = _table_plan(bucket, top + 1)
        cost = len(table) + int(widths.sum()) + entropy_bits(bucket)
        if best is None or cost < best[-1]:
            best = (_varint(top) + bytes([rice | mantissa << 5]), (table, values, widths), (bucket, counts), cost)
    header, (table, values, widths), segment, cost = best
    return header, [table, _low_bits(values, widths)], [segment], cost


def _values_plan(values: np.ndarray, k: int, ref_counts: np.ndarray | None, ranks: np.ndarray | None) -> _Plan:
    """The cheapest model of a group of new indices: fixed width, own histogram, the reference's
    histogram as a prior, or ranks among the old entries' neighbours."""
    w = _width(k)
    best = _Plan(bytes([FIXED]), [_raw_bits(values, w)], cost=len(values) * w)
    counts, rice, table = _table_plan(values, k)
    cost = len(table) + entropy_bits(values, k)
    if cost < best.cost:
        best = _Plan(bytes([HISTOGRAM, rice]), [table], [(values, counts)], cost)
    if ref_counts is not None:
        for s in range(PRIOR_WEIGHTS):
            prior = _prior(ref_counts, s)
            cost = _ideal_bits(counts, prior)
            if cost < best.cost:
                best = _Plan(bytes([PRIOR, s]), segments=[(values, prior)], cost=cost)
    if ranks is not None:
        header, bits, segments, cost = _bucket_plan(ranks + 1)
        if cost < best.cost:
            best = _Plan(bytes([RANK]) + header, bits, segments, cost)
    return best


def _prior(ref_counts: np.ndarray, s: int) -> np.ndarray:
    """The prior of weight ``s``: the reference histogram times ``2**(s-1)`` (0 for ``s = 0``) plus one."""
    weight = 0.0 if s == 0 else float(1 << (s - 1))
    return ref_counts.astype(np.float64) * weight + 1.0


def _layer_plan(x: np.ndarray, k: int, r: np.ndarray | None, book: np.ndarray | None) -> tuple[_Plan, bool]:
    """How one layer is coded (against ``r`` if given); also whether it uses the pool's neighbour ranks."""
    n_ref = 0 if r is None else len(r)
    plan = _Plan(_varint(0 if n_ref == 0 else 1 if n_ref == len(x) else n_ref + 1))
    if k == 1:
        return plan, False
    m = min(len(x), n_ref)
    ranked = False
    if m:
        changed = np.flatnonzero(x[:m] != r[:m])
        c = len(changed)
        plan.header += _varint(c)
        if 0 < c < m:
            header, bits, segments, _ = _bucket_plan(np.diff(changed, prepend=-1))
            plan.header += header
            plan.bits += bits
            plan.segments += segments
        if c:
            ref_counts = np.bincount(r, minlength=k)
            ranks = None
            if book is not None and k <= RANK_MAX_ENTRIES:
                order = neighbour_order(book)
                inverse = np.empty(order.shape, np.int64)
                np.put_along_axis(inverse, order.astype(np.int64), np.arange(k)[None, :], axis=1)
                ranks = inverse[r[changed], x[changed]]
            values = _values_plan(x[changed], k, ref_counts, ranks)
            ranked = values.header[0] == RANK
            plan.header += values.header
            plan.bits += values.bits
            plan.segments += values.segments
    if len(x) > m:
        values = _values_plan(x[m:], k, None if r is None or not len(r) else np.bincount(r, minlength=k), None)
        plan.header += values.header
        plan.bits += values.bits
        plan.segments += values.segments
    return plan, ranked


def pack_codes(codes: Mapping[str, Tensor], pool_sizes: Mapping[str, int] | int,
               reference: Mapping[str, Tensor] | None = None, pools: Mapping[str, Tensor] | None = None) -> bytes:
    """Entropy-code ``codes`` (as :func:`nws.encode` returns them) into bytes; :func:`unpack_codes` inverts
    it, given the same layout, ``reference`` and ``pools``.

    ``reference``: indices the decoder will also hold (e.g. the source network's, or the previous task's),
    per layer; a layer it lacks is coded alone, a shorter or longer one is used as far as it goes.
    ``pools``: each layer's codebook ``(K, d)``; with them the new entry of a changed index may be coded by
    its rank among the old entry's neighbours (the decoder then needs the same pools).
    """
    arrays, layout = {}, {}
    for name, indices in codes.items():
        k = pool_sizes if isinstance(pool_sizes, int) else pool_sizes[name]
        x = _as_array(indices)
        if x.size and (x.min() < 0 or x.max() >= k):
            raise ValueError(f"{name}: indices out of range for a pool of {k} entries")
        arrays[name], layout[name] = x, (k, len(x))
    names = sorted(arrays)
    refs = {}
    for name in names:
        if reference is not None and name in reference:
            r = _as_array(reference[name])
            if r.size and (r.min() < 0 or r.max() >= layout[name][0]):
                raise ValueError(f"{name}: reference indices out of range for a pool of {layout[name][0]} entries")
            refs[name] = r
    books = {name: np.ascontiguousarray(_as_float(pools[name])) for name in names if pools is not None
             and name in pools}
    for name, book in books.items():
        if book.ndim != 2 or book.shape[0] != layout[name][0]:
            raise ValueError(f"{name}: a pool of shape {book.shape} for indices into {layout[name][0]} entries")
    header, bits, segments, ranked = [], [], [], []
    for name in names:
        plan, uses_ranks = _layer_plan(arrays[name], layout[name][0], refs.get(name), books.get(name))
        header.append(plan.header)
        bits += plan.bits
        segments += plan.segments
        if uses_ranks:
            ranked.append(name)
    coder = constriction.stream.stack.AnsCoder()
    for symbols, counts in reversed(segments):
        if len(counts) > 1:  # an alphabet of one symbol costs nothing
            coder.encode_reverse(symbols.astype(np.int32), _model(counts))
    stream = coder.get_compressed().astype("<u4")
    packed = np.packbits(np.concatenate(bits)) if bits else np.zeros(0, np.uint8)
    crcs = [_layout_crc(layout, names), _context_crc(refs, {name: books[name] for name in ranked}, layout, names),
            _codes_crc(arrays, layout, names)]
    body = b"".join([*[c.to_bytes(4, "little") for c in crcs], *header, _varint(packed.size), _varint(stream.size),
                     packed.tobytes(), stream.tobytes()])
    return MAGIC + bytes([VERSION]) + _crc(body).to_bytes(4, "little") + body


def _as_float(book: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(book, Tensor):
        book = book.detach().cpu().float().numpy()
    return np.asarray(book, dtype=np.float32)


# ------------------------------------------------------------------------------------------- decoding

class _Reader:
    """Bounds-checked reading of a packed header: every overrun is a :class:`CodesError`."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def varint(self, limit: int = 1 << 62) -> int:
        value = 0
        for shift in range(0, 63, 7):
            if self.pos >= len(self.data):
                raise CodesError("packed codes are truncated (header)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise CodesError("packed codes have a corrupt header (value out of range)")
                return value
        raise CodesError("packed codes have a corrupt header (varint too long)")

    def byte(self, limit: int = 255) -> int:
        value = self.take(1)[0]
        if value > limit:
            raise CodesError("packed codes have a corrupt header (value out of range)")
        return value

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise CodesError("packed codes are truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]


def _read_buckets(reader: _Reader) -> tuple[int, int]:
    """A bucket table's header: (Rice parameter | mantissa bits << 5, largest bucket)."""
    top = reader.varint(MAX_BUCKET[-1])
    param = reader.byte((MANTISSAS - 1) << 5 | 31)
    if top > MAX_BUCKET[param >> 5]:
        raise CodesError("packed codes have a corrupt header (bucket out of range)")
    return param, top


@dataclass(frozen=True)
class _Model:
    """A stored model of a group of new indices: its kind, parameter (Rice parameter of a histogram, or
    prior weight) and, for ranks, the largest bucket."""

    kind: int
    param: int = 0  # Rice parameter (| mantissa bits << 5 for ranks), or prior weight
    top: int = 0

    @staticmethod
    def read(reader: _Reader, ranks: bool, prior: bool) -> _Model:
        kind = reader.byte(RANK)
        if (kind == RANK and not ranks) or (kind == PRIOR and not prior):
            raise CodesError("packed codes have a corrupt header (a model the layer cannot use)")
        if kind == FIXED:
            return _Model(kind)
        if kind == HISTOGRAM:
            return _Model(kind, reader.byte(31))
        if kind == PRIOR:
            return _Model(kind, reader.byte(PRIOR_WEIGHTS - 1))
        return _Model(kind, *_read_buckets(reader))


@dataclass(frozen=True)
class _Layer:
    """A layer's header: reference length, changed count, gap table, models of new and appended indices."""

    name: str
    k: int
    n: int
    n_ref: int
    changed: int = 0
    gaps: tuple[int, int] | None = None  # (Rice parameter | mantissa bits << 5, largest bucket)
    new: _Model | None = None
    tail: _Model | None = None

    @staticmethod
    def read(reader: _Reader, name: str, k: int, n: int) -> _Layer:
        coded = reader.varint((1 << 31) + 1)
        n_ref = n if coded == 1 else max(coded - 1, 0)
        if (coded == 1 and n == 0) or (coded > 1 and n_ref == n):
            raise CodesError("packed codes have a corrupt header (reference length)")
        if k == 1:
            return _Layer(name, k, n, n_ref)
        m = min(n, n_ref)
        c = reader.varint(m) if m else 0
        gaps = _read_buckets(reader) if 0 < c < m else None
        new = _Model.read(reader, ranks=True, prior=True) if c else None
        tail = _Model.read(reader, ranks=False, prior=n_ref > 0) if n > m else None
        return _Layer(name, k, n, n_ref, c, gaps, new, tail)


class _Bits:
    """The bit section, read in order."""

    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
        self.zeros = np.flatnonzero(self.bits == 0)
        self.pos = 0

    def rice(self, count: int, k: int) -> np.ndarray:
        values, self.pos = _rice_decode(self.bits, self.zeros, self.pos, count, k)
        return values

    def fixed(self, count: int, width: int) -> np.ndarray:
        if self.pos + count * width > len(self.bits):
            raise CodesError("packed codes are truncated (fixed-width indices)")
        raw = self.bits[self.pos : self.pos + count * width].reshape(count, width).astype(np.int64)
        self.pos += count * width
        return raw @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))

    def varying(self, widths: np.ndarray) -> np.ndarray:
        """``widths[i]`` bits for every value, MSB first."""
        total = int(widths.sum())
        if self.pos + total > len(self.bits):
            raise CodesError("packed codes are truncated (low bits)")
        owner = np.repeat(np.arange(len(widths)), widths)
        shift = np.repeat(np.cumsum(widths), widths) - np.arange(total) - 1
        part = self.bits[self.pos : self.pos + total].astype(np.int64) << shift
        self.pos += total
        return np.bincount(owner, weights=part, minlength=len(widths)).astype(np.int64)

    def trailing(self) -> bool:
        left = self.bits[self.pos :]
        return len(left) >= 8 or bool(left.any())


class _Decoder:
    """Decodes the layers' symbols in the order they were coded: bit section and rANS stream."""

    def __init__(self, bits: bytes, stream: bytes) -> None:
        self.bits = _Bits(bits)
        self.coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4").astype(np.uint32))

    def symbols(self, probabilities: np.ndarray, count: int, what: str) -> np.ndarray:
        if count == 0 or len(probabilities) == 1:
            return np.zeros(count, np.int64)
        try:
            out = self.coder.decode(_model(probabilities), count).astype(np.int64)
        except Exception as err:  # constriction raises its own error types on a corrupt stream
            raise CodesError(f"{what}: corrupt index stream ({err})") from None
        if out.min() < 0 or out.max() >= len(probabilities):
            raise CodesError(f"{what}: corrupt index stream (symbol out of range)")
        return out

    def histogram(self, size: int, rice: int, count: int, what: str) -> np.ndarray:
        counts = self.bits.rice(size, rice)
        if counts.sum() != count:
            raise CodesError(f"{what}: histogram does not match the number of indices")
        return counts

    def buckets(self, param: int, top: int, count: int, what: str) -> np.ndarray:
        """``count`` values >= 1: buckets under their stored histogram, then their low bits."""
        mantissa = param >> 5
        bucket = self.symbols(self.histogram(top + 1, param & 31, count, what), count, what)
        return _unbucket(bucket, self.bits.varying(_extra_widths(bucket, mantissa)), mantissa)

    def values(self, model: _Model, count: int, k: int, r: np.ndarray | None, old: np.ndarray | None,
               order: np.ndarray | None, what: str) -> np.ndarray:
        if model.kind == FIXED:
            out = self.bits.fixed(count, _width(k))
        elif model.kind == HISTOGRAM:
            counts = self.histogram(k, model.param, count, what)
            out = self.symbols(counts, count, what)
            if not np.array_equal(np.bincount(out, minlength=k), counts):
                raise CodesError(f"{what}: corrupt index stream (decoded histogram differs)")
        elif model.kind == PRIOR:
            out = self.symbols(_prior(np.bincount(r, minlength=k), model.param), count, what)
        else:
            ranks = self.buckets(model.param, model.top, count, what) - 1
            if ranks.max() >= k:
                raise CodesError(f"{what}: neighbour rank out of range")
            out = order[old, ranks].astype(np.int64)
            if (out == old).any():
                raise CodesError(f"{what}: a changed index equal to its reference")
        if count and out.max() >= k:
            raise CodesError(f"{what}: index out of range")
        return out

    def layer(self, spec: _Layer, r: np.ndarray | None, order: np.ndarray | None) -> np.ndarray:
        if spec.k == 1:
            return np.zeros(spec.n, np.int64)
        m = min(spec.n, spec.n_ref)
        parts = []
        if m:
            out = r[:m].copy()
            c = spec.changed
            if spec.gaps is not None:
                changed = np.cumsum(self.buckets(*spec.gaps, c, spec.name)) - 1
                if changed[-1] >= m:
                    raise CodesError(f"{spec.name}: changed positions past the layer's end")
            else:
                changed = np.arange(m if c else 0)
            if c:
                out[changed] = self.values(spec.new, c, spec.k, r, out[changed], order, spec.name)
            parts.append(out)
        if spec.tail is not None:
            parts.append(self.values(spec.tail, spec.n - m, spec.k, r, None, None, spec.name))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _read_v3(reader: _Reader, layout: Layout, reference: Mapping[str, Tensor] | None,
             pools: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    names = sorted(layout)
    crc_stream = int.from_bytes(reader.take(4), "little")
    if crc_stream != _crc(reader.data[reader.pos :]):
        raise CodesError("packed codes are corrupt (CRC mismatch)")
    crc_layout, crc_context, crc_codes = (int.from_bytes(reader.take(4), "little") for _ in range(3))
    if crc_layout != _layout_crc(layout, names):
        raise CodesError("packed codes are for other layers, pool sizes or layer sizes than expected")
    # The whole header (its counts bounded by the layout) and the reference are checked before decoding.
    specs = [_Layer.read(reader, name, *layout[name]) for name in names]
    refs = {}
    for spec in specs:
        if not spec.n_ref:
            continue
        if reference is None or spec.name not in reference:
            raise CodesError(f"packed codes were coded against a reference; none was given for {spec.name}")
        refs[spec.name] = _as_array(reference[spec.name])
        if len(refs[spec.name]) != spec.n_ref:
            raise CodesError(f"packed codes were coded against a reference of {spec.n_ref} indices for "
                             f"{spec.name}; the reference given has {len(refs[spec.name])}")
    ranked = [spec.name for spec in specs if spec.new is not None and spec.new.kind == RANK]
    if ranked and (pools is None or any(name not in pools for name in ranked)):
        raise CodesError("packed codes were coded with the pools' neighbour ranks; no pools were given")
    books = {name: _as_float(pools[name]) for name in ranked}
    if any(book.ndim != 2 or book.shape[0] != layout[name][0] for name, book in books.items()):
        raise CodesError("the pools given do not match the layout")
    if crc_context != _context_crc(refs, books, layout, names):
        raise CodesError("packed codes were coded against another reference or other pools than the ones given")
    for name, r in refs.items():
        if r.size and (r.min() < 0 or r.max() >= layout[name][0]):
            raise CodesError(f"{name}: reference index out of range")
    orders = {name: neighbour_order(book) for name, book in books.items()}
    n_bits, n_words = reader.varint(len(reader.data)), reader.varint(len(reader.data))
    decoder = _Decoder(reader.take(n_bits), reader.take(4 * n_words))
    if reader.pos != len(reader.data):
        raise CodesError("packed codes have trailing bytes")
    out = {spec.name: decoder.layer(spec, refs.get(spec.name), orders.get(spec.name)) for spec in specs}
    if decoder.bits.trailing():
        raise CodesError("packed codes have trailing data in the tables")
    if not decoder.coder.is_empty():
        raise CodesError("packed codes have trailing data in the index stream")
    if crc_codes != _codes_crc(out, layout, names):
        raise CodesError("packed codes are corrupt (the decoded codes fail their CRC)")
    return {name: torch.from_numpy(out[name]) for name in layout}


def unpack_codes(data: bytes, layout: Layout, reference: Mapping[str, Tensor] | None = None,
                 pools: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Inverse of :func:`pack_codes`: the codes, keyed and ordered as ``layout``. Raises
    :class:`CodesError` on anything but a valid stream for this layout, reference and pools.

    ``layout`` (per layer ``(pool entries, number of indices)``, e.g. :func:`nws.codes.code_layout` of the
    model the codes are for) is checked before anything is decoded, so an untrusted stream cannot make the
    reader allocate more than the model's own indices; so are ``reference`` (the same indices the codes
    were packed against, if any) and ``pools`` (needed where the packer used neighbour ranks).
    """
    reader = _Reader(bytes(data), 0)
    if len(reader.data) <= len(MAGIC) or reader.data[: len(MAGIC)] != MAGIC:
        raise CodesError("not a packed-codes stream (bad magic or too short)")
    version = reader.take(len(MAGIC) + 1)[-1]
    if version == 2:
        return _read_v2(reader, layout)
    if version != VERSION:
        raise CodesError(f"packed codes of format version {version}; this nws reads versions 2 and {VERSION}")
    return _read_v3(reader, layout, reference, pools)


def _read_v2(reader: _Reader, layout: Layout) -> dict[str, Tensor]:
    """Format 2: per layer its name, pool size, count and mode, then Rice tables and one rANS stream."""
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
    if {name: (k, n) for name, k, n, _ in specs} != dict(layout):
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
    return {name: out[name] for name in layout}
