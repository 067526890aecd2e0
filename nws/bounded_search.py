"""Exact search for kernels that move a little between calls, in a pool that stays put or moves a little
(training a task; pool pretraining): :class:`BoundedSearch` keeps each kernel's assignment and proves most
of them still hold with triangle-inequality bounds (Hamerly's k-means), searching only the kernels whose
bounds fail. The entries' movement is accumulated and taken off the bounds, as Hamerly's k-means does for
moving centres. It always equals :func:`~nws.exhaustive.brute_force_nearest`, with or without a
:class:`~nws.rate_penalty.RatePenalty`: its bounds are on *distances* only, valid whatever the penalty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nws.exhaustive import CHUNK_ELEMENTS, ROW_BLOCK, SLACK, exact_sqdist, scan, search_dtype, unit_roundoff
from nws.rate_penalty import RatePenalty
from nws.scalar_search import cells, nearest_1d, nearest_1d_rate
from nws.search import nearest

# Rows per block of the per-call bound check: a block of this many floats stays in cache.
CHECK_ELEMENTS = 1 << 17
# Entries kept per kernel from its last full search: where it may have moved to, the bounds look here first.
CANDIDATES = 4


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
        self._cells: tuple[Tensor, Tensor] | None = None  # vectors of length 1: each entry's cell (cells)
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
        by_product = unit_roundoff(x.dtype, x.is_cuda) == u  # unless products run in reduced precision
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
        entry and the reference; every other entry is at least ``l_out - m - P`` away, so its objective is at
        least that squared plus the fewest bits' penalty."""
        has = ref < rate.num_entries
        current = self.indices.index_select(0, rows).long()
        cols = torch.cat([self.cand.index_select(0, rows).long(), current[:, None], torch.where(has, ref, current)[:, None]],
                         dim=1)
        dist = self._distances(x, cols)
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
        """Vectors of length 1: a kernel strictly inside the cell of its entry (:func:`~nws.scalar_search.cells`)
        keeps it (with a rate: if the entry is also its reference, or it has none; every other entry is then
        farther and pays at least as much); only the others are searched, by binary search (or windows, with a
        rate)."""
        if not bool(torch.isfinite(codebook).all()):
            return self._every_time(x, codebook, rate)
        if (self.indices is None or self.indices.shape != (len(x),) or self.codebook is None
                or self.codebook.shape != codebook.shape or self.codebook.dtype != codebook.dtype
                or self.codebook.device != codebook.device):
            self._cells = None
            return self._every_time(x, codebook, rate)
        if self._cells is None or not torch.equal(self.codebook, codebook):
            self.codebook.copy_(codebook)
            self._cells = cells(codebook)
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
                found = nearest_1d(x[rows], codebook)
            else:
                found = nearest_1d_rate(x[rows], codebook, rate, rate.reference[rows].long())
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
        x = x.detach().to(search_dtype(x))
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
                    found, lower, cand, rest = scan(xl, codebook, self.chunk_elements, self.candidates, rate,
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
