"""Rate-aware search: each grouped kernel takes the pool entry that minimises distortion + lambda * bits.

A task is stored as its indices coded against a reference assignment (the source network's indices, or the
previous task's; :mod:`nws.packing`): a kernel that keeps its reference entry costs almost nothing, one that
changes pays for flagging the change and for its new entry, coded as its *rank* among the old entry's pool
neighbours. Nearest-entry search ignores this: a kernel whose nearest entry is barely closer than its
reference's still pays a full change. As rate-distortion optimised quantisation does in video coders, the
search can instead pick, for kernel ``x_i`` with reference entry ``r_i``::

    J_i(k) = |x_i - p_k|^2 + mu * bits(k | r_i),   bits(r_i | r_i) = 0,
    bits(k | r_i) = F + R[rank(k | r_i)]            (k != r_i)

(ties to the lowest index), ``F`` the bits of flagging a change relative to keeping, ``R`` the bits of each
neighbour rank (:func:`nws.packing.neighbour_rank`, rank 0 the entry itself). A :class:`BitModel` holds
``F`` and ``R``: from a prior (:func:`prior_model`) or estimated from an assignment (:func:`estimate_model`).

The price of a bit is ``mu = lam * s_l``, with ``s_l`` (:func:`pool_scale`) the mean squared distance of each
entry of layer ``l``'s pool to its nearest other entry: squared distances differ in scale from layer to layer,
and by high-resolution quantisation theory the slope of a quantiser's distortion-rate curve (what a bit is
worth in squared distance) is proportional to the square of its cell spacing. So ``lam`` means the same in
every layer: **at ``lam = 1`` a kernel leaves its reference entry only if that brings it closer by more
than, per bit spent, one typical squared gap between neighbouring entries of its pool.** ``lam = 0`` is the
nearest-entry search, bit for bit (no rate is set at all).

Use: ``set_rate(model, reference, lam)`` before training a task (``reference``: what the task file will be
coded against, per layer), optionally ``refresh_rate(model)`` during training to re-estimate the bit models
from the current assignment, or ``reprice(model, lam)`` to raise the price (a warm-up), and
``clear_rate(model)`` after. :func:`nws.encode` then stores the rate-aware choices. The search stays exact
for the objective on every path (:mod:`nws.search`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from nws.convert import nws_layers
from nws.layers import NWSLayer
from nws.packing import RANK_MAX_ENTRIES, bucket_cost, buckets, entropy_bits, neighbour_rank, pack_codes
from nws.rate_penalty import RatePenalty
from nws.exhaustive import exact_sqdist

__all__ = ["BitModel", "LayerRate", "clear_rate", "coded_bits", "estimate_model", "layer_rate", "pool_scale",
           "prior_model", "refresh_rate", "reprice", "set_rate"]


@dataclass
class BitModel:
    """Bits the coder spends on one kernel coded against its reference entry ``r``: ``keep`` if it keeps
    ``r``; ``keep + change + ranks[rho]`` if it changes to the entry of neighbour rank ``rho``; plus
    ``overhead`` bits per layer (tables, header). Only ``change`` and ``ranks`` steer the search; ``keep``
    and ``overhead`` complete the total (:meth:`total_bits`)."""

    change: float
    ranks: np.ndarray  # (K,) float64
    keep: float = 0.0
    overhead: float = 0.0

    def __post_init__(self) -> None:
        self.ranks = np.asarray(self.ranks, np.float64)
        if self.ranks.ndim != 1 or not np.isfinite(self.ranks).all() or not math.isfinite(self.change):
            raise ValueError("a bit model needs a finite change cost and a finite 1-D rank cost vector")

    @property
    def num_entries(self) -> int:
        return len(self.ranks)

    def kernel_bits(self, codes: Tensor | np.ndarray, reference: Tensor | np.ndarray,
                    codebook: Tensor | np.ndarray) -> np.ndarray:
        """The model's bits of each kernel that has a reference (the first ``min(len(codes), len(reference))``)."""
        x, r = _array(codes), _array(reference)
        m = min(len(x), len(r))
        x, r = x[:m], r[:m]
        out = np.full(m, self.keep)
        changed = x != r
        if changed.any():
            rank = _ranks(codebook, r[changed], x[changed], len(self.ranks))
            out[changed] += self.change + self.ranks[rank]
        return out

    def total_bits(self, codes: Tensor | np.ndarray, reference: Tensor | np.ndarray,
                   codebook: Tensor | np.ndarray) -> float:
        """The model's estimate of a layer's coded size: the kernels' bits plus the overhead."""
        return float(self.kernel_bits(codes, reference, codebook).sum()) + self.overhead


def _array(indices: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, np.int64).ravel()


def _book(codebook: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(codebook, Tensor):
        codebook = codebook.detach().cpu().float().numpy()
    return np.asarray(codebook, np.float32)


def _ranks(codebook: Tensor | np.ndarray, old: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """Neighbour ranks of ``new`` around ``old`` (0 for pools the coder does not rank)."""
    if not _ranked(k):
        return np.zeros(len(new), np.int64)
    return neighbour_rank(_book(codebook))[old, new].astype(np.int64)


def _ranked(k: int) -> bool:
    return 1 < k <= RANK_MAX_ENTRIES


def _rank_costs(counts: np.ndarray, mantissa: int, k: int) -> np.ndarray:
    """Bits of every rank ``0..k-1`` coded as the bucket of ``rank + 1`` under bucket probabilities
    proportional to ``counts`` (indexed by bucket), plus the bucket's low bits."""
    bucket, low = buckets(np.arange(1, k + 1), mantissa)
    p = counts[bucket] / counts.sum()
    return -np.log2(p) + low


def prior_model(num_entries: int, change: float = 0.1, zipf: float = 1.0, mantissa: int = 2) -> BitModel:
    """A bit model from a prior: each kernel changes with probability ``change`` (so a change costs
    ``F = log2((1 - change) / change)`` bits more than a keep, as independent flags would), and the ranks of
    changed kernels follow a Zipf law, ``P(rho) ~ (rho + 1)^-zipf`` for ranks ``rho >= 1``, coded in the
    coder's buckets with ``mantissa`` bits: ``R[rho] ~ zipf * log2(rho + 1) + const``. Pools the coder does
    not rank (over :data:`nws.packing.RANK_MAX_ENTRIES` entries) cost ``log2 K`` bits per change."""
    if not 0 < change < 1:
        raise ValueError(f"change must be a probability in (0, 1), got {change}")
    k = int(num_entries)
    if k == 1:  # a one-entry pool costs nothing
        return BitModel(0.0, np.zeros(1))
    keep = -math.log2(1 - change)
    if not _ranked(k):
        return BitModel(math.log2((1 - change) / change), np.full(k, math.log2(k)), keep)
    value = np.arange(1, k + 1, dtype=np.float64)
    weight = value**-zipf
    weight[0] = 0.0  # rank 0 is the entry itself: not a change (but for duplicated entries)
    bucket, _ = buckets(np.arange(1, k + 1), mantissa)
    counts = np.bincount(bucket, weights=weight)
    counts[bucket[0]] = max(counts[bucket[0]], counts[counts > 0].min())
    return BitModel(math.log2((1 - change) / change), _rank_costs(counts, mantissa, k), keep)


def estimate_model(codes: Tensor | np.ndarray, reference: Tensor | np.ndarray, codebook: Tensor | np.ndarray,
                   smoothing: float = 0.5) -> BitModel:
    """A bit model estimated from an assignment (``codes`` against ``reference``, one layer): with ``c`` of
    the ``m`` kernels changed, ``F = log2((1 - p) / p)`` at the smoothed changed fraction
    ``p = (c + 1/2) / (m + 1)``; ``R`` from the histogram of the changed kernels' rank buckets, in the
    coder's bucket scheme with the mantissa it would pick, each bucket's count plus ``smoothing``. ``keep``
    spreads over all kernels what the coder's gap coding of the changed positions costs beyond ``c * F``,
    and ``overhead`` is its tables, so the model's total for this assignment matches the coder's estimate."""
    x, r = _array(codes), _array(reference)
    k = len(codebook)
    m = min(len(x), len(r))
    if k == 1 or m == 0:
        return BitModel(0.0, np.zeros(k))
    changed = np.flatnonzero(x[:m] != r[:m])
    c = len(changed)
    p = (c + 0.5) / (m + 1)
    change = math.log2((1 - p) / p)
    gaps = 0.0
    # The layer's header: how it uses the reference, the number of changes, the kind of their values' model.
    overhead = 8.0 * (_varint_bytes(1 if len(r) == len(x) else len(r) + 1) + _varint_bytes(c) + (c > 0))
    if 0 < c < m:
        _, overhead, gaps = bucket_cost(np.diff(changed, prepend=-1))
    if _ranked(k):
        ranks = _ranks(codebook, r[changed], x[changed], k) + 1
        if c:
            mantissa, table, _ = bucket_cost(ranks)
            overhead += table
        else:
            mantissa = 2
        top = int(buckets(np.array([k]), mantissa)[0][0])
        counts = np.bincount(buckets(ranks, mantissa)[0], minlength=top + 1).astype(np.float64) + smoothing
        cost = _rank_costs(counts, mantissa, k)
    else:
        new = x[changed]
        per = min(math.log2(k), entropy_bits(new, k) / c) if c else math.log2(k)
        cost = np.full(k, per)
    return BitModel(change, cost, (gaps - c * change) / m, overhead)


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def coded_bits(codes: Tensor | np.ndarray, reference: Tensor | np.ndarray, codebook: Tensor | np.ndarray) -> int:
    """What :func:`nws.packing.pack_codes` spends on this one layer coded against ``reference`` with the
    pool's neighbour ranks: its packed size alone, less the stream's fixed header, in bits."""
    x, r, book = torch.from_numpy(_array(codes)), torch.from_numpy(_array(reference)), torch.from_numpy(_book(codebook))
    k = len(book)
    empty = pack_codes({}, k)
    return 8 * (len(pack_codes({"l": x}, k, {"l": r}, {"l": book})) - len(empty))


@torch.no_grad()
def pool_scale(codebook: Tensor, chunk_elements: int = 1 << 20) -> float:
    """``s_l``: the mean over the pool's entries of the squared distance to the nearest other entry
    (exact, float64; 0 for a one-entry pool). Deterministic from the frozen pool."""
    book = codebook.detach()
    k = len(book)
    if k < 2:
        return 0.0
    total = 0.0
    step = max(1, chunk_elements // k)
    for start in range(0, k, step):
        dist = exact_sqdist(book[start : start + step], book)
        dist[torch.arange(len(dist)), torch.arange(start, start + len(dist))] = float("inf")
        total += float(dist.min(dim=1).values.sum())
    return total / k


@dataclass(eq=False)
class LayerRate(RatePenalty):
    """A layer's rate penalty and what it was made from: ``lam``, the pool's scale ``s_l``
    (``mu = lam * scale``), the bit model, and the reference as given."""

    lam: float = 0.0
    scale: float = 0.0
    model: BitModel | None = None
    given: Tensor | None = None


def _bit_table(codebook: Tensor, model: BitModel) -> tuple[Tensor | None, float]:
    """The search's table of ``bits(k | r)`` (float16, ``(K + 1, K)``, zero diagonal and last row) from a bit
    model; or, for pools the coder does not rank, None and the flat bits of a change."""
    k = len(codebook)
    if len(model.ranks) != k:
        raise ValueError(f"a bit model for {len(model.ranks)} entries, the pool has {k}")
    if not _ranked(k):
        if np.ptp(model.ranks) > 0:
            raise ValueError(f"a pool of {k} entries is not ranked by the coder: its rank costs must be flat")
        return None, max(0.0, model.change + float(model.ranks[0]))
    costs = np.maximum(model.change + model.ranks, 0.0)
    table = np.zeros((k + 1, k), np.float16)
    table[:k] = costs[neighbour_rank(_book(codebook))].astype(np.float16)
    np.fill_diagonal(table[:k], 0)
    return torch.from_numpy(table).to(codebook.device), 0.0


def layer_rate(layer: NWSLayer, reference: Tensor, lam: float, model: BitModel | None = None) -> LayerRate:
    """The rate penalty of ``layer`` coded against ``reference`` (its indices; a shorter one covers the first
    kernels, the rest have none), at ``lam`` with ``model`` (default :func:`prior_model`)."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    book = layer.pool.codebook.detach()
    k, n = layer.pool.num_entries, layer.num_kernels
    given = torch.as_tensor(reference).detach().cpu().long().ravel()
    if len(given) and (given.min() < 0 or given.max() >= k):
        raise ValueError(f"reference indices out of range for a pool of {k} entries")
    ref = torch.full((n,), k, dtype=torch.int16 if k < torch.iinfo(torch.int16).max else torch.int32)
    m = min(n, len(given))
    ref[:m] = given[:m].to(ref.dtype)
    model = prior_model(k) if model is None else model
    table, flat = _bit_table(book, model)
    scale = pool_scale(book)
    return LayerRate(ref.to(book.device), table, lam * scale, k, flat, lam=lam, scale=scale, model=model,
                     given=given)


def set_rate(model: nn.Module, reference: Mapping[str, Tensor], lam: float,
             bits: BitModel | Mapping[str, BitModel] | None = None, codes: Mapping[str, Tensor] | None = None,
             smoothing: float = 0.5) -> dict[str, BitModel]:
    """Make every NWS layer of ``model`` named in ``reference`` search rate-aware at ``lam`` against its
    reference indices (what the task file will be coded against); layers not named, and every layer at
    ``lam = 0``, search the nearest entry. The bit model per layer: ``bits`` (one for all layers, or per
    layer name) if given; else estimated from ``codes`` (an assignment of the layers, e.g. the previous
    task's or the current one) if given; else :func:`prior_model`. Returns the bit models used."""
    used = {}
    for name, layer in nws_layers(model):
        if lam == 0 or name not in reference:
            layer.rate = None
            continue
        if isinstance(bits, BitModel):
            bm = bits
        elif bits is not None and name in bits:
            bm = bits[name]
        elif codes is not None and name in codes:
            bm = estimate_model(codes[name], reference[name], layer.pool.codebook, smoothing)
        else:
            bm = prior_model(layer.pool.num_entries)
        layer.rate = layer_rate(layer, reference[name], lam, bm)
        used[name] = bm
    return used


def refresh_rate(model: nn.Module, lam: float | None = None, smoothing: float = 0.5) -> dict[str, BitModel]:
    """Re-estimate every rate-aware layer's bit model from its current assignment (its searched indices
    against its reference, :func:`estimate_model`), keeping its reference and ``lam`` (or setting a new
    one); e.g. once per epoch, so the model follows what the coder will really spend."""
    used = {}
    for name, layer in nws_layers(model):
        rate = layer.rate
        if not isinstance(rate, LayerRate):
            continue
        bm = estimate_model(layer.search().cpu(), rate.given, layer.pool.codebook, smoothing)
        layer.rate = layer_rate(layer, rate.given, rate.lam if lam is None else lam, bm)
        used[name] = bm
    return used


def reprice(model: nn.Module, lam: float) -> None:
    """Every rate-aware layer of ``model`` at ``lam`` (> 0), keeping its reference, bit model and tables. At a
    higher ``lam`` no entry's objective falls, so the search keeps its bounds
    (:meth:`~nws.rate_penalty.RatePenalty.raises`) where a new rate from :func:`set_rate` starts it afresh:
    a rate raised step by step costs a full search only once."""
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    for _, layer in nws_layers(model):
        if isinstance(layer.rate, LayerRate):
            layer.rate = dataclasses.replace(layer.rate, mu=lam * layer.rate.scale, lam=lam)


def clear_rate(model: nn.Module) -> None:
    """Back to the nearest-entry search in every NWS layer."""
    for _, layer in nws_layers(model):
        layer.rate = None
