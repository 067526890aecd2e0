"""Entropy-coded storage of codes: exact round trips, size near the entropy bound, and safe failure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nws import entropy_bits, pack_codes, unpack_codes
from nws.packing import MAGIC, VERSION, CodesError, _varint


def _skewed(rng: np.random.Generator, n: int, k: int, alpha: float) -> torch.Tensor:
    return torch.from_numpy(rng.choice(k, n, p=rng.dirichlet(np.full(k, alpha))))


def _assert_roundtrip(codes: dict[str, torch.Tensor], pool_sizes) -> bytes:
    data = pack_codes(codes, pool_sizes)
    assert isinstance(data, bytes)
    out = unpack_codes(data)
    assert list(out) == list(codes)
    for name, idx in codes.items():
        assert out[name].dtype == torch.long
        assert torch.equal(out[name], idx.long()), name
    return data


def test_roundtrip_skewed_layers() -> None:
    rng = np.random.default_rng(0)
    codes = {f"layer{i}.conv": _skewed(rng, n, 512, alpha)
             for i, (n, alpha) in enumerate([(3000, 0.05), (1000, 0.5), (4096, 2.0), (17, 0.3)])}
    _assert_roundtrip(codes, 512)


@pytest.mark.parametrize("symbol", [
37, 511, 0])
def test_roundtrip_single_used_symbol(symbol: int) -> None:
    _assert_roundtrip({"a": torch.full((1000,), symbol)}, 512)


def test_roundtrip_single_symbol_zero_next_to_other_layers() -> None:
    rng = np.random.default_rng(1)
    _assert_roundtrip({"a": torch.zeros(500, dtype=torch.long), "b": _skewed(rng, 300, 512, 0.5)}, 512)


def test_roundtrip_empty_layers() -> None:
    rng = np.random.default_rng(2)
    empty = torch.zeros(0, dtype=torch.long)
    _assert_roundtrip({"first": empty, "mid": _skewed(rng, 200, 64, 0.5), "last": empty}, 64)
    _assert_roundtrip({"only": empty}, 64)
    _assert_roundtrip({}, 64)


def test_roundtrip_pool_of_one() -> None:
    _assert_roundtrip({"a": torch.zeros(10, dtype=torch.long), "b": torch.zeros(3, dtype=torch.long)}, 1)


def test_roundtrip_pool_of_one_empty_layer() -> None:
    _assert_roundtrip({"a": torch.zeros(0, dtype=torch.long)}, 1)


@pytest.mark.parametrize("k", [2, 4096])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_roundtrip_pool_sizes(k: int, alpha: float) -> None:
    rng = np.random.default_rng(k)
    codes = {"a": _skewed(rng, 5000, k, alpha), "b": torch.tensor([k - 1, 0, k - 1])}
    _assert_roundtrip(codes, k)


def test_roundtrip_per_layer_pool_sizes() -> None:
    rng = np.random.default_rng(3)
    codes = {"a": _skewed(rng, 700, 3, 1.0), "b": _skewed(rng, 2000, 4096, 0.2), "c": torch.tensor([1, 0, 1]),
             "d": _skewed(rng, 50, 512, 1.0).int()}
    sizes = {"a": 3, "b": 4096, "c": 2, "d": 512}
    _assert_roundtrip(codes, sizes)


def test_size_near_entropy() -> None:
    rng = np.random.default_rng(4)
    codes = {f"l{i}": _skewed(rng, 100_000, 512, 0.3) for i in range(3)}
    data = _assert_roundtrip(codes, 512)
    bound = sum(entropy_bits(idx, 512) for idx in codes.values()) / 8
    assert bound <= len(data) <= 1.01 * bound
    assert len(data) < 3 * 100_000 * 9 / 8


def test_entropy_bits() -> None:
    assert entropy_bits(torch.tensor([0, 0, 1, 1])) == 4.0
    assert entropy_bits(torch.tensor([0, 1, 2, 3]), 8) == 8.0
    assert entropy_bits(np.full(10, 5), 8) == 0.0


@pytest.mark.parametrize("bad", [-1, 16, 1000])
def test_pack_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        pack_codes({"a": torch.tensor([0, 3, bad, 2])}, 16)
    with pytest.raises(ValueError):
        pack_codes({"ok": torch.tensor([7]), "a": torch.tensor([bad])}, {"ok": 512, "a": 16})


def _sample_stream() -> bytes:
    rng = np.random.default_rng(5)
    codes = {"conv1": _skewed(rng, 400, 64, 0.3), "empty": torch.zeros(0, dtype=torch.long),
             "fc": _skewed(rng, 60, 3, 1.0)}
    return pack_codes(codes, {"conv1": 64, "empty": 4, "fc": 3})


def _raises_codes_error(data: bytes) -> None:
    with pytest.raises(CodesError):
        unpack_codes(data)


def test_truncated_streams() -> None:
    data = _sample_stream()
    for end in range(len(data)):
        _raises_codes_error(data[:end])
    _raises_codes_error(data + b"\x00")
    _raises_codes_error(data + data)


def test_random_bit_flips() -> None:
    data = _sample_stream()
    rng = np.random.default_rng(6)
    decoded = 0
    for _ in range(300):
        flipped = bytearray(data)
        for pos in rng.integers(len(data) * 8, size=rng.integers(1, 4)):
            flipped[pos // 8] ^= 1 << (pos % 8)
        try:
            out = unpack_codes(bytes(flipped))
        except CodesError:
            continue
        decoded += 1
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.long for v in out.values())
    assert decoded < 30


def test_bad_magic_version_and_empty() -> None:
    data = _sample_stream()
    _raises_codes_error(b"")
    _raises_codes_error(MAGIC)
    _raises_codes_error(b"NWSX" + data[4:])
    _raises_codes_error(b"\x00" * len(data))
    for version in (VERSION + 1, 255, 0):
        _raises_codes_error(data[:4] + bytes([version]) + data[5:])


def _crafted(*layers: tuple[bytes, int, int, int], table: bytes = b"", words: int = 0, tail: bytes = b"") -> bytes:
    """A stream with a hand-written header: layers as ``(name, entries, count, mode)``."""
    head = [_varint(len(layers))]
    for name, k, n, mode in layers:
        head += [_varint(len(name)), name, _varint(k), _varint(n), bytes([mode])]
    return MAGIC + bytes([VERSION]) + b"".join(head) + _varint(len(table)) + _varint(words) + table + tail


@pytest.mark.parametrize("data", [
    _crafted((b"a", 0, 0, 1)),                      # a pool of no entries
    _crafted((b"a", 1 << 31, 0, 1)),                # a pool too large
    _crafted((b"a", 4, 1 << 31, 1)),                # too many indices
    _crafted((b"a", 4, 0, 33)),                     # Rice parameter 32
    _crafted((b"a", 4, 0, 1), (b"a", 4, 0, 1), table=b"\x00"),  # a layer twice
    _crafted((b"\xff", 4, 0, 1), table=b"\x00"),    # a name that is not UTF-8
    _crafted((b"a", 4, 5, 1), table=b"\x00"),        # histogram sums to 0, not 5
    _crafted((b"a", 4, 3, 0)),                      # 3 fixed-width indices, no bits for them
    MAGIC + bytes([VERSION]) + b"\xff" * 12,        # a varint longer than 63 bits
    _crafted((b"a", 4, 0, 1), table=b"\x01"),        # a set padding bit after the tables
    _crafted((b"a", 4, 0, 1), table=b"\x00\x00"),    # a whole trailing table byte
])
def test_corrupt_headers(data: bytes) -> None:
    _raises_codes_error(data)


def test_layout_is_checked_before_decoding() -> None:
    """A stream that claims 2**31 - 1 indices of one entry costs a few bytes; with the layout of the model
    it is for, the reader refuses it before allocating anything."""
    huge = _crafted((b"a", 2, (1 << 31) - 1, 32), table=np.packbits(np.r_[np.zeros(2), _bits((1 << 31) - 1, 31),
                                                                           _bits(0, 31)].astype(np.uint8)).tobytes())
    with pytest.raises(CodesError, match="other layers"):
        unpack_codes(huge, {"a": (2, 100)})
    data = _sample_stream()
    layout = {"conv1": (64, 400), "empty": (4, 0), "fc": (3, 60)}
    assert list(unpack_codes(data, layout)) == list(layout)
    for wrong in ({**layout, "fc": (3, 61)}, {**layout, "fc": (4, 60)}, {"conv1": (64, 400), "fc": (3, 60)},
                  {**layout, "extra": (2, 1)}):
        with pytest.raises(CodesError, match="other layers"):
            unpack_codes(data, wrong)


def test_header_costs_a_few_bytes_per_layer() -> None:
    """The per-layer header is the name plus a few varint bytes: 20 one-index layers of 16 entries, stored
    as fixed width, take 7 bytes each with their names and indices."""
    codes = {f"l{i:02d}": torch.tensor([i % 16]) for i in range(20)}
    data = _assert_roundtrip(codes, 16)
    assert len(data) == len(MAGIC) + 1 + 1 + 20 * (1 + 3 + 1 + 1 + 1) + 1 + 1 + 10


def _bits(value: int, width: int) -> np.ndarray:
    return (value >> np.arange(width - 1, -1, -1)) & 1

