"""The codec's primitives: bit strings, Rice codes, varints, exponent-mantissa buckets, fixed-width values,
the rANS model (``constriction``), CRCs, and bounds-checked readers of a header and of a bit section. The
stream format built from them is :mod:`nws.packing`."""

from __future__ import annotations

import zlib

import constriction
import numpy as np

from nws.errors import NWSError


class CodesError(NWSError):
    """Packed codes that cannot be read (truncated, corrupt, of an unknown version, or for another layout,
    reference or pools than the ones given)."""


# Rice coding of the histograms, unary parts first: each count c costs (c >> k) ones and a zero, then all
# counts' k low bits follow, so both halves decode with array operations.

def rice_bits(values: np.ndarray, k: int) -> np.ndarray:
    q = values >> k
    unary = np.zeros(int(q.sum()) + len(values), dtype=np.uint8)
    ends = np.cumsum(q + 1) - 1
    unary[:] = 1
    unary[ends] = 0
    low = ((values[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).ravel()
    return np.concatenate([unary, low])


def best_rice_k(values: np.ndarray) -> int:
    costs = [int(((values >> k) + 1 + k).sum()) for k in range(32)]
    return int(np.argmin(costs))


def rice_decode(bits: np.ndarray, zeros: np.ndarray, pos: int, count: int, k: int) -> tuple[np.ndarray, int]:
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


def width(k: int) -> int:
    """Bits of a fixed-width index into ``k`` entries."""
    return (k - 1).bit_length()


def raw_bits(idx: np.ndarray, width: int) -> np.ndarray:
    return ((idx[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).ravel()


def categorical(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# Buckets: with M mantissa bits, a value v >= 1 below 2**(M + 1) is its own bucket; a larger one is bucketed by
# its octave and the M bits after its leading one, and its remaining low bits are stored as they are. Few
# values repay coarse buckets (a small table), many repay fine ones; the packer picks M per group.

def bucketize(v: np.ndarray, mantissa: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and number of low bits of each ``v >= 1``."""
    e = np.zeros(len(v), np.int64)
    for shift in (16, 8, 4, 2, 1):  # floor(log2 v), exactly, for v < 2**32
        e += np.where((v >> (e + shift)) > 0, shift, 0)
    small = v < 1 << (mantissa + 1)
    extra = np.where(small, 0, e - mantissa)
    top = (v >> extra) & ((1 << mantissa) - 1)
    bucket = np.where(small, v - 1, (1 << (mantissa + 1)) - 1 + ((e - mantissa - 1) << mantissa) + top)
    return bucket, extra


def extra_widths(bucket: np.ndarray, mantissa: int) -> np.ndarray:
    t = bucket - ((1 << (mantissa + 1)) - 1)
    return np.where(t < 0, 0, (t >> mantissa) + 1)


def unbucket(bucket: np.ndarray, low: np.ndarray, mantissa: int) -> np.ndarray:
    t = bucket - ((1 << (mantissa + 1)) - 1)
    top = (1 << mantissa) + (t & ((1 << mantissa) - 1))
    return np.where(t < 0, bucket + 1, (top << extra_widths(bucket, mantissa)) | low)


def low_bits(v: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ``widths[i]`` low bits of every ``v[i]``, MSB first, concatenated."""
    owner = np.repeat(np.arange(len(v)), widths)
    shift = np.repeat(np.cumsum(widths), widths) - np.arange(len(owner)) - 1
    return ((v[owner] >> shift) & 1).astype(np.uint8)


MANTISSAS = 4  # mantissa bits 0..3
# The largest bucket of a value below 2**31, per mantissa.
MAX_BUCKET = [int(bucketize(np.array([(1 << 31) - 1]), m)[0][0]) for m in range(MANTISSAS)]


def crc(*parts: bytes | np.ndarray) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part if isinstance(part, bytes) else memoryview(np.ascontiguousarray(part)).cast("B"), crc)
    return crc


class Reader:
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


class Bits:
    """The bit section, read in order."""

    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
        self.zeros = np.flatnonzero(self.bits == 0)
        self.pos = 0

    def rice(self, count: int, k: int) -> np.ndarray:
        values, self.pos = rice_decode(self.bits, self.zeros, self.pos, count, k)
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
