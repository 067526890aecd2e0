"""Exact nearest-entry search of vectors of length 1 (kernels of a single weight: 1x1 convolutions with
``g = 1``, the classifier): a binary search among the pool's sorted values, with a rate penalty a window of
the sorted values around each kernel, and each entry's cell (the values nearest to it), which lets the
bounded search keep a kernel without searching. All equal :func:`~nws.exhaustive.brute_force_nearest`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nws.exhaustive import CHUNK_ELEMENTS, ROW_BLOCK, brute_force_nearest, scan
from nws.rate_penalty import RatePenalty

# Rate-aware 1-D search: rows whose window of possible winners holds more entries than this are scanned in full.
WINDOW = 32
# A kernel's rate-aware cell is measured against this many sorted values on each side of its entry (and its
# reference); all entries beyond are bounded together.
CELL_NEIGHBOURS = 16
# The cells computed ahead for a reference r: those of the entries within this many sorted values of r.
TABLE_RANKS = 32


def nearest_1d(x: Tensor, codebook: Tensor) -> Tensor | None:
    """Vectors of length 1: a binary search among the sorted distinct entries, each standing for its lowest
    index; ``None`` if the pool is not finite. Equal to :func:`brute_force_nearest`: the float64 distance
    it compares is monotone on each side of ``x``, so the nearest is one of the two values around ``x``
    unless rounding ties it with the next one out (then, and for rows that are not finite, brute force).
    Rows go :data:`ROW_BLOCK` at a time, so the working memory stays bounded."""
    values = codebook[:, 0]
    if not bool(torch.isfinite(values).all()):
        return None
    ordered, order = torch.sort(values, stable=True)
    distinct, counts = torch.unique_consecutive(ordered, return_counts=True)
    first = order[torch.cumsum(counts, 0) - counts]  # stable sort: the first of a run has the lowest index
    top = len(distinct) - 1
    d64 = distinct.double()
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    for start in range(0, len(x), ROW_BLOCK):
        xb = x[start : start + ROW_BLOCK]
        v = xb[:, 0].contiguous()
        pos = torch.searchsorted(distinct, v)
        lo, hi = (pos - 1).clamp(0, top), pos.clamp(max=top)
        v64 = v.double()
        d_lo, d_hi = (v64 - d64[lo]) ** 2, (v64 - d64[hi]) ** 2
        found = torch.where(d_hi < d_lo, first[hi], first[lo])
        found = torch.where(d_hi == d_lo, torch.minimum(first[lo], first[hi]), found)
        best = torch.minimum(d_lo, d_hi)
        doubtful = ~torch.isfinite(v)
        doubtful |= (lo > 0) & ((v64 - d64[(lo - 1).clamp_min(0)]) ** 2 == best)
        doubtful |= (hi < top) & ((v64 - d64[(hi + 1).clamp(max=top)]) ** 2 == best)
        rows = doubtful.nonzero().squeeze(1)
        if len(rows):
            found[rows] = brute_force_nearest(xb[rows], codebook)
        out[start : start + ROW_BLOCK] = found
    return out


def cells(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors of length 1: per entry, bounds ``(lo, hi)`` (in the pool's dtype) such that every ``x`` with
    ``lo < x < hi`` has that entry as its :func:`brute_force_nearest`. The cell of a distinct value is the
    interval between the midpoints to its neighbouring values, shrunk by ``2**-20`` of each gap (far above
    the rounding of the float64 distances compared), and at the two ends reaching ``2**30`` gaps out (beyond,
    float64 rounding can tie the two outermost values); duplicated values have empty cells but for their
    lowest index. The pool must be finite."""
    values = codebook[:, 0]
    k = len(values)
    ordered, order = torch.sort(values, stable=True)
    distinct, counts = torch.unique_consecutive(ordered, return_counts=True)
    first = order[torch.cumsum(counts, 0) - counts]
    v = distinct.double()
    inf = torch.tensor([float("inf")], dtype=torch.float64, device=v.device)
    if len(v) > 1:
        gap = v[1:] - v[:-1]
        mid = (v[1:] + v[:-1]) / 2
        lo = torch.cat([v[:1] - gap[:1] * 2.0**30, mid + gap * 2.0**-20])
        hi = torch.cat([mid - gap * 2.0**-20, v[-1:] + gap[-1:] * 2.0**30])
    else:
        lo, hi = -inf, inf
    lo_c, hi_c = _inwards(lo, values.dtype, 1), _inwards(hi, values.dtype, -1)
    cell_lo = torch.full((k,), float("inf"), dtype=values.dtype, device=values.device)
    cell_hi = torch.full((k,), -float("inf"), dtype=values.dtype, device=values.device)
    cell_lo[first], cell_hi[first] = lo_c, hi_c
    return cell_lo, cell_hi


def rate_cells(codebook: Tensor, entry: Tensor, ref: Tensor, rate: RatePenalty) -> tuple[Tensor, Tensor]:
    """Vectors of length 1 with a rate penalty: per kernel with entry ``a`` (``entry``) and reference ``r``
    (``ref``; ``K``: none), bounds ``(lo, hi)`` (in the pool's dtype) such that every ``x`` with ``lo < x < hi``
    has ``a`` as its :func:`brute_force_nearest` under the rate.

    ``J(k) - J(a) = 2 (p_a - p_k)(x - t_k)`` is linear in ``x``, so that set is the interval between the largest
    crossing ``t_k`` of an entry below ``p_a`` and the smallest of one above. The crossings are computed for
    ``r`` and the :data:`CELL_NEIGHBOURS` sorted values on each side of ``p_a``; the entries beyond them lie
    farther from ``p_a`` than the next value and pay at least the least price of a change, which bounds all
    their crossings at once. Each crossing is moved inwards by far more than the float64 rounding of the
    objectives :func:`brute_force_nearest` compares (``2**-40`` of their size over the slope), and the interval
    is kept within a span of the pool's values beyond its ends. Empty for an entry whose value is duplicated.
    Computed once per distinct ``(a, r)``, in blocks of rows. The pool must be finite."""
    values = codebook[:, 0]
    k = len(values)
    p = values.double()
    pairs, inverse = torch.unique(entry.long() * (k + 1) + ref.long(), return_inverse=True)
    a, r = pairs // (k + 1), pairs % (k + 1)
    ordered, order = torch.sort(p, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=p.device)
    span = float(ordered[-1] - ordered[0]) + float(p.abs().max())
    low, high = float(ordered[0]) - span, float(ordered[-1]) + span
    # |x| and |p| are at most `size` inside the interval, so every objective compared is at most `most`.
    size = max(abs(low), abs(high))
    most = 4 * size**2 + rate.mu * (float(rate.bits.max()) if rate.bits is not None else rate.flat)

    def crossing(pk: Tensor, ck: Tensor, pa: Tensor, ca: Tensor, above: bool) -> Tensor:
        """``t_k`` moved towards ``p_a`` by the rounding margin; ``inf`` (above) or ``-inf`` (below) where ``k``
        is not on that side."""
        dp, dc = pk - pa, ck - ca
        t = (pk + pa) * 0.5 + dc / (2 * dp)
        err = 2.0**-40 * ((2 * most + dc.abs()) / dp.abs() + 2 * size)
        side = dp > 0 if above else dp < 0
        return torch.where(side, t - err if above else t + err, float("inf") if above else -float("inf"))

    w = CELL_NEIGHBOURS
    steps = torch.cat([torch.arange(-w, 0, device=p.device), torch.arange(1, w + 1, device=p.device)])
    lo = torch.empty(len(a), dtype=torch.float64, device=p.device)
    hi = torch.empty_like(lo)
    block = max(1, CHUNK_ELEMENTS // (2 * w + 1))
    for start in range(0, len(a), block):
        ab, rb = a[start : start + block], r[start : start + block]
        has = rb < k
        ca = rate.penalty(rb, ab, torch.float64)
        pa, at = p.index_select(0, ab), rank.index_select(0, ab)
        pos = at[:, None] + steps
        near = torch.cat([order.index_select(0, pos.clamp(0, k - 1).view(-1)).view(pos.shape),
                          torch.where(has, rb, ab)[:, None]], dim=1)
        valid = torch.cat([(pos >= 0) & (pos < k), (has & (rb != ab))[:, None]], dim=1)
        pk = p.index_select(0, near.view(-1)).view(near.shape)
        ck = rate.penalty(rb[:, None].expand_as(near), near, torch.float64)
        up = crossing(pk, ck, pa[:, None], ca[:, None], True).masked_fill_(~valid, float("inf")).amin(dim=1)
        down = crossing(pk, ck, pa[:, None], ca[:, None], False).masked_fill_(~valid, -float("inf")).amax(dim=1)
        # Every entry beyond the window lies at least s_f = |p_f - p_a| from p_a (p_f the window's next value)
        # and costs at least D = least - c_a more than a: its crossing is at least (above; at most, below)
        # p_a + h, h = min over s >= s_f of s/2 + D/(2s); the margin is taken at the least slope, s_f.
        least = torch.where(has, rate.mu * rate.floor, 0.0).double() - ca
        for above in (True, False):
            edge = at + (w + 1 if above else -w - 1)
            beyond = (edge >= 0) & (edge < k)
            gap = (p.index_select(0, order.index_select(0, edge.clamp(0, k - 1))) - pa).abs()
            s = torch.where(least > 0, torch.maximum(gap, least.clamp_min(0).sqrt()), gap)
            h = s / 2 + least / (2 * s) - 2.0**-40 * ((2 * most + least.abs()) / gap + 2 * size)
            if above:
                up = torch.where(beyond, torch.minimum(up, pa + h), up)
            else:
                down = torch.where(beyond, torch.maximum(down, pa - h), down)
        hi[start : start + block], lo[start : start + block] = up, down
    hi = hi.clamp_max(high)
    lo = lo.clamp_min(low)
    repeated = torch.isin(p, ordered[1:][ordered[1:] == ordered[:-1]])  # per entry: its value is duplicated
    hi[repeated.index_select(0, a)] = -float("inf")
    return _inwards(lo, values.dtype, 1)[inverse], _inwards(hi, values.dtype, -1)[inverse]


def _inwards(bound: Tensor, dtype: torch.dtype, side: int) -> Tensor:
    """float64 bounds rounded to ``dtype`` towards ``side`` (+1: up, -1: down), so comparisons in ``dtype``
    stay strict."""
    out = bound.to(dtype)
    away = out.double() < bound if side > 0 else out.double() > bound
    step = torch.full_like(out, side * float("inf"))
    return torch.where(away, torch.nextafter(out, step), out)


def nearest_1d_rate(x: Tensor, codebook: Tensor, rate: RatePenalty, ref: Tensor,
                    current: Tensor | None = None) -> Tensor | None:
    """Vectors of length 1 with a rate penalty; ``None`` if the pool is not finite. A kernel keeps its
    reference ``r`` if ``J(r) = (x - p_r)^2`` is below the squared distance to its nearest other entry plus
    the least price of a change. Otherwise ``r`` loses only to an entry ``k`` with ``J(k) <= J(r)``, which
    needs ``(x - p_k)^2 <= J(r) - mu * (fewest bits of a change)``: a window of the sorted values around
    ``x``. Its entries (at most :data:`WINDOW`) and ``r`` are compared by the float64 objective computed
    exactly as :func:`brute_force_nearest` does, ties to the lowest index; rows with larger windows, or that
    are not finite, are scanned in full (:func:`~nws.exhaustive.scan`). With ``current`` (an entry per row, e.g. its
    entry at the last search) the window is bounded by the smaller of ``J(r)`` and ``J(current)``, so a kernel
    that has settled away from its reference searches a few values around it. Kernels without a reference take
    :func:`nearest_1d`."""
    values = codebook[:, 0]
    if not bool(torch.isfinite(values).all()):
        return None
    k = codebook.shape[0]
    ordered, order = torch.sort(values, stable=True)
    o64, book64 = ordered.double(), values.double()
    low = rate.mu * rate.floor  # the penalty of any change is at least this (float64, as the definition)
    steps = torch.arange(WINDOW, device=x.device)
    around = torch.arange(-2, 2, device=x.device)
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    for start in range(0, len(x), ROW_BLOCK):
        xb, r = x[start : start + ROW_BLOCK], ref[start : start + ROW_BLOCK]
        v = xb[:, 0].double()
        has = r < k
        rr = torch.where(has, r, 0)
        found = rr.clone()
        keep = (v - book64.index_select(0, rr)) ** 2  # J(r), as brute force computes it (+ a zero penalty)
        # The nearest entry other than r is among the two sorted values on each side of x.
        pos = (torch.searchsorted(o64, v)[:, None] + around).clamp_(0, k - 1)
        other = (v[:, None] - o64.index_select(0, pos.view(-1)).view(pos.shape)) ** 2
        other.masked_fill_(order.index_select(0, pos.view(-1)).view(pos.shape) == rr[:, None], float("inf"))
        kept = (keep * (1 + 2.0**-40) < (other.amin(dim=1) + low) * (1 - 2.0**-40)) | (k == 1)
        todo = (has & ~kept).nonzero().squeeze(1)
        if len(todo):
            v, rt, keep_t = v[todo], rr[todo], keep[todo]
            # The best objective is at most J(r) and J(current): every other winner k has (x - p_k)^2 below
            # that less the least price of a change.
            bound, extra = keep_t, rt[:, None]
            if current is not None:
                st = current[start : start + ROW_BLOCK][todo]
                bound = torch.minimum(keep_t, (v - book64.index_select(0, st)) ** 2
                                      + rate.penalty(rt, st, torch.float64))
                extra = torch.stack([rt, st], dim=1)
            # Margins far above float64 rounding: the window may hold extra entries, never miss one.
            reach = (bound * (1 + 1e-12) - low).clamp_min(0).sqrt() * (1 + 1e-12)
            margin = (v.abs() + reach) * 2.0**-40 + 1e-300
            lo = torch.searchsorted(o64, v - reach - margin, side="left")
            hi = torch.searchsorted(o64, v + reach + margin, side="right")
            pos = lo[:, None] + steps
            inside = pos < hi[:, None]
            entry = order.index_select(0, pos.clamp_(max=k - 1).view(-1)).view(pos.shape)
            entry = torch.cat([entry, extra], dim=1)
            inside = torch.cat([inside, torch.ones_like(extra, dtype=torch.bool)], dim=1)
            near = book64.index_select(0, entry.view(-1)).view(entry.shape)
            score = (v[:, None] - near) ** 2 + rate.penalty(rt[:, None].expand_as(entry), entry, torch.float64)
            score.masked_fill_(~inside, float("inf"))
            best = score.min(dim=1, keepdim=True).values
            found[todo] = torch.where(score == best, entry, k).min(dim=1).values
            rows = ((hi - lo > WINDOW) | ~torch.isfinite(keep_t)).nonzero().squeeze(1)
            if len(rows):
                found[todo[rows]] = scan(xb[todo[rows]], codebook, CHUNK_ELEMENTS, 0, rate, rt[rows])[0]
        free = (~has).nonzero().squeeze(1)
        if len(free):
            found[free] = nearest_1d(xb[free], codebook)
        out[start : start + ROW_BLOCK] = found
    return out


class RateCells:
    """The rate-aware cells of length-1 kernels for one pool and one rate (:func:`rate_cells`), and the search
    they allow. The cells of every reference ``r`` with the entries within :data:`TABLE_RANKS` sorted values of
    it (and of every entry for kernels without a reference) are computed once: a kernel's cell is then a
    lookup, and so is most of its search: for reference ``r`` the cells are disjoint intervals, and the one
    with the largest lower end below ``x`` is the only one that can hold it, found by two binary searches over
    the cells' lower ends, ranked once. Rows no cell in the table proves take :func:`nearest_1d_rate`."""

    def __init__(self, codebook: Tensor, rate: RatePenalty):
        self.codebook, self.rate = codebook, rate
        k = self.k = len(codebook)
        device = codebook.device
        order = torch.sort(codebook[:, 0], stable=True)[1]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(k, device=device)
        near = rank[:, None] + torch.arange(-TABLE_RANKS, TABLE_RANKS + 1, device=device)
        ref = torch.arange(k, device=device)[:, None].expand_as(near)[(near >= 0) & (near < k)]
        entry = order.index_select(0, near[(near >= 0) & (near < k)])
        ref = torch.cat([ref, torch.full((k,), k, device=device)])
        entry = torch.cat([entry, torch.arange(k, device=device)])
        self.pairs, at = torch.sort(ref * k + entry)
        ref, entry = ref[at], entry[at]
        self.lo, self.hi = rate_cells(codebook, entry, ref, rate)
        some = (self.hi > self.lo).nonzero().squeeze(1)
        self.ends = torch.sort(self.lo[some]).values
        self.keys, at = torch.sort(ref[some] * (len(self.ends) + 1) + torch.searchsorted(self.ends, self.lo[some]))
        self.cells = some[at]  # the pair of each key
        self.entries = entry.index_select(0, self.cells)

    def of(self, entry: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` of kernels on ``entry`` with references ``ref`` (long); empty (``lo > hi``) for pairs
        not computed ahead, whose kernels are then searched at every call."""
        pair = ref * self.k + entry
        at = torch.searchsorted(self.pairs, pair).clamp_(max=len(self.pairs) - 1)
        known = self.pairs.index_select(0, at) == pair
        lo = torch.where(known, self.lo.index_select(0, at), float("inf"))
        return lo, torch.where(known, self.hi.index_select(0, at), -float("inf"))

    def search(self, x: Tensor, ref: Tensor, current: Tensor) -> Tensor:
        """:func:`nearest_1d_rate` of rows ``x`` with references ``ref`` and current entries ``current``."""
        v, m = x[:, 0], len(self.ends) + 1
        pos = torch.searchsorted(self.keys, ref * m + torch.searchsorted(self.ends, v)).sub_(1).clamp_(min=0)
        found, cell = self.entries.index_select(0, pos), self.cells.index_select(0, pos)
        ok = (self.keys.index_select(0, pos).div_(m, rounding_mode="floor") == ref)
        ok &= (v > self.lo.index_select(0, cell)) & (v < self.hi.index_select(0, cell))
        rows = ok.logical_not_().nonzero().squeeze(1)
        if len(rows):
            found[rows] = nearest_1d_rate(x[rows], self.codebook, self.rate, ref[rows], current[rows])
        return found
