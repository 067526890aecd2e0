"""Exact search for kernels that move a little between calls, in a pool that stays put or moves a little
(training a task; pool pretraining): :class:`BoundedSearch` keeps each kernel's assignment and proves most
of them still hold with triangle-inequality bounds (Hamerly's k-means), searching only the kernels whose
bounds fail. The entries' movement is accumulated and taken off the bounds, as Hamerly's k-means does for
moving centres; while the pool stays put, a kernel within half the gap from its entry to the entry's nearest
other entry keeps it without looking at where it was (Elkan's test). It always equals
:func:`~nws.exhaustive.brute_force_nearest`, with or without a :class:`~nws.rate_penalty.RatePenalty` (with
one, its bounds are on the entries' objective roots, :mod:`nws.rate_bounds`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nws.exhaustive import (CHUNK_ELEMENTS, ROW_BLOCK, SLACK, brute_force_nearest, entry_neighbours, row_sqdists,
                            scan, search_dtype, sqdist_roundup)
from nws.rate_bounds import anchored_proof, gap_limits, lifted, proof
from nws.rate_penalty import RatePenalty
from nws.scalar_search import RateCells, cells, nearest_1d
from nws.search import nearest

# Rows per block of the per-call bound check: a block of this many floats stays in cache.
CHECK_ELEMENTS = 1 << 17
# Entries kept per kernel from its last full search: where it may have moved to, the bounds look here first.
CANDIDATES = 4
# While the gap bound leaves at most this fraction of a layer's kernels unproved, only those are measured
# against their anchors (gathered); above it every kernel is, in the same pass, and the gap is left out but
# at every GAP_PROBE-th call (the first included), which combines both bounds and measures the fraction again.
GAP_MISSES = 1 / 16
GAP_PROBE = 16
# Length-1 kernels that left their cells are compared with every entry, by the definition, while they and the
# entries make at most this many pairs, twice as many with a rate (a few operations, where searches take dozens).
FEW = 1 << 18


class BoundedSearch:
    """Exact search for kernels that move a little between calls, in a pool that stays put or moves a little.

    Per kernel it keeps its entry ``a`` (``indices``; ``searched`` holds the entries themselves), its
    position at its last search (``anchor``, stored in half precision, the rounding charged to the bounds),
    the ``c`` entries that ranked first there (``cand``, ``a`` among them), and lower bounds on the distance
    from there to every other entry (``l``) and to every entry outside ``cand`` (``l_out``). ``drift`` sums,
    over the calls, the largest movement of any entry in each call (Hamerly's bound for moving centres), so
    no entry has moved more than ``P = drift - drift0`` since a kernel was anchored at ``drift0``. A kernel
    now at ``x``, ``m = |x - anchor|`` away, provably keeps ``a`` if ``|x - p_a| + m + P < l``; while the pool
    stays put, also if ``2 |x - p_a| < G_a``, ``G_a`` the gap from ``p_a`` to its nearest other entry, which
    needs no anchor: one pass over all kernels and their entries (and their anchors where the gap does not
    prove enough of them). A kernel that fails is measured against its candidates: every
    other entry is at least ``l_out - m - P`` away, so the nearest candidate is the answer if it is nearer
    than that. Only kernels that fail both get a full search, which finds their new candidates. Vectors of
    length 1 keep their entry while inside its cell (:func:`~nws.scalar_search.cells`; with a rate, the
    interval where their entry's objective is the least, :func:`~nws.scalar_search.rate_cells`) and are
    otherwise searched by binary search (with a rate: a window around them), or if few, against every entry.
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
        self._cells: tuple[Tensor, Tensor] | None = None  # vectors of length 1: each entry's cell (cells)
        self._kernel_cells: tuple[Tensor, Tensor] | None = None  # and each kernel's (cells_of)
        self._rate_cells: RateCells | None = None  # with a rate: the cells for it (and its search)
        self.sq_total: Tensor | None = None  # sum over kernels of |x - searched|^2 at the last call
        self._gap: Tensor | None = None  # each entry's distance to its nearest other entry (rounded down)
        self._limit: tuple[Tensor, RatePenalty | None] | None = None  # per kernel, what the gap proves (_limits)
        self._gap_misses = 1.0  # the fraction of kernels the gap did not prove when last measured
        self._calls = 0
        self._bound_rate: RatePenalty | None = None  # the rate whose objective roots the bounds are on

    def _store(self, rows: Tensor | None, x: Tensor, found: Tensor, lower: Tensor, rest: Tensor,
               cand: Tensor | None = None) -> None:
        """Anchor ``rows`` (all if None) at ``x``, now nearest to entries ``found``, every other entry at least
        ``lower`` away and every entry outside ``cand`` (None: unchanged) at least ``rest`` away; the
        half-precision rounding of the anchor comes off the bounds."""
        entries = self.codebook.index_select(0, found)
        anchor = x.to(self.anchor_dtype)
        rounding = torch.linalg.vector_norm(anchor - x, dim=1) * (1 + SLACK)  # rounded up
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
        self._bound_rate = rate
        ref = None if rate is None else rate.reference.long()
        indices, lower, cand, rest = scan(x, codebook, self.chunk_elements, self.candidates, rate, ref)
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
    def _prime(self, indices: Tensor, codebook: Tensor, rate: RatePenalty | None) -> None:
        found = indices.to(codebook.device, torch.long)
        entries = codebook[found]
        self._setup(entries, codebook)
        if codebook.shape[1] == 1:
            self.indices, self.searched = found.int(), entries
            return
        nbr, gap, outside = entry_neighbours(codebook, min(self.candidates, codebook.shape[0]), self.chunk_elements)
        self._store(None, entries, found, gap[found], outside[found], nbr[found])
        self._gap, self._gap_misses, self._limit = gap, 0.0, None
        if rate is not None:
            self._lift(rate)

    def _lift(self, rate: RatePenalty) -> None:
        """The distance bounds kept as bounds on the objective roots of ``rate`` (:func:`~nws.rate_bounds.lifted`)."""
        for bound in (self.lower, self.rest):
            bound.copy_(lifted(self._penalty(bound), rate.reference.long(), rate).add_(self.drift))
        self._bound_rate = rate

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
        self._gap = self._limit = None
        # Rebase the drift once it is of the order of the pool's scale, so it never swamps the bounds' precision.
        if self.drift > float(torch.linalg.vector_norm(codebook, dim=1).mean()):
            for bound in (self.lower, self.rest):
                bound.mul_(1 - SLACK).sub_(self.drift * (1 + SLACK))
            self.drift = 0.0
        return True

    def _penalty(self, bound: Tensor) -> Tensor:
        """A stored bound with the drift since its kernel was anchored taken off."""
        return bound * (1 - SLACK) - self.drift * (1 + SLACK)

    def _gaps(self) -> Tensor:
        """Lower bounds on each entry's distance to its nearest other entry, for the pool of the last call
        (exact, computed once while the pool stays put)."""
        if self._gap is None:
            self._gap = entry_neighbours(self.codebook, 1, self.chunk_elements)[1]
        return self._gap

    def _limits(self, rows: Tensor | None, rate: RatePenalty | None) -> Tensor:
        """Per kernel of ``rows`` (None: all, kept while the pool stays put and the rate is the same), the
        squared distance to its entry below which the gap alone proves it (:func:`~nws.rate_bounds.gap_limits`;
        also without a rate): one comparison where the proof takes a dozen operations."""
        if rows is None and self._limit is not None and self._limit[1] is rate:
            return self._limit[0]
        indices = (self.indices if rows is None else self.indices.index_select(0, rows)).long()
        ref = None if rate is None else (rate.reference if rows is None else rate.reference.index_select(0, rows)).long()
        limit = gap_limits(self._gaps().index_select(0, indices), indices, rate, ref, self.searched, self.codebook)
        if rows is None:
            self._limit = (limit, rate)
        elif self._limit is not None and self._limit[1] is rate:
            self._limit[0].index_copy_(0, rows, limit)
        return limit

    def _pass(self, x: Tensor, pool_moved: bool, rate: RatePenalty | None = None) -> Tensor:
        """The pass over all kernels, in cache-sized blocks (entries gathered again on the way if the pool
        moved): ``|x - p_a|`` for every kernel (its square is the commitment). Returns the rows whose entry it
        does not prove; leaves ``m = |x - anchor|`` of those rows, in order, in ``self._moved``.

        Every other entry ``j`` is at least ``L`` from ``x``. Two bounds give ``L``: the gap ``G_a`` from ``p_a``
        to its nearest other entry, ``L = G_a - |x - p_a|`` (exact for the pool as it is, so only while the pool
        stays put: a task's frozen pools); and the anchored ``L = l - m - P``, which needs ``m``: gathered for
        the few kernels the gap does not prove, or measured for all in the same pass while it proves fewer
        (:data:`GAP_MISSES`; those the gap proves take one comparison each, :meth:`_limits`, as do all by the
        anchor alone, :func:`~nws.rate_bounds.anchored_proof`); :meth:`_proof` decides for the rest."""
        n = len(x)
        self._calls += 1
        gap = not pool_moved and (self._gap_misses <= GAP_MISSES or self._calls % GAP_PROBE == 1)
        dist = torch.empty(n, dtype=x.dtype, device=x.device)
        moved = None if gap and self._gap_misses <= GAP_MISSES else torch.empty_like(dist)
        targets = [(self.searched, dist)] + ([] if moved is None else [(self.anchor, moved)])
        row_sqdists(x, targets, self.check_elements, (self.codebook, self.indices) if pool_moved else None)
        self.sq_total = dist.sum()  # the kernels' squared distances to their entries (the commitment)
        if not gap:
            rows = anchored_proof(x, dist, moved, self.lower, self.drift, self.indices, rate,
                                  self.codebook).logical_not_().nonzero().squeeze(1)
            self._moved = moved.index_select(0, rows).mul_(math.sqrt(sqdist_roundup(x)))
            return rows
        if moved is None:
            # Most kernels sit well inside their entry's gap: prove them by it (one comparison each), measure m
            # for the rest only and give them the whole proof.
            rows = (dist < self._limits(None, rate)).logical_not_().nonzero().squeeze(1)
            self._gap_misses, self._moved = len(rows) / max(n, 1), None
            if not len(rows):
                return rows
            near = dist.index_select(0, rows).mul_(sqdist_roundup(x))
            radius = near.sqrt() * (1 + SLACK)
            by_gap = self._gaps().index_select(0, self.indices.index_select(0, rows)).mul_(1 - SLACK)
            moved = self._anchor_distances(x, rows)
            ok = self._proof(x, rows, near, radius, by_gap.sub_(radius).mul_(1 - SLACK), self._anchored(moved, rows),
                             rate).logical_not_()
            self._moved = moved[ok]
            return rows[ok]
        near = dist.mul_(sqdist_roundup(x))  # upper bounds on |x - p_a|^2
        radius = near.sqrt() * (1 + SLACK)
        moved = moved.mul_(sqdist_roundup(x)).sqrt_()
        by_gap = self._gaps().index_select(0, self.indices).mul_(1 - SLACK).sub_(radius).mul_(1 - SLACK)
        self._gap_misses = float((radius >= by_gap).sum()) / max(n, 1)
        rows = self._proof(x, None, near, radius, by_gap, self._anchored(moved, None), rate).logical_not_().nonzero()
        self._moved = moved.index_select(0, rows.squeeze(1))
        return rows.squeeze(1)

    def _anchored(self, moved: Tensor, rows: Tensor | None) -> Tensor:
        """The anchored lower bound ``l - m - P`` on the distance (with a rate: the objective root) of every
        other entry, of ``rows`` (None: all) at distances ``moved`` from their anchors (rounded down)."""
        bound = self._penalty(self.lower if rows is None else self.lower.index_select(0, rows))
        return bound.sub_(moved, alpha=1 + SLACK).mul_(1 - SLACK)

    def _anchor_distances(self, x: Tensor, rows: Tensor) -> Tensor:
        """``m = |x - anchor|`` (rounded up) of a few ``rows``."""
        diff = x.index_select(0, rows) - self.anchor.index_select(0, rows)
        return diff.square_().sum(1).mul_(sqdist_roundup(x)).sqrt_()

    def _proof(self, x: Tensor, rows: Tensor | None, near: Tensor, radius: Tensor, by_gap: Tensor | None,
               anchored: Tensor | None, rate: RatePenalty | None) -> Tensor:
        """Whether kernels ``rows`` (None: all) provably keep their entry ``a``, from upper bounds on
        ``|x - p_a|^2`` (``near``) and ``|x - p_a|`` (``radius``) and lower bounds for every other entry ``j``:
        on ``|x - p_j|`` from the gap (``by_gap``), on it or with a rate on ``phi_j(x)`` from the anchor
        (``anchored``); either may be None. Written so that a NaN anywhere counts as a failed proof."""
        if rate is None:
            return radius < (by_gap if anchored is None else anchored if by_gap is None else anchored.maximum(by_gap))
        if rows is None:
            return proof(x, near, by_gap, anchored, self.indices, rate.reference, rate.free(), rate, self.codebook)
        ref = rate.reference.index_select(0, rows)
        return proof(x.index_select(0, rows), near, by_gap, anchored, self.indices.index_select(0, rows), ref,
                     (ref == rate.num_entries).nonzero().squeeze(1), rate, self.codebook)

    def _distances(self, x: Tensor, cols: Tensor) -> Tensor:
        """Distances from each row of ``x`` to the entries ``cols`` of its row, in blocks of at most
        ``chunk_elements`` gathered values."""
        n, c = cols.shape
        dist = torch.empty(n, c, dtype=x.dtype, device=x.device)
        block = max(1, self.chunk_elements // (c * x.shape[1]))
        for start in range(0, n, block):
            part = slice(start, start + block)
            near = self.codebook.index_select(0, cols[part].reshape(-1)).view(-1, c, x.shape[1])
            torch.linalg.vector_norm(x[part, None, :] - near, dim=2, out=dist[part])
        return dist

    def _by_candidates(self, rows: Tensor, x: Tensor, moved: Tensor) -> Tensor:
        """Resolve ``rows`` among their candidates where the bound on all other entries proves it; returns the
        positions (in ``rows``) of the rest."""
        cand = self.cand.index_select(0, rows).long()
        dist = self._distances(x, cand)
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
        entry and the reference; every other entry's objective root is at least ``l_out - m - P``."""
        has = ref < rate.num_entries
        current = self.indices.index_select(0, rows).long()
        cols = torch.cat([self.cand.index_select(0, rows).long(), current[:, None], torch.where(has, ref, current)[:, None]],
                         dim=1)
        dist = self._distances(x, cols)
        pen = rate.penalty(ref[:, None].expand_as(cols), cols, x.dtype)
        pos = (dist * dist + pen).argmin(dim=1, keepdim=True)
        found = cols.gather(1, pos)
        other, found = cols != found, found.squeeze(1)
        # Objectives rounded up for the winner and down for the others; distances likewise.
        best = ((dist * (1 + SLACK)).square_() + pen * (1 + SLACK)).gather(1, pos).squeeze(1) * (1 + SLACK)
        low = (dist * (1 - SLACK)).square_().add_(pen * (1 - SLACK))
        second = low.masked_fill(~other, float("inf")).min(dim=1).values * (1 - SLACK)
        outside = self._penalty(self.rest.index_select(0, rows)) - moved * (1 + SLACK)  # every entry outside cand is farther
        beyond = outside.clamp_min(0).square() * (1 - SLACK)
        ok = (best < beyond) & (best < second)
        done = ok.nonzero().squeeze(1)
        if len(done):
            # The bound kept leaves out the reference, as the scan's (its distance is measured when needed).
            others = low.masked_fill_(~other | (cols == ref[:, None]), float("inf")).min(dim=1).values
            lower = torch.minimum(others.mul_(1 - SLACK).sqrt_().mul_(1 - SLACK), outside)
            self._store(rows[done], x.index_select(0, done), found[done], lower[done], outside[done])
        return ok.logical_not_().nonzero().squeeze(1)

    def _one_dim(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None) -> Tensor:
        """Vectors of length 1: each kernel keeps its entry while strictly inside its cell, the interval of
        values that have it as their answer (:func:`~nws.scalar_search.cells`; with a rate, the kernel's own
        for its entry and reference, :func:`~nws.scalar_search.rate_cells`, as computed ahead by
        :class:`~nws.scalar_search.RateCells`; none for an entry far from the reference). Only the kernels
        outside are searched, by binary search (with a rate: the cells, then windows) or, if few, against every
        entry, and take the cell of their new entry."""
        if not bool(torch.isfinite(codebook).all()):
            return self._every_time(x, codebook, rate)
        if (self.indices is None or self.indices.shape != (len(x),) or self.codebook is None
                or self.codebook.shape != codebook.shape or self.codebook.dtype != codebook.dtype
                or self.codebook.device != codebook.device):
            self._cells = None
            return self._every_time(x, codebook, rate)
        if self._cells is None or not torch.equal(self.codebook, codebook):
            self.codebook.copy_(codebook)
            self._cells, self._kernel_cells = cells(codebook), None
            torch.index_select(codebook, 0, self.indices, out=self.searched)
        if self._kernel_cells is None or (self._rate_cells is None) != (rate is None) or (
                rate is not None and self._rate_cells.rate is not rate):
            self._rate_cells = None if rate is None else RateCells(self.codebook, rate)
            self._kernel_cells = self._cells_of(self.indices.long(), None)
        lo, hi = self._kernel_cells
        v = x[:, 0]
        rows = ((v > lo) & (v < hi)).logical_not_().nonzero().squeeze(1)
        if len(rows):
            if len(rows) * len(codebook) <= FEW << (rate is not None):  # few: by the definition itself
                found = brute_force_nearest(x[rows], codebook, rate, None if rate is None else rate.reference[rows])
            elif rate is None:
                found = nearest_1d(x[rows], codebook)
            else:
                found = self._rate_cells.search(x[rows], rate.reference[rows].long(), self.indices[rows].long())
            self.indices[rows] = found.int()
            self.searched[rows] = codebook.index_select(0, found)
            new_lo, new_hi = self._cells_of(found, rows)
            lo[rows], hi[rows] = new_lo, new_hi
        self.sq_total = (x - self.searched).square_().sum()
        self.last_searched = self.last_full = len(rows)
        return self.indices

    def _cells_of(self, entries: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """The cells of kernels ``rows`` (None: all) on ``entries``: their entry's, or with a rate their own."""
        if self._rate_cells is None:
            lo, hi = self._cells
            return lo.index_select(0, entries), hi.index_select(0, entries)
        ref = self._rate_cells.rate.reference
        return self._rate_cells.of(entries, (ref if rows is None else ref.index_select(0, rows)).long())

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
        self.indices, self._kernel_cells = indices, None
        self.sq_total = (x - self.searched).square_().sum()
        self.last_searched = self.last_full = len(x)
        return indices

    @torch.no_grad()
    def __call__(self, x: Tensor, codebook: Tensor, rate: RatePenalty | None = None) -> Tensor:
        """Nearest-entry indices (int32) of ``x`` ``(N, d)`` in ``codebook`` ``(K, d)`` (with ``rate``: the
        entries minimising the penalised objective); ``searched`` holds the entries at those indices."""
        x = x.detach().to(search_dtype(x))
        codebook = codebook.detach().to(x.dtype)
        if rate is not None:
            rate.check(len(x), len(codebook))
        with torch.autocast(x.device.type, enabled=False):
            if self.primed is not None:
                indices, book = self.primed
                self.primed = None
                if book.shape == codebook.shape and torch.equal(book.to(codebook), codebook):
                    self._prime(indices, codebook, rate)
            if x.shape[1] == 1:
                return self._one_dim(x, codebook, rate)
            moved = None
            # Bounds on one rate's objective roots hold for it at a higher price, not for another (distances: any).
            if (self.anchor is not None and self.anchor.shape == x.shape and self.lower.dtype == x.dtype
                    and self.codebook.shape == codebook.shape and self.codebook.device == codebook.device
                    and (self._bound_rate is None or (rate is not None and rate.raises(self._bound_rate)))):
                moved = self._account_drift(codebook)
                if moved is not None and rate is not None and self._bound_rate is None:
                    self._lift(rate)
            if moved is None:
                if not bool(torch.isfinite(codebook).all()):
                    self.reset()
                    return self._every_time(x, codebook, rate)
                return self._full(x, codebook, rate)
            rows = self._pass(x, moved, rate)
            self._bound_rate = rate
            full = 0
            for start in range(0, len(rows), ROW_BLOCK):
                part = rows[start : start + ROW_BLOCK]
                xr = x.index_select(0, part)
                before = self.indices.index_select(0, part).long()
                if rate is None:
                    ref = None
                    left = self._by_candidates(part, xr, self._moved[start : start + ROW_BLOCK])
                else:
                    ref = rate.reference.index_select(0, part).long()
                    left = self._by_candidates_rate(part, xr, self._moved[start : start + ROW_BLOCK], rate, ref)
                if len(left):
                    xl = xr.index_select(0, left)
                    found, lower, cand, rest = scan(xl, codebook, self.chunk_elements, self.candidates, rate,
                                                     None if ref is None else ref[left])
                    self._store(part[left], xl, found, lower, rest, cand)
                    full += len(left)
                # The kernels that changed entry: their gap limits, and their squared distances in the commitment.
                changed = (self.indices[part] != before).nonzero().squeeze(1)
                if len(changed):
                    if self._limit is not None:
                        self._limits(part[changed], rate)
                    xc = xr[changed]
                    self.sq_total = (self.sq_total + (xc - self.searched[part[changed]]).square_().sum()
                                     - (xc - codebook[before[changed]]).square_().sum())
            self._moved = None
            self.last_searched, self.last_full = len(rows), full
            return self.indices
