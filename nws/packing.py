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
:func:`conditional_entropy_bits` is the estimate the coder is measured against. The reader of the format is
:func:`nws.unpacking.unpack_codes`; the primitives both use (Rice codes, varints, buckets, bit readers) are
:mod:`nws.bitcodes`.

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
decoded codes against their CRC. Streams of format 2 (layer names in the header, no reference) are an
earlier nws's: ``nws upgrade`` converts the runs that hold them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import constriction
import numpy as np
from torch import Tensor

from nws.bitcodes import (MANTISSAS, best_rice_k, bucketize, categorical, crc, low_bits, raw_bits, rice_bits, varint,
                          width)

MAGIC = b"NWSC"
VERSION = 3

# Models of a group of new indices (format 3).
FIXED, HISTOGRAM, PRIOR, RANK = 0, 1, 2, 3
RANK_MAX_ENTRIES = 1024  # larger pools are not ranked (a neighbour table takes 2 K^2 bytes)
PRIOR_WEIGHTS = 32  # prior weights 0, 1, 2, 4, ..., 2**30

Layout = Mapping[str, tuple[int, int]]


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
    shift = max(1, width(k))
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
    return bucketize(np.asarray(values, np.int64), mantissa)


def bucket_cost(values: np.ndarray) -> tuple[int, float, float]:
    """What the coder spends on values ``>= 1`` coded as buckets: the mantissa bits it picks, the bits of its
    stored bucket table (and header) and the bits of the values themselves (ideal rANS bits of the buckets
    plus their low bits)."""
    header, bits, _, cost = _bucket_plan(np.asarray(values, np.int64))
    table = len(bits[0]) + 8 * len(header)
    return header[-1] >> 5, float(table), float(cost - len(bits[0]))


def _index_bytes(idx: np.ndarray, k: int) -> np.ndarray:
    """Indices in a canonical little-endian form (for CRCs)."""
    return idx.astype("<u2" if k <= 1 << 16 else "<u4")


def _layout_crc(layout: Layout, names: list[str]) -> int:
    parts = []
    for name in names:
        k, n = layout[name]
        encoded = name.encode()
        parts.append(varint(len(encoded)) + encoded + varint(k) + varint(n))
    return crc(b"".join(parts))


def _codes_crc(codes: Mapping[str, np.ndarray], layout: Layout, names: list[str]) -> int:
    return crc(*[_index_bytes(codes[name], layout[name][0]) for name in names])


def _context_crc(reference: Mapping[str, np.ndarray], pools: Mapping[str, np.ndarray], layout: Layout,
                 names: list[str]) -> int:
    """CRC of what the decoder must hold besides the stream: the reference used (its length and indices per
    layer) and the pools of the layers coded by neighbour ranks."""
    parts: list[bytes | np.ndarray] = []
    for name in names:
        r = reference.get(name)
        parts.append(varint(0 if r is None else len(r)))
        if r is not None:
            parts.append(_index_bytes(r, layout[name][0]))
    parts += [np.ascontiguousarray(pools[name], "<f4") for name in names if name in pools]
    return crc(*parts)


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
    rice = best_rice_k(counts)
    return counts, rice, rice_bits(counts, rice)


def _bucket_plan(values: np.ndarray) -> tuple[bytes, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]], float]:
    """Values >= 1 as buckets under a stored bucket histogram, plus their low bits, with the cheapest
    number of mantissa bits. Header: the largest bucket, then the Rice parameter and mantissa bits."""
    best = None
    for mantissa in range(MANTISSAS):
        bucket, widths = bucketize(values, mantissa)
        top = int(bucket.max())
        counts, rice, table = _table_plan(bucket, top + 1)
        cost = len(table) + int(widths.sum()) + entropy_bits(bucket)
        if best is None or cost < best[-1]:
            best = (varint(top) + bytes([rice | mantissa << 5]), (table, values, widths), (bucket, counts), cost)
    header, (table, values, widths), segment, cost = best
    return header, [table, low_bits(values, widths)], [segment], cost


def _values_plan(values: np.ndarray, k: int, ref_counts: np.ndarray | None, ranks: np.ndarray | None) -> _Plan:
    """The cheapest model of a group of new indices: fixed width, own histogram, the reference's
    histogram as a prior, or ranks among the old entries' neighbours."""
    w = width(k)
    best = _Plan(bytes([FIXED]), [raw_bits(values, w)], cost=len(values) * w)
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
    plan = _Plan(varint(0 if n_ref == 0 else 1 if n_ref == len(x) else n_ref + 1))
    if k == 1:
        return plan, False
    m = min(len(x), n_ref)
    ranked = False
    if m:
        changed = np.flatnonzero(x[:m] != r[:m])
        c = len(changed)
        plan.header += varint(c)
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
            coder.encode_reverse(symbols.astype(np.int32), categorical(counts))
    stream = coder.get_compressed().astype("<u4")
    packed = np.packbits(np.concatenate(bits)) if bits else np.zeros(0, np.uint8)
    crcs = [_layout_crc(layout, names), _context_crc(refs, {name: books[name] for name in ranked}, layout, names),
            _codes_crc(arrays, layout, names)]
    body = b"".join([*[c.to_bytes(4, "little") for c in crcs], *header, varint(packed.size), varint(stream.size),
                     packed.tobytes(), stream.tobytes()])
    return MAGIC + bytes([VERSION]) + crc(body).to_bytes(4, "little") + body


def _as_float(book: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(book, Tensor):
        book = book.detach().cpu().float().numpy()
    return np.asarray(book, dtype=np.float32)
