"""Rate-aware search (``nws.rate``): the bit models against the coder, the per-layer scale, and the API."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nws
from nws.models import create_model
from nws.packing import RANK_MAX_ENTRIES, neighbour_order, neighbour_rank
from nws.rate import (BitModel, LayerRate, coded_bits, estimate_model, layer_rate, pool_scale, prior_model,
                      refresh_rate, reprice, set_rate)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assignment(k: int, n: int, changed: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool and a reference (the same for every ``seed``), and codes that change a fraction of the kernels,
    in runs (as whole filters move), to near neighbours of their old entries (ranks roughly Zipf)."""
    g = np.random.default_rng(k + n)
    book = torch.from_numpy(g.standard_normal((k, 9)).astype(np.float32))
    ref = g.integers(0, k, n)
    g = np.random.default_rng(seed)
    codes = ref.copy()
    starts = g.choice(n, int(changed * n / 4), replace=False)
    rows = np.unique(np.clip(starts[:, None] + np.arange(4), 0, n - 1))
    rank = np.minimum(np.floor(np.exp(g.uniform(0, math.log(k), len(rows)))).astype(np.int64), k - 1)
    rank = np.maximum(rank, 1)
    codes[rows] = neighbour_order(book)[ref[rows], rank]
    return book, torch.from_numpy(ref), torch.from_numpy(codes)


def test_pool_scale_is_the_mean_squared_gap_to_the_nearest_other_entry() -> None:
    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 2.0]])
    assert pool_scale(book) == (1 + 1 + 4 + 4) / 4
    assert pool_scale(book, chunk_elements=1) == (1 + 1 + 4 + 4) / 4
    assert pool_scale(torch.ones(1, 3)) == 0.0
    dup = torch.tensor([[0.0], [0.0], [2.0]])
    assert pool_scale(dup) == (0 + 0 + 4) / 3


def test_neighbour_rank_inverts_the_coder_order() -> None:
    book = torch.randn(40, 9, generator=torch.Generator().manual_seed(0))
    order, rank = neighbour_order(book), neighbour_rank(book)
    assert rank.dtype == np.int16 and not rank.flags.writeable
    assert (np.take_along_axis(rank, order.astype(np.int64), axis=1) == np.arange(40)[None, :]).all()
    assert (np.diag(rank) == 0).all()


def test_prior_model() -> None:
    bm = prior_model(512, change=0.1)
    assert bm.change == pytest.approx(math.log2(9)) and bm.keep == pytest.approx(-math.log2(0.9))
    r = bm.ranks
    assert len(r) == 512 and np.isfinite(r).all() and (r > 0).all()
    assert r[1] < r[10] < r[100] < r[500]
    # Zipf in the coder's buckets: about one more bit per doubling of the rank.
    assert r[256] - r[16] == pytest.approx(4.0, abs=0.6)
    # The ranks' probabilities (2 ** -bits, counting each bucket's low bits) sum to one over ranks >= 1.
    assert (2.0 ** -r[1:]).sum() == pytest.approx(1.0, rel=0.02)
    big = prior_model(RANK_MAX_ENTRIES + 1, change=0.2)
    assert np.ptp(big.ranks) == 0 and big.ranks[0] == pytest.approx(math.log2(RANK_MAX_ENTRIES + 1))
    assert prior_model(1).change == 0 and prior_model(1).ranks.tolist() == [0.0]
    with pytest.raises(ValueError, match="probability"):
        prior_model(8, change=1.0)


@pytest.mark.parametrize("changed", [0.02, 0.1, 0.4])
def test_estimated_model_agrees_with_the_coder(changed: float) -> None:
    """The model estimated from an assignment, summed over its kernels, is within 3% of what pack_codes
    spends on the layer; estimated from another assignment of the same statistics, within 6%."""
    book, ref, codes = _assignment(256, 20000, changed, seed=1)
    real = coded_bits(codes, ref, book)
    model = estimate_model(codes, ref, book)
    assert model.total_bits(codes, ref, book) == pytest.approx(real, rel=0.03)
    _, ref2, other = _assignment(256, 20000, changed, seed=2)
    assert torch.equal(ref2, ref) and not torch.equal(other, codes)
    assert estimate_model(other, ref, book).total_bits(codes, ref, book) == pytest.approx(real, rel=0.06)
    # Each kernel's bits: keep for the kept ones, keep + F + R[rank] for the changed.
    bits = model.kernel_bits(codes, ref, book)
    same = (codes == ref).numpy()
    assert np.allclose(bits[same], model.keep)
    rank = neighbour_rank(book)[ref.numpy()[~same], codes.numpy()[~same]]
    assert np.allclose(bits[~same], model.keep + model.change + model.ranks[rank])


def test_estimated_model_edge_cases() -> None:
    book, ref, _ = _assignment(64, 500, 0.1, seed=4)
    none = estimate_model(ref, ref, book)  # nothing changed: changes are dear, ranks uniform over buckets
    assert none.change > math.log2(500) and np.isfinite(none.ranks).all()
    assert none.total_bits(ref, ref, book) == pytest.approx(coded_bits(ref, ref, book), abs=8)
    assert estimate_model(ref[:0], ref, book).ranks.shape == (64,)
    one = torch.zeros(1, 9)
    assert estimate_model(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), one).change == 0
    big = torch.randn(RANK_MAX_ENTRIES + 8, 2, generator=torch.Generator().manual_seed(0))
    r = torch.arange(300)
    x = r.clone()
    x[::3] += 1
    flat = estimate_model(x, r, big)
    assert np.ptp(flat.ranks) == 0


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nws.freeze_pools(nws.convert(create_model("convnet", num_classes=3), pool_size=16, init="kernels"))


def test_set_rate_builds_the_coder_table_per_layer() -> None:
    model = _model()
    reference = nws.encode(model)
    reference["fc"] = reference["fc"][:-5]  # a classifier that grew: its last kernels have no reference
    models = set_rate(model, reference, lam=0.7)
    for name, layer in nws.nws_layers(model):
        rate = layer.rate
        assert isinstance(rate, LayerRate) and rate.lam == 0.7
        assert rate.scale == pool_scale(layer.pool.codebook) and rate.mu == 0.7 * rate.scale
        k = layer.pool.num_entries
        n = len(reference[name])
        assert rate.reference[:n].long().tolist() == reference[name].tolist()
        assert (rate.reference[n:] == k).all()
        bm = models[name]
        rank = neighbour_rank(layer.pool.codebook)
        want = np.maximum(bm.change + bm.ranks[rank], 0).astype(np.float16)
        np.fill_diagonal(want, 0)
        assert np.array_equal(rate.bits[:k].numpy(), want) and not rate.bits[k].any()
        assert rate.floor == float(want[~np.eye(k, dtype=bool)].min())
    # One model for all layers, per-layer models, or estimated from codes.
    prior = prior_model(16, change=0.3)
    assert all(m is prior for m in set_rate(model, reference, 1.0, bits=prior).values())
    chosen = set_rate(model, reference, 1.0, bits={"fc": prior})
    assert chosen["fc"] is prior and chosen["features.0"].change == pytest.approx(math.log2(9))
    codes = nws.encode(model)
    estimated = set_rate(model, reference, 1.0, codes=codes)
    assert estimated["features.4"].change == estimate_model(codes["features.4"], reference["features.4"],
                                                            model.features[4].pool.codebook).change
    # Layers without a reference search the nearest entry.
    set_rate(model, {"fc": reference["fc"]}, 1.0)
    assert [n for n, layer in nws.nws_layers(model) if layer.rate is not None] == ["fc"]


def test_refresh_rate_keeps_reference_and_lam() -> None:
    model = _model()
    reference = nws.encode(model)
    with torch.no_grad():
        for _, layer in nws.nws_layers(model):
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    set_rate(model, reference, lam=0.2)
    codes = nws.encode(model)
    models = refresh_rate(model)
    for name, layer in nws.nws_layers(model):
        assert layer.rate.lam == 0.2 and torch.equal(layer.rate.given, reference[name])
        want = estimate_model(codes[name], reference[name], layer.pool.codebook)
        assert models[name].change == want.change and np.array_equal(models[name].ranks, want.ranks)
    refresh_rate(model, lam=3.0)
    assert all(layer.rate.lam == 3.0 for _, layer in nws.nws_layers(model))


def test_reprice_raises_the_price_and_keeps_the_rest() -> None:
    """``reprice``: every rate-aware layer at the new lambda (``mu = lam * scale``), its reference, bit model
    and table the very same objects, so the search keeps its bounds at a higher price; layers without a rate
    stay without; lambda 0 is refused (that is no rate: ``set_rate``)."""
    model = _model()
    reference = nws.encode(model)
    set_rate(model, {"fc": reference["fc"], "features.4": reference["features.4"]}, lam=0.2)
    before = {name: layer.rate for name, layer in nws.nws_layers(model)}
    reprice(model, 0.5)
    for name, layer in nws.nws_layers(model):
        old, new = before[name], layer.rate
        if old is None:
            assert new is None
            continue
        assert new.lam == 0.5 and new.mu == 0.5 * old.scale and new.scale == old.scale
        assert new.reference is old.reference and new.bits is old.bits and new.model is old.model
        assert new.raises(old) and not old.raises(new)
    with pytest.raises(ValueError, match="lam"):
        reprice(model, 0.0)


def test_rate_errors() -> None:
    model = _model()
    reference = nws.encode(model)
    layer = model.features[0]
    with pytest.raises(ValueError, match="lam"):
        set_rate(model, reference, lam=-1.0)
    with pytest.raises(ValueError, match="out of range"):
        layer_rate(layer, torch.full((3,), 99), 1.0)
    with pytest.raises(ValueError, match="bit model for 8 entries"):
        layer_rate(layer, reference["features.0"], 1.0, prior_model(8))
    with pytest.raises(ValueError, match="finite"):
        BitModel(float("nan"), np.zeros(16))


def test_big_pools_pay_a_flat_change() -> None:
    """Pools the coder does not rank: every change costs the same, and the search is still the oracle's."""
    torch.manual_seed(0)
    layer = nws.freeze_pools(nws.convert(torch.nn.Conv2d(4, 8, 3, bias=False), pool_size=RANK_MAX_ENTRIES + 1,
                                         init="normal"))
    reference = layer.search()
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))
    layer.rate = layer_rate(layer, reference, 0.05)
    assert layer.rate.bits is None and layer.rate.flat > 0
    assert torch.equal(layer.search(), nws.brute_force_nearest(layer.kernels().detach(), layer.pool.codebook,
                                                              layer.rate))
