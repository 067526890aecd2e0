"""Exact nearest-entry search of grouped kernels in a pool (L2 distance, ties to the lowest index).

:func:`nearest` ranks entries with one matrix product per chunk of rows, ``|p|^2 - 2 x.p``; a rigorous
floating-point error bound flags the rows whose winner rounding could have changed, and only those are
re-ranked with exact distances. :class:`BoundedSearch` keeps the assignments of slowly moving kernels and
proves most of them still hold with triangle-inequality bounds (Hamerly's k-means), searching only the
kernels whose bounds fail. The pool may move too (pool pretraining): the entries' movement is accumulated
and taken off the bounds, as Hamerly's k-means does for moving centres. Both always equal
:func:`brute_force_nearest`, the definition of the search.

With a :class:`RatePenalty` (rate-aware search, :mod:`nws.rate`) every path minimises instead
``J(k) = |x - p_k|^2 + mu * bits[r, k]``, the bits the task file's coder spends on entry ``k`` for a kernel whose
reference entry is ``r`` (``bits[r, r] = 0``), still exactly and with ties to the lowest index. The bounds the
search keeps are on *distances* only, so they stay valid whatever the penalty and however it changes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows per chunk are chosen so a chunk's distance matrix holds about this many floats (4 MB in fp32).
CHUNK_ELEMENTS = 1 << 20
# Rows per block of the per-call bound check: a block of this many floats stays in cache.
CHECK_ELEMENTS = 1 << 17
# Relative safety factor on every bound (far above the rounding of a distance, ~1e-6 in fp32).
SLACK = 1e-4
# Entries kept per kernel from its last full search: where it may have moved to, the bounds look here first.
CANDIDATES = 4
# Kernels that fail the bound check are resolved this many at a time, so the working memory stays bounded
# however many fail (each kernel is resolved on its own, so the blocks change nothing but the peak).
ROW_BLOCK = 1 << 15
# Rate-aware 1-D search: rows whose window of possible winners holds more entries than this are scanned in full.
WINDOW = 32


@dataclass(eq=False)
class RatePenalty:
    """The rate term of the search objective: kernel ``i``, whose reference entry is ``reference[i]``, takes
    ``argmin_k |x_i - p_k|^2 + mu * bits[reference[i], k]`` (ties to the lowest index).

    ``reference`` ``(N,)`` (integers): the reference entry of every kernel, ``K`` for a kernel that has none
    (no penalty at all). ``bits`` ``(K + 1, K)`` float16: ``bits[r, k]`` the bits of coding entry ``k``
    against ``r``, with ``bits[r, r] = 0`` and row ``K`` all zero; or None: every change costs ``flat`` bits
    (for pools too large for the coder's neighbour ranks). ``mu`` (>= 0) is the price of a bit in
    squared-distance units. The penalty of a choice is defined as ``mu * b`` in float64, ``b`` the float16
    value; :func:`brute_force_nearest` with it is the definition of the search.
    """

    reference: Tensor
    bits: Tensor | None
    mu: float
    num_entries: int
    flat: float = 0.0

    def __post_init__(self) -> None:
        k = self.num_entries
        if self.bits is not None:
            if self.bits.dtype != torch.float16 or self.bits.shape != (k + 1, k):
                raise ValueError(f"rate bits must be float16 of shape ({k + 1}, {k}), got {self.bits.dtype} "
                                 f"{tuple(self.bits.shape)}")
            off = self.bits[:k].float() + torch.diag(torch.full((k,), float("inf"), device=self.bits.device))
            self.floor = float(off.min()) if k > 1 else 0.0
            bad = not bool(torch.isfinite(self.bits).all() and (self.bits >= 0).all()
                           and not self.bits[k].any() and not self.bits[:k].diagonal().any())
        else:
            self.flat = float(torch.tensor(self.flat).half())  # a float16 value, as the table's
            self.floor = self.flat
            bad = not (math.isfinite(self.flat) and self.flat >= 0)
        if bad or not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError("rate: mu and the bits must be finite and >= 0, bits[r, r] and the last row 0")
        if self.reference.dim() != 1 or self.reference.is_floating_point():
            raise ValueError("rate: the reference must be a 1-D integer tensor")
        if len(self.reference) and not (0 <= int(self.reference.min()) and int(self.reference.max()) <= k):
            raise ValueError(f"rate: reference entries out of range for a pool of {k} entries")

    def check(self, n: int, k: int) -> None:
        """Refuse to search ``n`` kernels in a pool of ``k`` entries with a penalty made for others."""
        if (len(self.reference), self.num_entries) != (n, k):
            raise ValueError(f"rate is for {len(self.reference)} kernels and a pool of {self.num_entries} "
                             f"entries; searching {n} kernels in a pool of {k}")

    def to(self, device: torch.device | str) -> RatePenalty:
        """This penalty with its tensors on ``device`` (itself if they are there already)."""
        if self.reference.device == torch.device(device):
            return self
        out = copy.copy(self)
        out.reference = self.reference.to(device)
        out.bits = None if self.bits is None else self.bits.to(device)
        return out

    def bit_rows(self, ref: Tensor) -> Tensor:
        """``(n, K)`` float16: the bits of every entry for kernels with references ``ref`` (long)."""
        if self.bits is not None:
            return self.bits.index_select(0, ref)
        k = self.num_entries
        out = torch.full((len(ref), k), self.flat, dtype=torch.float16, device=ref.device)
        out[ref == k] = 0
        has = (ref < k).nonzero().squeeze(1)
        out[has, ref[has]] = 0
        return out

    def bits_at(self, ref: Tensor, entry: Tensor) -> Tensor:
        """float16 bits of ``entry`` for kernels with references ``ref`` (long tensors of one shape)."""
        k = self.num_entries
        if self.bits is not None:
            return self.bits.view(-1).index_select(0, (ref * k + entry).reshape(-1)).view(entry.shape)
        flat = torch.tensor(self.flat, dtype=torch.float16, device=ref.device)
        return torch.where((ref < k) & (entry != ref), flat, torch.zeros_like(flat))

    def penalty(self, ref: Tensor, entry: Tensor, dtype: torch.dtype) -> Tensor:
        """``mu * bits`` of ``entry`` in ``dtype`` (float64: exactly the definition; float32: rounded)."""
        return self.bits_at(ref, entry).to(dtype) * self.mu

    def free(self) -> Tensor:
        """The kernels without a reference (usually none: the tail of a classifier that grew)."""
        if getattr(self, "_free", None) is None or self._free.device != self.reference.device:
            self._free = (self.reference == self.num_entries).nonzero().squeeze(1)
        return self._free

    def floors(self, ref: Tensor, dtype: torch.dtype) -> Tensor:
        """Per kernel, a lower bound on the penalty of every entry but its reference: ``mu`` times the fewest
        bits of any change (0 for kernels without a reference)."""
        zero = torch.zeros((), dtype=dtype, device=ref.device)
        return torch.where(ref < self.num_entries, zero + self.mu * self.floor, zero)


def exact_sqdist(x: Tensor, codebook: Tensor) -> Tensor:
    """Squared L2 distances ``(n, K)`` in float64, summed in a fixed order over the vector length.

    Differences and squares of fp32 values are exact in float64, so equal real distances compare equal.
    """
    x64, c64 = x.double(), codebook.double()
    out = torch.zeros(x.shape[0], codebook.shape[0], dtype=torch.float64, device=x.device)
    for j in range(x.shape[1]):
        out += (x64[:, j, None] - c64[None, :, j]) ** 2
    return out


def brute_force_nearest(x: Tensor, codebook: Tensor, rate: RatePenalty | None = None,
                        ref: Tensor | None = None) -> Tensor:
    """The definition of the search: argmin of :func:`exact_sqdist`, first index on ties; with ``rate``, of
    :func:`exact_sqdist` plus the float64 penalty ``mu * bits[r, k]`` (``ref``: the rows' references, default
    ``rate.reference``)."""
    dist = exact_sqdist(x, codebook)
    if rate is not None:
        ref = rate.reference if ref is None else ref
        dist += rate.bit_rows(ref.to(x.device, torch.long)).double() * rate.mu
    return dist.argmin(dim=1)


def _unit_roundoff(dtype: torch.dtype, cuda: bool) -> float:
    """Unit roundoff of the matrix product actually used (TF32/bf16 fp32-matmul modes are coarser)."""
    if dtype == torch.float64:
        return 2.0**-53
    if cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    if torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    return 2.0**-24


def _search_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _nearest_1d(x: Tensor, codebook: Tensor) -> Tensor | None:
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


def _cells(codebook: Tensor) -> tuple[Tensor, Tensor]:
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


def _nearest_1d_rate(x: Tensor, codebook: Tensor, rate: RatePenalty, ref: Tensor) -> Tensor | None:
    """Vectors of length 1 with a rate penalty; ``None`` if the pool is not finite. A kernel keeps its
    reference ``r`` if ``J(r) = (x - p_r)^2`` is below the squared distance to its nearest other entry plus
    the least price of a change. Otherwise ``r`` loses only to an entry ``k`` with ``J(k) <= J(r)``, which
    needs ``(x - p_k)^2 <= J(r) - mu * (fewest bits of a change)``: a window of the sorted values around
    ``x``. Its entries (at most :data:`WINDOW`) and ``r`` are compared by the float64 objective computed
    exactly as :func:`brute_force_nearest` does, ties to the lowest index; rows with larger windows, or that
    are not finite, are scanned in full (:func:`_scan`). Kernels without a reference take :func:`_nearest_1d`."""
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
            # Margins far above float64 rounding: the window may hold extra entries, never miss one.
            reach = (keep_t * (1 + 1e-12) - low).clamp_min(0).sqrt() * (1 + 1e-12)
            margin = (v.abs() + reach) * 2.0**-40 + 1e-300
            lo = torch.searchsorted(o64, v - reach - margin, side="left")
            hi = torch.searchsorted(o64, v + reach + margin, side="right")
            pos = lo[:, None] + steps
            inside = pos < hi[:, None]
            entry = order.index_select(0, pos.clamp_(max=k - 1).view(-1)).view(pos.shape)
            near = book64.index_select(0, entry.view(-1)).view(entry.shape)
            score = (v[:, None] - near) ** 2 + rate.penalty(rt[:, None].expand_as(entry), entry, torch.float64)
            score = torch.cat([score.masked_fill_(~inside, float("inf")), keep_t[:, None]], dim=1)
            entry = torch.cat([entry, rt[:, None]], dim=1)
            best = score.min(dim=1, keepdim=True).values
            found[todo] = torch.where(score == best, entry, k).min(dim=1).values
            rows = ((hi - lo > WINDOW) | ~torch.isfinite(keep_t)).nonzero().squeeze(1)
            if len(rows):
                found[todo[rows]] = _scan(xb[todo[rows]], codebook, CHUNK_ELEMENTS, 0, rate, rt[rows])[0]
        free = (~has).nonzero().squeeze(1)
        if len(free):
            found[free] = _nearest_1d(xb[free], codebook)
        out[start : start + ROW_BLOCK] = found
    return out


def _scan(x: Tensor, codebook: Tensor, chunk_elements: int, candidates: int = 0, rate: RatePenalty | None = None,
          ref: Tensor | None = None) -> tuple[Tensor, ...]:
    """The chunked search of :func:`nearest` (``x`` and ``codebook`` already in the search dtype).

    With ``candidates = c > 0`` returns ``(index, lower, cand, rest)``: ``lower`` bounds the distance to every
    other entry from below, ``cand`` ``(n, c)`` holds the ``c`` entries ranked first (the nearest among
    them) and ``rest`` bounds the distance to every entry outside ``cand`` from below.

    With ``rate`` (``ref``: the rows' references, long) the winner minimises the penalised objective; the
    penalty is added to the approximate values and its rounding joins the error bound. ``lower``, ``cand``
    and ``rest`` stay bounds and ranks by *distance* (the winner need not be among the candidates).
    """
    n, d = x.shape
    k = codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if candidates:
        c = min(candidates, k)
        lower = torch.empty(n, dtype=x.dtype, device=x.device)
        rest = torch.empty(n, dtype=x.dtype, device=x.device)
        cand = torch.empty(n, c, dtype=torch.long, device=x.device)
    if n == 0:
        return (out, lower, cand, rest) if candidates else (out,)
    sq = codebook.pow(2).sum(1)
    norm = sq.sqrt()
    u = _unit_roundoff(x.dtype, x.is_cuda)
    # Bound on the rounding error of |p|^2 - 2 x.p with dot products of length d (gamma_{d+2}), doubled.
    gamma = 2.0 * (d + 2) * u / (1.0 - (d + 2) * u)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)

    def below(value: Tensor, entry: Tensor, xn: Tensor, xnorm: Tensor) -> Tensor:
        """Lower bound on the distance to every entry whose approximate value is at least ``value``: such an
        entry closer than that lies within ``r`` (the computed distance) of ``x``, so ``|p| <= |x| + r``."""
        r = (value + xn).clamp_min(0).sqrt()
        err = gamma * ((xnorm + norm[entry]) ** 2 + (2 * xnorm + r * (1 + SLACK)) ** 2)
        return torch.where(torch.isinf(value), inf, (value + xn - err).clamp_min(0).sqrt() * (1 - SLACK))

    rows = max(1, chunk_elements // k)
    for start in range(0, n, rows):
        xc = x[start : start + rows]
        approx = torch.addmm(sq, xc, codebook.T, alpha=-2.0)
        if candidates:
            values, ranked = approx.topk(min(c + 1, k), dim=1, largest=False)
        if rate is not None:
            rc = ref[start : start + rows]
            approx.add_(rate.bit_rows(rc), alpha=rate.mu)  # J - |x|^2, each term rounded once more
            best, arg = approx.min(dim=1)
            approx.scatter_(1, arg[:, None], float("inf"))
            second = approx.min(dim=1).values
        elif candidates:
            best, arg = values[:, 0], ranked[:, 0]
            second, arg2 = (values[:, 1], ranked[:, 1]) if k > 1 else (torch.full_like(best, inf), arg)
        else:
            best, arg = approx.min(dim=1)
            approx.scatter_(1, arg[:, None], float("inf"))
            second, arg2 = approx.min(dim=1)
        xn = xc.pow(2).sum(1)
        xnorm = xn.sqrt()
        # Any entry that truly beats (or ties) the computed winner lies within its distance r, so its
        # norm is at most |x| + r; the two rounding errors together bound how far apart they can look.
        radius = (best + xn).clamp_min(0).sqrt()
        if rate is None:
            slack = gamma * ((xnorm + norm[arg]) ** 2 + (2 * xnorm + radius) ** 2) + 1e-30
        else:
            # An entry that beats the winner's J = r^2 has distance and penalty at most r^2, so the same bound
            # holds for the distances; the penalties (mu and mu * b rounded, then added) and the sums each
            # add at most a few u * (|x|^2 + r^2).
            radius = radius * (1 + SLACK)
            slack = gamma * ((xnorm + norm[arg]) ** 2 + (2 * xnorm + radius) ** 2) + 16 * u * (xn + radius**2) + 1e-30
        # Rows that are not finite are settled by brute force too.
        ambiguous = ((second <= best + slack) | ~torch.isfinite(best) | ~torch.isfinite(xn)).nonzero().squeeze(1)
        if ambiguous.numel():
            arg = arg.clone()
            arg[ambiguous] = brute_force_nearest(xc[ambiguous], codebook, rate, None if rate is None else rc[ambiguous])
        out[start : start + rows] = arg
        if candidates:
            if rate is not None:
                # Distance to every entry but the winner: the nearest's, or the second's if the winner is nearest.
                nearest_won = arg == ranked[:, 0]
                second, arg2 = values[:, 0], ranked[:, 0]
                if k > 1:
                    second = torch.where(nearest_won, values[:, 1], second)
                    arg2 = torch.where(nearest_won, ranked[:, 1], arg2)
                else:
                    second = torch.full_like(second, inf)
            low = below(second, arg2, xn, xnorm)
            outside = below(values[:, c], ranked[:, c], xn, xnorm) if k > c else torch.full_like(low, inf)
            # A re-ranked winner may lie outside the candidates: no bound holds for those rows.
            low[ambiguous] = 0.0
            outside[ambiguous] = 0.0
            lower[start : start + rows] = low
            rest[start : start + rows] = outside
            cand[start : start + rows] = ranked[:, :c]
    return (out, lower, cand, rest) if candidates else (out,)


@torch.no_grad()
def nearest(x: Tensor, codebook: Tensor, chunk_elements: int = CHUNK_ELEMENTS,
            rate: RatePenalty | None = None) -> Tensor:
    """Index of the nearest codebook row for every row of ``x`` (exact; ties to the lowest index); with
    ``rate``, of the row minimising the distance squared plus the rate penalty (see :class:`RatePenalty`).

    Works in chunks of rows, so extra memory stays near ``chunk_elements`` floats whatever ``len(x)``; vectors
    of length 1 are found by binary search. Runs in fp32 (fp64 for fp64 inputs), without autograd, whatever
    the autocast state.
    """
    dtype = _search_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(dtype)
        codebook = codebook.detach().to(dtype)
        if rate is not None:
            rate.check(len(x), len(codebook))
            ref = rate.reference.long()
            if x.shape[1] == 1 and len(codebook):
                found = _nearest_1d_rate(x, codebook, rate, ref)
                if found is not None:
                    return found
            return _scan(x, codebook, chunk_elements, 0, rate, ref)[0]
        if x.shape[1] == 1 and len(codebook):
            found = _nearest_1d(x, codebook)
            if found is not None:
                return found
        return _scan(x, codebook, chunk_elements)[0]


def _distance(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise ``|x - y|`` of a few rows, rounded up (``y`` may be of a lower precision)."""
    return torch.linalg.vector_norm(x - y, dim=1) * (1 + SLACK)


def _neighbours(codebook: Tensor, count: int, chunk_elements: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each entry and its ``count - 1`` nearest other entries ``(K, count)``, and lower bounds on its distance
    to its nearest other entry and to every entry outside the list (exact distances, float64)."""
    k = codebook.shape[0]
    order, gap, outside = [], [], []
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=codebook.device)
    step = max(1, chunk_elements // (2 * k))
    for start in range(0, k, step):
        dist = exact_sqdist(codebook[start : start + step], codebook).sqrt_()
        dist[torch.arange(len(dist)), torch.arange(start, start + len(dist))] = -1.0  # the entry itself first
        values, where = dist.topk(min(count + 1, k), dim=1, largest=False)
        order.append(where[:, :count])
        gap.append(values[:, 1] if k > 1 else inf.expand(len(dist)))
        outside.append(values[:, count] if k > count else inf.expand(len(dist)))
    bound = [(torch.cat(b) * (1 - SLACK)).to(codebook.dtype) for b in (gap, outside)]
    return torch.cat(order), bound[0], bound[1]


class BoundedSearch:
    """Exact search for kernels that move a little between calls, in a pool that stays put or moves a little.

    Per kernel it keeps its entry ``a`` (``indices``; ``searched`` holds the entries themselves), its
    position at its last search (``anchor``, stored in half precision, the rounding charged to the bounds),
    the ``c`` entries that ranked first there (``cand``, ``a`` among them), and lower bounds on the distance
    from there to every other entry (``l``) and to every entry outside ``cand`` (``l_out``). ``drift`` sums,
    over the calls, the largest movement of any entry in each call (Hamerly's bound for moving centres), so
    no entry has moved more than ``P = drift - drift0`` since a kernel was anchored at ``drift0``. A kernel
    now at ``x``, ``m = |x - anchor|`` away, provably keeps ``a`` if ``|x - p_a| + m + P < l``: one pass over
    all kernels, their anchors and entries. A kernel that fails is measured against its candidates: every
    other entry is at least ``l_out - m - P`` away, so the nearest candidate is the answer if it is nearer
    than that. Only kernels that fail both get a full search, which finds their new candidates. Vectors of
    length 1 are searched in full every call, by binary search.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS, candidates: int = CANDIDATES,
                 check_elements: int = CHECK_ELEMENTS):
        self.chunk_elements, self.candidates, self.check_elements = chunk_elements, candidates, check_elements
        self.reset()

    def reset(self) -> None:
        self.indices: Tensor | None = None   # (N,) current entries (int32)
        self.searched: Tensor | None = None  # (N, d) the current entries themselves
        self.anchor: Tensor | None = None    # (N, d) where each kernel was last searched (fp16)
        self.lower: Tensor | None = None     # (N,) drift0 + l
        self.cand: Tensor | None = None      # (N, c) candidate entries (int16 where the pool allows)
        self.rest: Tensor | None = None      # (N,) drift0 + l_out
        self.codebook: Tensor | None = None  # the pool at the last call
        self.drift = 0.0                     # sum over calls of the largest movement of an entry
        self.last_searched = 0  # kernels searched again (among candidates or in full) in the last call
        self.last_full = 0      # kernels searched in full in the last call
        self.primed: tuple[Tensor, Tensor] | None = None  # (indices, codebook) given by prime()
        self._cells: tuple[Tensor, Tensor] | None = None  # vectors of length 1: each entry's cell (_cells)
        self.sq_total: Tensor | None = None  # sum over kernels of |x - searched|^2 at the last call

    def _store(self, rows: Tensor | None, x: Tensor, found: Tensor, lower: Tensor, rest: Tensor,
               cand: Tensor | None = None) -> None:
        """Anchor ``rows`` (all if None) at ``x``, now nearest to entries ``found``, every other entry at least
        ``lower`` away and every entry outside ``cand`` (None: unchanged) at least ``rest`` away; the
        half-precision rounding of the anchor comes off the bounds."""
        entries = self.codebook.index_select(0, found)
        anchor = x.to(self.anchor_dtype)
        rounding = _distance(anchor, x)
        lower = (lower - rounding) * (1 - SLACK) + self.drift
        rest = (rest - rounding) * (1 - SLACK) + self.drift
        found = found.to(torch.int32)
        if rows is None:
            self.indices, self.searched, self.anchor, self.lower, self.rest = found, entries, anchor, lower, rest
            self.cand = cand.to(self.cand_dtype)
            return
        self.indices.index_copy_(0, rows, found)
        self.searched.index_copy_(0, rows, entries)
        self.anchor.index_copy_(0, rows, anchor)
        self.lower.index_copy_(0, rows, lower)
        self.rest.index_copy_(0, rows, rest)
        if cand is not None:
            self.cand.index_copy_(0, rows, cand.to(self.cand_dtype))

    def _setup(self, x: Tensor, codebook: Tensor) -> None:
        self.reset()
        self.codebook = codebook.clone()
        self.anchor_dtype = torch.float16 if x.dtype == torch.float32 else torch.float32
        self.cand_dtype = torch.int16 if codebook.shape[0] <= torch.iinfo(torch.int16).max else torch.int32

    def _full(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None = None) -> Tensor:
        self._setup(x, codebook)
        ref = None if rate is None else rate.reference.long()
        indices, lower, cand, rest = _scan(x, codebook, self.chunk_elements, self.candidates, rate, ref)
        self._store(None, x, indices, lower, rest, cand)
        self.sq_total = (x - self.searched).square_().sum()
        self.last_searched = self.last_full = len(x)
        return self.indices

    def prime(self, indices: Tensor, codebook: Tensor) -> None:
        """Start from kernels known to sit exactly on their entries (a task decoded from its indices), without
        searching: each kernel's candidates are its entry and the entry's nearest other entries. The bounds
        are set up at the next call, so decoding itself stays a gather."""
        self.primed = (indices.detach().clone(), codebook.detach().clone())

    @torch.no_grad()
    def _prime(self, indices: Tensor, codebook: Tensor) -> None:
        found = indices.to(codebook.device, torch.long)
        entries = codebook[found]
        self._setup(entries, codebook)
        if codebook.shape[1] == 1:
            self.indices, self.searched = found.int(), entries
            return
        nbr, gap, outside = _neighbours(codebook, min(self.candidates, codebook.shape[0]), self.chunk_elements)
        self._store(None, entries, found, gap[found], outside[found], nbr[found])

    def _account_drift(self, codebook: Tensor) -> bool | None:
        """Account for the pool's movement since the last call: True if it moved, False if not, None if the
        movement is not finite (then everything is searched again)."""
        if torch.equal(self.codebook, codebook):
            return False
        step = torch.linalg.vector_norm(codebook.double() - self.codebook.double(), dim=1).max()
        step = float(step) * (1 + SLACK)
        if not math.isfinite(step):
            return None
        self.drift += step
        self.codebook.copy_(codebook)
        # Rebase the drift once it is of the order of the pool's scale, so it never swamps the bounds' precision.
        if self.drift > float(torch.linalg.vector_norm(codebook, dim=1).mean()):
            for bound in (self.lower, self.rest):
                bound.mul_(1 - SLACK).sub_(self.drift * (1 + SLACK))
            self.drift = 0.0
        return True

    def _penalty(self, bound: Tensor) -> Tensor:
        """A stored bound with the drift since its kernel was anchored taken off."""
        return bound * (1 - SLACK) - self.drift * (1 + SLACK)

    def _pass(self, x: Tensor, pool_moved: bool, rate: RatePenalty | None = None) -> Tensor:
        """The pass over all kernels, in cache-sized blocks (entries gathered again on the way if the pool
        moved): the rows not proved by ``|x - p_a| + m + P < l`` (with ``rate``: by :meth:`_rate_proof`);
        leaves ``m`` in ``self._moved``."""
        n, d = x.shape
        moved = torch.empty(n, dtype=x.dtype, device=x.device)
        dist = torch.empty(n, dtype=x.dtype, device=x.device)
        ones = torch.ones(d, dtype=x.dtype, device=x.device)
        u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
        by_product = _unit_roundoff(x.dtype, x.is_cuda) == u  # unless products run in reduced precision
        block = max(1, self.check_elements // d)
        buf = torch.empty(min(block, n), d, dtype=x.dtype, device=x.device)

        def sqdist(part: slice, y: Tensor, out: Tensor) -> None:
            diff = buf[: part.stop - part.start]
            torch.sub(x[part], y[part], out=diff)
            if by_product:  # the squares summed by a product with a vector of ones: the fastest way
                torch.mv(diff.square_(), ones, out=out[part])
            else:
                torch.sum(diff.square_(), dim=1, out=out[part])

        for start in range(0, n, block):
            part = slice(start, min(n, start + block))
            if pool_moved:
                torch.index_select(self.codebook, 0, self.indices[part], out=self.searched[part])
            sqdist(part, self.searched, dist)
            sqdist(part, self.anchor, moved)
        self.sq_total = dist.sum()  # the kernels' squared distances to their entries (the commitment)
        # A squared distance is a sum of d rounded squares: at most d + 3 roundings; then rounded up.
        scale = (1 + SLACK) * (1 + (d + 3) * u) / (1 - (d + 3) * u)
        self._moved = moved.mul_(scale).sqrt_()
        if rate is not None:
            return self._rate_proof(x, dist.mul_(scale), scale, rate)
        # Written so that a NaN anywhere counts as a failed proof.
        ok = (dist.mul_(scale).sqrt_().add_(moved) * (1 + SLACK)) < self._penalty(self.lower)
        return ok.logical_not_().nonzero().squeeze(1)

    def _rate_proof(self, x: Tensor, near: Tensor, scale: float, rate: RatePenalty) -> Tensor:
        """The pass's proof with a rate penalty, from ``near`` (upper bounds on ``|x - p_a|^2``): every entry
        other than ``a`` is at least ``L = l - m - P`` away, so every ``k`` outside ``{a, r}`` has
        ``J(k) >= L^2 + mu * (fewest bits of a change)``. A kernel on its reference (``a = r``) is proved if
        ``J(a) = |x - p_a|^2`` is below that; one off it also needs ``J(a) < J(r) = |x - p_r|^2``, for which
        ``L^2`` is a lower bound, else ``|x - p_r|`` is measured. Returns the rows not proved."""
        ref = rate.reference
        k = rate.num_entries
        # reach = (l - P - m) rounded down, clamped at 0; ``floor``: the least penalty of any change.
        reach = torch.mul(self.lower, 1 - SLACK).sub_(self.drift * (1 + SLACK)).sub_(self._moved, alpha=1 + SLACK)
        reach.clamp_min_(0).square_().mul_((1 - SLACK) ** 3)
        floor = rate.mu * rate.floor * (1 - SLACK) ** 2
        cost = near.mul_(1 + SLACK)
        off = (self.indices != ref).nonzero().squeeze(1)
        if len(off):
            ref_off = ref[off].long()
            has = ref_off < k  # kernels without a reference pay nothing
            off, ref_off = off[has], ref_off[has]
            pen = rate.penalty(ref_off, self.indices[off].long(), x.dtype)
            cost[off] = (cost[off] + pen * (1 + SLACK)) * (1 + SLACK)
        # Written so that a NaN anywhere counts as a failed proof.
        ok = cost < reach + floor
        free = rate.free()
        if len(free):  # every entry is free to them: the plain bound alone
            ok[free] = cost[free] < reach[free]
        if len(off):
            check = ok[off] & ~(cost[off] < reach[off])
            rows, ref_rows = off[check], ref_off[check]
            if len(rows):
                diff = x[rows] - self.codebook.index_select(0, ref_rows)
                ok[rows] = cost[rows] < diff.square_().sum(1) / scale * (1 - SLACK)
        return ok.logical_not_().nonzero().squeeze(1)

    def _by_candidates(self, rows: Tensor, x: Tensor, moved: Tensor) -> Tensor:
        """Resolve ``rows`` among their candidates where the bound on all other entries proves it; returns the
        positions (in ``rows``) of the rest."""
        cand = self.cand.index_select(0, rows).long()
        n, c = cand.shape
        dist = torch.empty(n, c, dtype=x.dtype, device=x.device)
        block = max(1, self.chunk_elements // (c * x.shape[1]))
        for start in range(0, n, block):
            part = slice(start, start + block)
            near = self.codebook.index_select(0, cand[part].reshape(-1)).view(-1, c, x.shape[1])
            torch.linalg.vector_norm(x[part, None, :] - near, dim=2, out=dist[part])
        best, pos = dist.min(dim=1)
        dist.scatter_(1, pos[:, None], float("inf"))
        # Computed distances, rounded up for the winner and down for the others.
        best, second = best * (1 + SLACK), dist.min(dim=1).values * (1 - SLACK)
        outside = self._penalty(self.rest.index_select(0, rows)) - moved * (1 + SLACK)  # every entry outside cand is farther
        ok = (best < outside) & (best < second)
        done = ok.nonzero().squeeze(1)
        if len(done):
            found = cand.index_select(0, done).gather(1, pos.index_select(0, done)[:, None]).squeeze(1)
            self._store(rows[done], x.index_select(0, done), found, torch.minimum(second, outside).index_select(0, done),
                        outside.index_select(0, done))
        return ok.logical_not_().nonzero().squeeze(1)

    def _by_candidates_rate(self, rows: Tensor, x: Tensor, moved: Tensor, rate: RatePenalty, ref: Tensor) -> Tensor:
        """:meth:`_by_candidates` with a rate penalty: the objective is measured at the candidates, the current
        entry and the reference; every other entry is at least ``l_out - m - P`` away, so its objective is at
        least that squared plus the fewest bits' penalty."""
        has = ref < rate.num_entries
        current = self.indices.index_select(0, rows).long()
        cols = torch.cat([self.cand.index_select(0, rows).long(), current[:, None], torch.where(has, ref, current)[:, None]],
                         dim=1)
        n, c = cols.shape
        dist = torch.empty(n, c, dtype=x.dtype, device=x.device)
        block = max(1, self.chunk_elements // (c * x.shape[1]))
        for start in range(0, n, block):
            part = slice(start, start + block)
            near = self.codebook.index_select(0, cols[part].reshape(-1)).view(-1, c, x.shape[1])
            torch.linalg.vector_norm(x[part, None, :] - near, dim=2, out=dist[part])
        pen = rate.penalty(ref[:, None].expand_as(cols), cols, x.dtype)
        pos = (dist * dist + pen).argmin(dim=1, keepdim=True)
        found = cols.gather(1, pos)
        other = cols != found
        found = found.squeeze(1)
        # Objectives rounded up for the winner and down for the others; distances likewise.
        far = dist * (1 - SLACK)
        best = ((dist * (1 + SLACK)).square_() + pen * (1 + SLACK)).gather(1, pos).squeeze(1) * (1 + SLACK)
        second = (far.square() + pen * (1 - SLACK)).masked_fill_(~other, float("inf")).min(dim=1).values * (1 - SLACK)
        outside = self._penalty(self.rest.index_select(0, rows)) - moved * (1 + SLACK)  # every entry outside cand is farther
        beyond = (outside.clamp_min(0).square() + rate.floors(ref, x.dtype) * (1 - SLACK)) * (1 - SLACK)
        ok = (best < beyond) & (best < second)
        done = ok.nonzero().squeeze(1)
        if len(done):
            lower = torch.minimum(far.masked_fill(~other, float("inf")).min(dim=1).values, outside)
            self._store(rows[done], x.index_select(0, done), found[done], lower[done], outside[done])
        return ok.logical_not_().nonzero().squeeze(1)

    def _one_dim(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None) -> Tensor:
        """Vectors of length 1: a kernel strictly inside the cell of its entry (:func:`_cells`) keeps it (with
        a rate: if the entry is also its reference, or it has none; every other entry is then farther and
        pays at least as much); only the others are searched, by binary search (or windows, with a rate)."""
        if not bool(torch.isfinite(codebook).all()):
            return self._every_time(x, codebook, rate)
        if (self.indices is None or self.indices.shape != (len(x),) or self.codebook is None
                or self.codebook.shape != codebook.shape or self.codebook.dtype != codebook.dtype
                or self.codebook.device != codebook.device):
            self._cells = None
            return self._every_time(x, codebook, rate)
        if self._cells is None or not torch.equal(self.codebook, codebook):
            self.codebook.copy_(codebook)
            self._cells = _cells(codebook)
            torch.index_select(codebook, 0, self.indices, out=self.searched)
        lo, hi = self._cells
        v = x[:, 0]
        ok = (v > lo.index_select(0, self.indices)) & (v < hi.index_select(0, self.indices))
        if rate is not None:
            # On its reference, a kernel also keeps it while closer to it than every change's least price.
            on = self.indices == rate.reference
            near = (v - self.searched[:, 0]).square_() * (1 + SLACK) < rate.mu * rate.floor * (1 - SLACK)
            ok = (ok & (on | (rate.reference == rate.num_entries))) | (on & near)
        rows = ok.logical_not_().nonzero().squeeze(1)
        if len(rows):
            if rate is None:
                found = _nearest_1d(x[rows], codebook)
            else:
                found = _nearest_1d_rate(x[rows], codebook, rate, rate.reference[rows].long())
            self.indices[rows] = found.int()
            self.searched[rows] = codebook.index_select(0, found)
        self.sq_total = (x - self.searched).square_().sum()
        self.last_searched = self.last_full = len(rows)
        return self.indices

    def _every_time(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None = None) -> Tensor:
        """A full search every call (vectors of length 1: by binary search; a pool that is not finite: no
        bounds hold)."""
        indices = nearest(x, codebook, self.chunk_elements, rate).int()
        same = (self.indices is not None and self.indices.shape == indices.shape and self.searched is not None
                and self.codebook is not None and self.codebook.shape == codebook.shape
                and self.codebook.device == codebook.device and self.codebook.dtype == codebook.dtype
                and torch.equal(self.codebook, codebook))
        if same:
            rows = (indices != self.indices).nonzero().squeeze(1)
            self.searched[rows] = codebook[indices[rows]]
        else:
            self.codebook, self.searched = codebook.clone(), codebook[indices]
        self.indices = indices
        self.sq_total = (x - self.searched).square_().sum()
        self.last_searched = self.last_full = len(x)
        return indices

    @torch.no_grad()
    def __call__(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None = None) -> Tensor:
        """Nearest-entry indices (int32) of ``x`` ``(N, d)`` in ``codebook`` ``(K, d)`` (with ``rate``: the
        entries minimising the penalised objective); ``searched`` holds the entries at those indices."""
        x = x.detach().to(_search_dtype(x))
        codebook = codebook.detach().to(x.dtype)
        if rate is not None:
            rate.check(len(x), len(codebook))
        with torch.autocast(x.device.type, enabled=False):
            if self.primed is not None:
                indices, book = self.primed
                self.primed = None
                if book.shape == codebook.shape and torch.equal(book.to(codebook), codebook):
                    self._prime(indices, codebook)
            if x.shape[1] == 1:
                return self._one_dim(x, codebook, rate)
            moved = None
            if (self.anchor is not None and self.anchor.shape == x.shape and self.lower.dtype == x.dtype
                    and self.codebook.shape == codebook.shape and self.codebook.device == codebook.device):
                moved = self._account_drift(codebook)
            if moved is None:
                if not bool(torch.isfinite(codebook).all()):
                    self.reset()
                    return self._every_time(x, codebook, rate)
                return self._full(x, codebook, rate)
            rows = self._pass(x, moved, rate)
            full = 0
            for start in range(0, len(rows), ROW_BLOCK):
                part = rows[start : start + ROW_BLOCK]
                xr = x.index_select(0, part)
                before = self.indices.index_select(0, part).long()
                if rate is None:
                    ref = None
                    left = self._by_candidates(part, xr, self._moved.index_select(0, part))
                else:
                    ref = rate.reference.index_select(0, part).long()
                    left = self._by_candidates_rate(part, xr, self._moved.index_select(0, part), rate, ref)
                if len(left):
                    xl = xr.index_select(0, left)
                    found, lower, cand, rest = _scan(xl, codebook, self.chunk_elements, self.candidates, rate,
                                                     None if ref is None else ref[left])
                    self._store(part[left], xl, found, lower, rest, cand)
                    full += len(left)
                # The squared distances of the kernels that changed entry, in the commitment's total.
                changed = (self.indices[part] != before).nonzero().squeeze(1)
                if len(changed):
                    xc = xr[changed]
                    self.sq_total = (self.sq_total + (xc - self.searched[part[changed]]).square_().sum()
                                     - (xc - codebook[before[changed]]).square_().sum())
            self._moved = None
            self.last_searched, self.last_full = len(rows), full
            return self.indices
