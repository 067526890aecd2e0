"""Exact nearest-entry search of grouped kernels in a pool (L2 distance, ties to the lowest index).

:func:`nearest` ranks entries with one matrix product per chunk of rows, ``|p|^2 - 2 x.p``; a rigorous
floating-point error bound flags the rows whose winner rounding could have changed, and only those are
re-ranked with exact distances. :class:`BoundedSearch` keeps the assignments of slowly moving kernels to a
*frozen* pool and proves most of them still hold with triangle-inequality bounds (as Hamerly's and Elkan's
k-means do), searching only the kernels whose bounds fail. Both always equal :func:`brute_force_nearest`,
the definition of the search.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so a chunk's distance matrix holds about this many floats (4 MB in fp32).
CHUNK_ELEMENTS = 1 << 20
# Relative safety factor on every bound (far above the fp32 rounding of a distance, ~1e-6).
SLACK = 1e-4
# Nearest other entries kept per pool entry: where a kernel may have moved to, the bounds look here first.
NEIGHBOURS = 16


def exact_sqdist(x: Tensor, codebook: Tensor) -> Tensor:
    """Squared L2 distances ``(n, K)`` in float64, summed in a fixed order over the vector length.

    Differences and squares of fp32 values are exact in float64, so equal real distances compare equal.
    """
    x64, c64 = x.double(), codebook.double()
    out = torch.zeros(x.shape[0], codebook.shape[0], dtype=torch.float64, device=x.device)
    for j in range(x.shape[1]):
        out += (x64[:, j, None] - c64[None, :, j]) ** 2
    return out


def brute_force_nearest(x: Tensor, codebook: Tensor) -> Tensor:
    """The definition of the search: argmin of :func:`exact_sqdist`, first index on ties."""
    return exact_sqdist(x, codebook).argmin(dim=1)


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


@torch.no_grad()
def nearest(x: Tensor, codebook: Tensor, chunk_elements: int = CHUNK_ELEMENTS,
            with_bound: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Index of the nearest codebook row for every row of ``x`` (exact; ties to the lowest index).

    Works in chunks of rows, so extra memory stays near ``chunk_elements`` floats whatever ``len(x)``.
    With ``with_bound``, also returns for each row a lower bound on its distance to every *other* entry.
    Runs in fp32 (fp64 for fp64 inputs), without autograd, whatever the autocast state.
    """
    dtype = _search_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(dtype)
        codebook = codebook.detach().to(dtype)
        n, d = x.shape
        out = torch.empty(n, dtype=torch.long, device=x.device)
        bound = torch.empty(n, dtype=dtype, device=x.device)
        if n == 0:
            return (out, bound) if with_bound else out
        sq = codebook.pow(2).sum(1)
        norm = sq.sqrt()
        u = _unit_roundoff(dtype, x.is_cuda)
        # Bound on the rounding error of |p|^2 - 2 x.p with dot products of length d (gamma_{d+2}), doubled.
        gamma = 2.0 * (d + 2) * u / (1.0 - (d + 2) * u)
        rows = max(1, chunk_elements // codebook.shape[0])
        for start in range(0, n, rows):
            xc = x[start : start + rows]
            approx = torch.addmm(sq, xc, codebook.T, alpha=-2.0)
            best, arg = approx.min(dim=1)
            approx.scatter_(1, arg[:, None], float("inf"))
            second, arg2 = approx.min(dim=1)
            xn = xc.pow(2).sum(1)
            xnorm = xn.sqrt()
            # Any entry that truly beats (or ties) the computed winner lies within its distance r, so its
            # norm is at most |x| + r; the two rounding errors together bound how far apart they can look.
            radius = (best + xn).clamp_min(0).sqrt()
            slack = gamma * ((xnorm + norm[arg]) ** 2 + (2 * xnorm + radius) ** 2) + 1e-30
            ambiguous = (second <= best + slack).nonzero().squeeze(1)
            if ambiguous.numel():
                arg[ambiguous] = brute_force_nearest(xc[ambiguous], codebook)
            out[start : start + rows] = arg
            # Lower bound on the distance to every other entry: the true runner-up's approximate value is at
            # least `second`, and it lies within the computed runner-up's distance r2, so |p| <= |x| + r2.
            r2 = (second + xn).clamp_min(0).sqrt()
            err2 = gamma * ((xnorm + norm[arg2]) ** 2 + (2 * xnorm + r2 * (1 + SLACK)) ** 2)
            low = (second + xn - err2).clamp_min(0).sqrt() * (1 - SLACK)
            low[ambiguous] = 0.0
            bound[start : start + rows] = low
    return (out, bound) if with_bound else out


class BoundedSearch:
    """Exact search for kernels that move a little between calls, against a pool that stays put.

    Per kernel it keeps its entry ``a``, its position at its last search (``anchor``, stored in half
    precision, the rounding charged to the bound) and a lower bound ``lower`` on the distance from there to
    every other entry. A kernel now at ``x``, ``m = |x - anchor|`` away, provably keeps ``a`` if
    ``|x - p_a| + m < lower``. A kernel that fails this is checked against ``a``'s nearest entries: every entry
    outside them is at least ``R_a - |x - p_a|`` away (``R_a`` their radius around ``p_a``), so if the best of
    them beats that, it is the answer. Only kernels that fail both get a full search. While the pool moves
    (pretraining), every call is a full search.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS, neighbours: int = NEIGHBOURS):
        self.chunk_elements, self.neighbours = chunk_elements, neighbours
        self.reset()

    def reset(self) -> None:
        self.indices: Tensor | None = None  # (N,) current entries (int32)
        self.anchor: Tensor | None = None   # (N, d) where each kernel was last searched (fp16)
        self.lower: Tensor | None = None    # (N,) lower bound on the distance from anchor to every other entry
        self.codebook: Tensor | None = None
        self.last_searched = 0              # kernels searched (by neighbours or fully) in the last call
        self.last_rows: Tensor | None = None  # rows whose entry may have changed; None means all
        self.primed: tuple[Tensor, Tensor] | None = None  # (indices, codebook) given by prime()

    @torch.no_grad()
    def _neighbour_table(self, codebook: Tensor) -> None:
        """Each entry's nearest other entries, and a lower bound on its distance to all the rest."""
        k = codebook.shape[0]
        m = min(self.neighbours, k - 1)
        step = max(1, self.chunk_elements // (8 * k))
        near, order = [], []
        for start in range(0, k, step):
            dist = exact_sqdist(codebook[start : start + step], codebook).sqrt_()
            dist[torch.arange(len(dist)), torch.arange(start, start + len(dist))] = float("inf")
            values, where = dist.topk(min(m + 1, k - 1), dim=1, largest=False)
            near.append(values)
            order.append(where)
        near_t, order_t = torch.cat(near), torch.cat(order)
        self.columns = codebook.T.contiguous()
        self.nbr = torch.cat([torch.arange(k, device=codebook.device)[:, None], order_t[:, :m]], dim=1).int()
        outer = near_t[:, m] if near_t.shape[1] > m else torch.full((k,), float("inf"), dtype=near_t.dtype,
                                                                     device=near_t.device)
        self.radius = (outer * (1 - SLACK)).to(codebook.dtype)
        self.gap = (near_t[:, 0] * (1 - SLACK)).to(codebook.dtype) if k > 1 else torch.full(
            (k,), float("inf"), dtype=codebook.dtype, device=codebook.device)

    def _set_anchor(self, rows: Tensor | None, x: Tensor, lower: Tensor) -> None:
        """Anchor ``rows`` (all if None) at ``x``; the half-precision rounding of the anchor comes off ``lower``."""
        anchor = x.to(self.anchor_dtype)
        lower = lower - torch.linalg.vector_norm(anchor.to(x.dtype) - x, dim=1)
        if rows is None:
            self.anchor, self.lower = anchor, lower.to(x.dtype)
        else:
            self.anchor[rows] = anchor
            self.lower[rows] = lower.to(self.lower.dtype)

    def _full(self, x: Tensor, codebook: Tensor, bounds: bool) -> Tensor:
        self.codebook = codebook.clone()
        self.last_searched, self.last_rows = len(x), None
        if not bounds:
            self.indices, self.anchor, self.lower = nearest(x, codebook, self.chunk_elements).int(), None, None
            return self.indices
        indices, lower = nearest(x, codebook, self.chunk_elements, with_bound=True)
        self.indices = indices.int()
        self.anchor_dtype = torch.float16 if x.dtype == torch.float32 else torch.float32
        self._set_anchor(None, x, lower)
        self._neighbour_table(codebook)
        return self.indices

    def prime(self, indices: Tensor, codebook: Tensor) -> None:
        """Start from kernels known to sit exactly on their entries (a task decoded from its indices), without
        searching: each kernel's bound is its entry's distance to the nearest other entry. The bounds are
        set up at the next call, so decoding itself stays a gather."""
        self.primed = (indices.detach().clone(), codebook.detach().clone())

    @torch.no_grad()
    def _prime(self, indices: Tensor, codebook: Tensor) -> None:
        codebook = codebook.to(_search_dtype(codebook))
        if self.codebook is None or not torch.equal(self.codebook, codebook):
            self._neighbour_table(codebook)
        self.codebook = codebook.clone()
        self.indices = indices.to(codebook.device, torch.int32).clone()
        self.anchor_dtype = torch.float16 if codebook.dtype == torch.float32 else torch.float32
        self._set_anchor(None, codebook[self.indices], self.gap[self.indices])
        self.last_searched, self.last_rows = 0, None

    def _by_neighbours(self, rows: Tensor, x: Tensor, codebook: Tensor, dist: Tensor) -> Tensor:
        """Resolve ``rows`` among their entry's neighbours where the radius proves it; returns the rest."""
        cand = self.nbr[self.indices[rows]]                           # (n, m+1), the entry first
        d = torch.zeros(cand.shape, dtype=x.dtype, device=x.device)  # distances, one coordinate at a time
        for j, column in enumerate(self.columns):
            d.add_((x[:, j, None] - column[cand]).pow_(2))
        d.sqrt_()
        best, pos = d.min(dim=1)
        d.scatter_(1, pos[:, None], float("inf"))
        second = d.min(dim=1).values
        outside = self.radius[cand[:, 0]] - dist                      # every other entry is farther than this
        ok = (best * (1 + SLACK) < outside) & (best * (1 + SLACK) < second * (1 - SLACK))
        done = ok.nonzero().squeeze(1)
        self.indices[rows[done]] = cand[done, pos[done]]
        self._set_anchor(rows[done], x[done], torch.minimum(second[done], outside[done]) * (1 - SLACK))
        return (~ok).nonzero().squeeze(1)

    def _update(self, part: slice, x: Tensor, codebook: Tensor, current: Tensor | None, offset: int) -> Tensor:
        """Check the kernels in ``part``; search again those whose bounds fail. Returns their row numbers."""
        xs = x[part]
        entries = codebook[self.indices[part]] if current is None else current[part].to(x.dtype)
        dist = torch.linalg.vector_norm(xs - entries, dim=1)
        moved = torch.linalg.vector_norm(xs - self.anchor[part], dim=1)
        # Written so that a NaN anywhere counts as a failed proof.
        stale = ((dist + moved) * (1 + SLACK) < self.lower[part]).logical_not_().nonzero().squeeze(1)
        if len(stale):
            rows, sub = stale + offset, xs[stale]
            rest = self._by_neighbours(rows, sub, codebook, dist[stale])
            if len(rest):
                idx, low = nearest(sub[rest], codebook, self.chunk_elements, with_bound=True)
                self.indices[rows[rest]] = idx.int()
                self._set_anchor(rows[rest], sub[rest], low)
            return rows
        return stale

    @torch.no_grad()
    def __call__(self, x: Tensor, codebook: Tensor, frozen: bool = True, current: Tensor | None = None) -> Tensor:
        """Nearest-entry indices (int32) of ``x`` ``(N, d)``; ``frozen`` says the pool will not move.

        ``current`` may pass ``codebook[indices]`` of the previous call (the caller's searched kernels), which
        saves gathering them.
        """
        x = x.detach().to(_search_dtype(x))
        codebook = codebook.detach().to(x.dtype)
        if self.primed is not None:
            indices, book = self.primed
            self.primed = None
            if frozen and book.shape == codebook.shape and torch.equal(book.to(codebook), codebook):
                self._prime(indices, codebook)
        with torch.autocast(x.device.type, enabled=False):
            same_pool = (self.codebook is not None and self.codebook.shape == codebook.shape
                         and self.codebook.device == codebook.device and torch.equal(self.codebook, codebook))
            if not (frozen and same_pool and self.anchor is not None and self.anchor.shape == x.shape
                    and self.lower.dtype == x.dtype):
                return self._full(x, codebook, frozen)
            # Row blocks keep the working memory near `chunk_elements` floats whatever the layer size.
            block = max(1, self.chunk_elements // (2 * max(x.shape[1], self.nbr.shape[1])))
            changed = []
            for start in range(0, len(x), block):
                changed.append(self._update(slice(start, start + block), x, codebook, current, start))
            self.last_rows = torch.cat(changed)
            self.last_searched = len(self.last_rows)
            return self.indices
