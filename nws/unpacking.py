"""The reader of packed codes (:mod:`nws.packing` describes the format): every header and table is read with
bounds checks, the layout, the reference and the pools are checked against the stream's CRCs before anything
is decoded, and the decoded codes against theirs; anything else is a :class:`~nws.bitcodes.CodesError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from torch import Tensor

from nws.bitcodes import (MANTISSAS, MAX_BUCKET, Bits, CodesError, Reader, categorical, crc, extra_widths, unbucket,
                          width)
from nws.packing import (FIXED, HISTOGRAM, MAGIC, PRIOR, PRIOR_WEIGHTS, RANK, VERSION, Layout, _as_array,
                         _as_float, _codes_crc, _context_crc, _layout_crc, _prior, neighbour_order)


def _read_buckets(reader: Reader) -> tuple[int, int]:
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
    def read(reader: Reader, ranks: bool, prior: bool) -> _Model:
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
    def read(reader: Reader, name: str, k: int, n: int) -> _Layer:
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


class _Decoder:
    """Decodes the layers' symbols in the order they were coded: bit section and rANS stream."""

    def __init__(self, bits: bytes, stream: bytes) -> None:
        self.bits = Bits(bits)
        self.coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4").astype(np.uint32))

    def symbols(self, probabilities: np.ndarray, count: int, what: str) -> np.ndarray:
        if count == 0 or len(probabilities) == 1:
            return np.zeros(count, np.int64)
        try:
            out = self.coder.decode(categorical(probabilities), count).astype(np.int64)
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
        return unbucket(bucket, self.bits.varying(extra_widths(bucket, mantissa)), mantissa)

    def values(self, model: _Model, count: int, k: int, r: np.ndarray | None, old: np.ndarray | None,
               order: np.ndarray | None, what: str) -> np.ndarray:
        if model.kind == FIXED:
            out = self.bits.fixed(count, width(k))
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


def _read_v3(reader: Reader, layout: Layout, reference: Mapping[str, Tensor] | None,
             pools: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    names = sorted(layout)
    crc_stream = int.from_bytes(reader.take(4), "little")
    if crc_stream != crc(reader.data[reader.pos :]):
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
    reader = Reader(bytes(data), 0)
    if len(reader.data) <= len(MAGIC) or reader.data[: len(MAGIC)] != MAGIC:
        raise CodesError("not a packed-codes stream (bad magic or too short)")
    version = reader.take(len(MAGIC) + 1)[-1]
    if version == 2:
        raise CodesError("packed codes of format version 2, of an earlier nws; convert the run with nws upgrade")
    if version != VERSION:
        raise CodesError(f"packed codes of format version {version}; this nws reads version {VERSION}")
    return _read_v3(reader, layout, reference, pools)
