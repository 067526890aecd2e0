"""Entropy-coded storage of codes, alone or against a reference: exact round trips, size against the entropy
estimates, safe failure, and format 2 streams still read."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nws import conditional_entropy_bits, entropy_bits, pack_codes, unpack_codes
from nws.bitcodes import crc, varint
from nws.bitcodes import CodesError
from nws.packing import MAGIC, VERSION, neighbour_order

K = 512


def _skewed(rng: np.random.Generator, n: int, k: int, alpha: float) -> torch.Tensor:
    return torch.from_numpy(rng.choice(k, n, p=rng.dirichlet(np.full(k, alpha))))


def _layout(codes: dict[str, torch.Tensor], pool_sizes) -> dict[str, tuple[int, int]]:
    return {name: (pool_sizes if isinstance(pool_sizes, int) else pool_sizes[name], len(idx))
            for name, idx in codes.items()}


def _assert_roundtrip(codes: dict[str, torch.Tensor], pool_sizes, reference=None, pools=None) -> bytes:
    data = pack_codes(codes, pool_sizes, reference, pools)
    assert isinstance(data, bytes) and data[4] == VERSION
    assert pack_codes(codes, pool_sizes, reference, pools) == data  # deterministic bytes
    out = unpack_codes(data, _layout(codes, pool_sizes), reference, pools)
    assert list(out) == list(codes)
    for name, idx in codes.items():
        assert out[name].dtype == torch.long
        assert torch.equal(out[name], idx.long()), name
    return data


def _brute_order(book: np.ndarray) -> np.ndarray:
    dist = ((book[:, None, :].astype(np.float64) - book[None, :, :]) ** 2).sum(-1)
    return np.argsort(dist, axis=1, kind="stable")


def _move(rng: np.random.Generator, r: np.ndarray, book: np.ndarray, fraction: float) -> np.ndarray:
    """Codes as training moves them away from ``r``: changes come in runs (a filter at a time), and a
    changed kernel mostly lands in a near pool neighbour of its old entry."""
    starts = rng.random(len(r)) < fraction / 6
    changed = np.convolve(starts, np.ones(6), mode="same") > 0
    ranks = np.minimum(rng.geometric(0.08, changed.sum()), len(book) - 1)
    x = r.copy()
    x[changed] = _brute_order(book)[r[changed], ranks]
    return x


def _trained_like(rng: np.random.Generator, sizes: dict[str, int], fraction: float, k: int = K
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Codes, the reference they moved away from (:func:`_move`), and the pools."""
    codes, reference, pools = {}, {}, {}
    for name, n in sizes.items():
        book = rng.standard_normal((k, 9)).astype(np.float32)
        r = _skewed(rng, n, k, 0.5).numpy()
        codes[name] = torch.from_numpy(_move(rng, r, book, fraction))
        reference[name], pools[name] = torch.from_numpy(r), torch.from_numpy(book)
    return codes, reference, pools


# ------------------------------------------------------------------------------------------ alone

def test_roundtrip_skewed_layers() -> None:
    rng = np.random.default_rng(0)
    codes = {f"layer{i}.conv": _skewed(rng, n, 512, alpha)
             for i, (n, alpha) in enumerate([(3000, 0.05), (1000, 0.5), (4096, 2.0), (17, 0.3)])}
    _assert_roundtrip(codes, 512)


@pytest.mark.parametrize("symbol", [37, 511, 0])
def test_roundtrip_single_used_symbol(symbol: int) -> None:
    _assert_roundtrip({"a": torch.full((1000,), symbol)}, 512)


def test_roundtrip_empty_layers() -> None:
    rng = np.random.default_rng(2)
    empty = torch.zeros(0, dtype=torch.long)
    _assert_roundtrip({"first": empty, "mid": _skewed(rng, 200, 64, 0.5), "last": empty}, 64)
    _assert_roundtrip({"only": empty}, 64)
    _assert_roundtrip({}, 64)


def test_roundtrip_pool_of_one() -> None:
    _assert_roundtrip({"a": torch.zeros(10, dtype=torch.long), "b": torch.zeros(3, dtype=torch.long)}, 1)
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
    _assert_roundtrip(codes, {"a": 3, "b": 4096, "c": 2, "d": 512})


def test_size_near_entropy() -> None:
    rng = np.random.default_rng(4)
    codes = {f"l{i}": _skewed(rng, 100_000, 512, 0.3) for i in range(3)}
    data = _assert_roundtrip(codes, 512)
    bound = sum(entropy_bits(idx, 512) for idx in codes.values()) / 8
    assert bound <= len(data) <= 1.01 * bound


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
    with pytest.raises(ValueError):
        pack_codes({"a": torch.tensor([0, 3])}, 16, reference={"a": torch.tensor([bad, 1])})


def test_header_costs_a_few_bytes_per_layer() -> None:
    """Names are not stored (the decoder is given the layout and checks its CRC): 20 one-index layers of 16
    entries, stored as fixed width, take 2 header bytes and 4 bits each (after 4 CRCs)."""
    codes = {f"l{i:02d}": torch.tensor([i % 16]) for i in range(20)}
    data = _assert_roundtrip(codes, 16)
    assert len(data) == len(MAGIC) + 1 + 4 * 4 + 20 * 2 + 1 + 1 + 10


# ------------------------------------------------------------------------------- against a reference

def test_conditional_entropy_bits() -> None:
    """Per layer m * h(changed fraction) + entropy of the new indices; indices past the reference count
    as new, a layer without reference costs its entropy."""
    reference = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([5, 5])}
    codes = {"a": torch.tensor([0, 1, 7, 6]), "b": torch.tensor([5, 5, 5, 4]), "c": torch.tensor([0, 1])}
    expected = 4 * 1.0 + 2.0 + 0.0 + 2.0 + 2.0
    assert conditional_entropy_bits(codes, reference, 8) == pytest.approx(expected)
    assert conditional_entropy_bits(codes, None, 8) == pytest.approx(sum(entropy_bits(v, 8) for v in codes.values()))


@pytest.mark.parametrize("with_pools", [False, True])
def test_roundtrip_realistic(with_pools: bool) -> None:
    rng = np.random.default_rng(10)
    codes, reference, pools = _trained_like(rng, {"conv1": 300, "layer1": 4096, "layer2": 20_000, "fc": 1000},
                                            0.08)
    _assert_roundtrip(codes, K, reference, pools if with_pools else None)


@pytest.mark.parametrize("with_pools", [False, True])
def test_roundtrip_random_against_reference(with_pools: bool) -> None:
    """Unrelated codes against a reference: every model is exact, whatever the data."""
    rng = np.random.default_rng(11)
    for fraction in (0.0, 0.001, 0.3, 0.9, 1.0):
        reference = {n: _skewed(rng, size, K, 0.3) for n, size in (("a", 3000), ("b", 40), ("c", 1))}
        codes = {}
        for name, r in reference.items():
            x = r.clone()
            hit = torch.from_numpy(rng.random(len(x)) < fraction)
            x[hit] = (x[hit] + torch.from_numpy(rng.integers(1, K, int(hit.sum())))) % K
            codes[name] = x
        pools = {n: torch.randn(K, 9, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(codes)}
        _assert_roundtrip(codes, K, reference, pools if with_pools else None)


def test_edge_cases_against_reference() -> None:
    rng = np.random.default_rng(12)
    r = _skewed(rng, 500, K, 0.5)
    pools = {"a": torch.randn(K, 9)}
    every = (r + 1) % K
    for x in (r.clone(), every, torch.where(torch.arange(500) == 0, every, r),
              torch.where(torch.arange(500) == 499, every, r)):
        for p in (None, pools):
            data = _assert_roundtrip({"a": x}, K, {"a": r}, p)
            if torch.equal(x, r):
                assert len(data) == len(MAGIC) + 1 + 4 * 4 + 2 + 2  # nothing changed: a header
    # A pool of one entry, an empty layer, a single layer of a single index.
    _assert_roundtrip({"a": torch.zeros(7, dtype=torch.long)}, 1, {"a": torch.zeros(7, dtype=torch.long)})
    _assert_roundtrip({"a": torch.zeros(0, dtype=torch.long), "b": torch.tensor([3])}, 4,
                      {"a": torch.zeros(0, dtype=torch.long), "b": torch.tensor([2])}, {"b": torch.randn(4, 1)})


def test_reference_of_another_length() -> None:
    """A classifier that shrank or grew: the reference is used as far as it goes, the rest coded as new; a
    layer the reference lacks is coded alone."""
    rng = np.random.default_rng(13)
    r = _skewed(rng, 1280, K, 0.5)
    longer = torch.cat([r[:1000], _skewed(rng, 600, K, 0.5)])
    reference = {"fc": r, "other": _skewed(rng, 100, K, 0.5)}
    pools = {"fc": torch.randn(K, 1), "conv": torch.randn(K, 9)}
    for fc in (r[:256], longer, longer[:1280], torch.zeros(0, dtype=torch.long)):
        codes = {"conv": _skewed(rng, 300, K, 0.5), "fc": fc}
        _assert_roundtrip(codes, K, reference, pools)
        _assert_roundtrip(codes, K, reference)


def test_previous_mode_chain() -> None:
    """Each task coded against the previous one decodes from the one before it, down a chain."""
    rng = np.random.default_rng(14)
    first, reference, pools = _trained_like(rng, {"a": 2000, "b": 500}, 0.1)
    chain = [reference, first]
    for _ in range(3):
        chain.append({n: torch.from_numpy(_move(rng, x.numpy(), pools[n].numpy(), 0.05)) for n, x in chain[-1].items()})
    packed = [pack_codes(chain[i], K, chain[i - 1], pools) for i in range(1, len(chain))]
    previous = reference
    for data, expected in zip(packed, chain[1:]):
        previous = unpack_codes(data, _layout(expected, K), previous, pools)
        assert all(torch.equal(previous[n], expected[n]) for n in expected)


def test_size_guard_against_the_estimate() -> None:
    """The coder's bytes stay within 1.05x the estimate (m * h(p) + entropy of the new indices) plus 100
    bytes on a seeded scenario like a trained task's (clustered changes, near-neighbour moves): with the
    pools' neighbour ranks and without them."""
    rng = np.random.default_rng(15)
    sizes = {"conv1": 64, "layer1.0.conv1": 4096, "layer2.0.conv1": 8192, "layer3.0.conv1": 32_768, "fc": 1280}
    for fraction in (0.01, 0.05, 0.15):
        codes, reference, pools = _trained_like(rng, sizes, fraction)
        estimate = conditional_entropy_bits(codes, reference, K) / 8
        with_ranks = _assert_roundtrip(codes, K, reference, pools)
        alone = _assert_roundtrip(codes, K, reference)
        assert len(with_ranks) <= len(alone) <= 1.05 * estimate + 100, (fraction, len(alone), estimate)
        assert len(with_ranks) < 0.9 * estimate  # ranks of near neighbours cost less than new indices


def test_neighbour_order() -> None:
    rng = np.random.default_rng(16)
    for k, d in ((512, 9), (64, 1), (2, 3)):
        book = rng.standard_normal((k, d)).astype(np.float32)
        order = neighbour_order(book)
        assert order.shape == (k, k)
        assert (np.sort(order, axis=1) == np.arange(k)).all()  # every row a permutation
        assert (order[:, 0] == np.arange(k)).all()  # each entry first in its own row
        # Nearest first, distances compared to about 4 significant digits.
        dist = np.sqrt(((book[:, None, :].astype(np.float64) - book[None, :, :]) ** 2).sum(-1))
        along = np.take_along_axis(dist, order.astype(np.int64), axis=1)
        assert (np.diff(along, axis=1) >= -1e-3 * along[:, 1:]).all()
        assert neighbour_order(torch.from_numpy(book)) is order  # cached


# ------------------------------------------------------------------------------------- format 2 streams


def test_a_format_2_stream_is_refused_naming_the_upgrade() -> None:
    """Streams of format 2 are an earlier nws's; nws upgrade reads them (tests/test_upgrade.py)."""
    stream = MAGIC + b"\x02" + bytes(8)
    with pytest.raises(CodesError, match="earlier nws; convert the run with nws upgrade"):
        unpack_codes(stream, {"a": (2, 3)})


# ------------------------------------------------------------------------------------------- failure

def _sample() -> tuple[bytes, dict, dict, dict]:
    """A small stream against a reference: ranks, a layer coded alone, an empty one, a grown classifier."""
    rng = np.random.default_rng(5)
    codes, reference, pools = _trained_like(rng, {"conv1": 400, "fc": 20}, 0.2, k=64)
    codes["alone"] = _skewed(rng, 30, 64, 0.5)
    codes["empty"] = torch.zeros(0, dtype=torch.long)
    codes["fc"] = torch.cat([codes["fc"], torch.tensor([3, 1, 4, 1, 5])])
    return pack_codes(codes, 64, reference, pools), _layout(codes, 64), reference, pools


def _raises_codes_error(data: bytes, layout, reference=None, pools=None, match: str | None = None) -> None:
    with pytest.raises(CodesError, match=match):
        unpack_codes(data, layout, reference, pools)


def test_sample_stream_uses_every_part() -> None:
    data, layout, reference, pools = _sample()
    out = unpack_codes(data, layout, reference, pools)
    assert list(out) == list(layout)
    assert len(out["fc"]) == 25


def test_truncated_streams() -> None:
    data, layout, reference, pools = _sample()
    for end in range(len(data)):
        _raises_codes_error(data[:end], layout, reference, pools)
    _raises_codes_error(data + b"\x00", layout, reference, pools)
    _raises_codes_error(data + data, layout, reference, pools)


def _reseal(data: bytes) -> bytes:
    """``data`` with its leading CRC made valid again, so a mutation reaches the decoder."""
    return data[:5] + crc(data[9:]).to_bytes(4, "little") + data[9:]


def test_random_bit_flips() -> None:
    """Every flip is caught by the stream's CRC; resealed, by the decoder's checks or by the CRC of the
    decoded codes: a damaged stream never decodes to wrong codes."""
    data, layout, reference, pools = _sample()
    good = unpack_codes(data, layout, reference, pools)
    rng = np.random.default_rng(6)
    for _ in range(400):
        flipped = bytearray(data)
        for pos in rng.integers(9 * 8, len(data) * 8, size=rng.integers(1, 4)):
            flipped[pos // 8] ^= 1 << (pos % 8)
        if bytes(flipped) == data:
            continue
        _raises_codes_error(bytes(flipped), layout, reference, pools, match="CRC mismatch")
        try:
            out = unpack_codes(_reseal(bytes(flipped)), layout, reference, pools)
        except CodesError:
            continue
        assert all(torch.equal(out[n], good[n]) for n in good)


def test_random_bytes() -> None:
    _, layout, reference, pools = _sample()
    rng = np.random.default_rng(7)
    for n in range(0, 300, 7):
        tail = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        _raises_codes_error(MAGIC + bytes([VERSION]) + tail, layout, reference, pools)


def test_bad_magic_version_and_empty() -> None:
    data, layout, reference, pools = _sample()
    for bad in (b"", MAGIC, b"NWSX" + data[4:], b"\x00" * len(data)):
        _raises_codes_error(bad, layout, reference, pools)
    for version in (VERSION + 1, 255, 0, 1):
        _raises_codes_error(data[:4] + bytes([version]) + data[5:], layout, reference, pools, match="version")


def test_layout_is_checked_before_decoding() -> None:
    data, layout, reference, pools = _sample()
    for wrong in ({**layout, "fc": (64, 26)}, {**layout, "fc": (65, 25)}, {"conv1": layout["conv1"]},
                  {**layout, "extra": (2, 1)}, {f"{n}_": v for n, v in layout.items()}):
        _raises_codes_error(data, wrong, reference, pools, match="other layers")


def test_reference_is_checked_before_decoding() -> None:
    data, layout, reference, pools = _sample()
    _raises_codes_error(data, layout, None, pools, match="against a reference")
    _raises_codes_error(data, layout, {"fc": reference["fc"]}, pools, match="none was given for conv1")
    shorter = {**reference, "conv1": reference["conv1"][:-1]}
    _raises_codes_error(data, layout, shorter, pools, match="reference of 400 indices for conv1")
    other = {**reference, "conv1": reference["conv1"].flip(0)}
    _raises_codes_error(data, layout, other, pools, match="another reference or other pools")
    # A reference for a layer the stream coded alone is not used.
    out = unpack_codes(data, layout, {**reference, "alone": torch.zeros(30, dtype=torch.long)}, pools)
    assert torch.equal(out["alone"], unpack_codes(data, layout, reference, pools)["alone"])


def test_pools_are_checked_before_decoding() -> None:
    data, layout, reference, pools = _sample()
    _raises_codes_error(data, layout, reference, None, match="no pools")
    moved = {**pools, "conv1": pools["conv1"] + 1e-3}
    _raises_codes_error(data, layout, reference, moved, match="another reference or other pools")
    _raises_codes_error(data, layout, reference, {**pools, "conv1": pools["conv1"][:10]}, match="do not match")


def _v3_crafted(layout: dict, layers: bytes, bits: bytes = b"", codes: dict | None = None) -> bytes:
    """A format 3 stream with a hand-written layer header and no reference; the CRCs are those of
    ``layout`` and ``codes``."""
    from nws.packing import _codes_crc, _context_crc, _layout_crc

    names = sorted(layout)
    arrays = {n: np.asarray(v) for n, v in (codes or {}).items()}
    crcs = [_layout_crc(layout, names), _context_crc({}, {}, layout, names),
            _codes_crc(arrays, layout, names) if codes else 0]
    body = b"".join(c.to_bytes(4, "little") for c in crcs) + layers + varint(len(bits)) + varint(0) + bits
    return MAGIC + bytes([VERSION]) + crc(body).to_bytes(4, "little") + body


ZEROS = {"a": [0] * 5}


def test_crafted_stream_decodes() -> None:
    """The crafted streams below are one change away from this valid one: five zeros, fixed width."""
    layout = {"a": (16, 5)}
    out = unpack_codes(_v3_crafted(layout, b"\x00\x00", b"\x00" * 3, ZEROS), layout)
    assert torch.equal(out["a"], torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("layers,bits", [
    (b"\x00\x04", b"\x00" * 3),             # a model kind that does not exist
    (b"\x00\x03\x05\x00", b"\x00" * 3),     # ranks for indices that have no old entry
    (b"\x00\x02\x00", b"\x00" * 3),         # a prior without a reference
    (b"\x00\x01\x20", b"\x00" * 3),         # a Rice parameter of 32
    (b"\x00\x01\x00", b"\x00" * 64),        # a histogram of 0 indices for 5
    (b"\x00\x00", b"\x00" * 2),              # fixed width short of its bits
    (b"\x00\x00", b"\x00" * 4),              # fixed width with a trailing byte
    (b"\x00\x00", b"\x00\x00\x01"),         # a set padding bit
    (b"\xff" * 9 + b"\x01", b"\x00" * 3),     # a varint longer than 63 bits
])
def test_corrupt_headers(layers: bytes, bits: bytes) -> None:
    layout = {"a": (16, 5)}
    _raises_codes_error(_v3_crafted(layout, layers, bits, ZEROS), layout)


def test_crafted_counts_beyond_the_layout_are_refused() -> None:
    """A reference layer of 2**31 indices, or more changed indices than the layer has: refused by the
    header check, before any allocation."""
    layout = {"a": (16, 5)}
    reference = {"a": torch.arange(5)}
    _raises_codes_error(_v3_crafted(layout, varint((1 << 31) + 2)), layout, reference, match="out of range")
    _raises_codes_error(_v3_crafted(layout, b"\x01" + varint(6)), layout, reference, match="out of range")


def test_large_pools_are_not_ranked() -> None:
    """Pools above RANK_MAX_ENTRIES entries are not ranked (their neighbour table would be too large), so
    their codes decode without the pools."""
    from nws.packing import RANK_MAX_ENTRIES

    k = 2 * RANK_MAX_ENTRIES
    rng = np.random.default_rng(17)
    r = torch.from_numpy(rng.integers(0, k, 3000))
    x = torch.where(torch.from_numpy(rng.random(3000) < 0.1), (r + 1) % k, r)
    data = pack_codes({"a": x}, k, {"a": r}, {"a": torch.randn(k, 9)})
    assert torch.equal(unpack_codes(data, {"a": (k, 3000)}, {"a": r})["a"], x)
