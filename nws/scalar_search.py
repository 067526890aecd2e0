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
    # Rounded inwards to the pool's dtype, so that comparisons in it stay strict.
    lo_c, hi_c = lo.to(values.dtype), hi.to(values.dtype)
    lo_c = torch.where(lo_c.double() < lo, torch.nextafter(lo_c, inf.to(values.dtype)), lo_c)
    hi_c = torch.where(hi_c.double() > hi, torch.nextafter(hi_c, -inf.to(values.dtype)), hi_c)
    cell_lo = torch.full((k,), float("inf"), dtype=values.dtype, device=values.device)
    cell_hi = torch.full((k,), -float("inf"), dtype=values.dtype, device=values.device)
    cell_lo[first], cell_hi[first] = lo_c, hi_c
    return cell_lo, cell_hi


def neighbours_1d(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors of length 1: per entry, the values (float64) of the entries next to it in sorted order, below
    and above (a duplicated value is its own neighbour; ``-inf``/``inf`` at the ends). Every entry other than
    ``a`` lies at or below ``below[a]`` or at or above ``above[a]``, so from a point ``x`` between them every
    other entry is at least ``min(x - below[a], above[a] - x)`` away."""
    ordered, order = torch.sort(codebook[:, 0].double(), stable=True)
    inf = torch.full((1,), float("inf"), dtype=torch.float64, device=codebook.device)
    below, above = torch.empty_like(ordered), torch.empty_like(ordered)
    below[order] = torch.cat([-inf, ordered[:-1]])
    above[order] = torch.cat([ordered[1:], inf])
    return below, above


def keeps_entry_1d(v: Tensor, entry: Tensor, ref: Tensor, around: tuple[Tensor, Tensor, Tensor],
                   rate: RatePenalty) -> Tensor:
    """Whether kernels of length 1 at ``v`` provably keep ``entry`` (``a``) under the rate, in float64 as
    :func:`nearest_1d_rate` compares; ``around``: the pool's values and :func:`neighbours_1d`. Every entry but
    ``a`` is at least ``L`` away, so every ``k`` outside ``{a, r}`` has ``J(k) >= L^2 + mu * (fewest bits of a
    change)``; ``J(a)`` must be below that and, off the reference, below ``J(r) = (v - p_r)^2``. Kernels
    without a reference are not proved here."""
    values, below, above = around
    has = ref < rate.num_entries
    ref = torch.where(has, ref, entry)
    v = v.double()
    reach = torch.minimum(v - below.index_select(0, entry), above.index_select(0, entry) - v).clamp_min_(0)
    cost = (v - values.index_select(0, entry)).square_() + rate.penalty(ref, entry, torch.float64)
    keep = (v - values.index_select(0, ref)).square_()
    margin = 1 + 2.0**-40  # far above the rounding of these float64 values
    ok = cost * margin < (reach.square_() + rate.mu * rate.floor) / margin
    return ok & has & ((entry == ref) | (cost * margin < keep / margin))


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
