"""Exhaustive exact nearest-entry search: its definition (:func:`brute_force_nearest`) and the chunked scan
that equals it (:func:`scan`), with the constants every path of the search shares.

:func:`scan` ranks entries with one matrix product per chunk of rows, ``|p|^2 - 2 x.p``; a rigorous
floating-point error bound flags the rows whose winner rounding could have changed, and only those are
re-ranked with exact distances. With a :class:`~nws.rate_penalty.RatePenalty` the penalty joins the
approximate values and its rounding the error bound. Also the exact pieces the bounded search
(:mod:`nws.bounded_search`) builds on: each entry's nearest other entries, and row-wise squared distances
streamed in cache-sized blocks with their rounding bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nws.rate_penalty import RatePenalty

# Rows per chunk are chosen so a chunk's distance matrix holds about this many floats (4 MB in fp32).
CHUNK_ELEMENTS = 1 << 20
# Relative safety factor on every bound (far above the rounding of a distance, ~1e-6 in fp32).
SLACK = 1e-4
# Kernels that fail the bound check (and the rows of a 1-D search) are resolved this many at a time, so the
# working memory stays bounded however many fail (each kernel is resolved on its own, so the blocks change
# nothing but the peak).
ROW_BLOCK = 1 << 15


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


def unit_roundoff(dtype: torch.dtype, cuda: bool) -> float:
    """Unit roundoff of the matrix product actually used (TF32/bf16 fp32-matmul modes are coarser)."""
    if dtype == torch.float64:
        return 2.0**-53
    if cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    if torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    return 2.0**-24


def search_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scan(x: Tensor, codebook: Tensor, chunk_elements: int, candidates: int = 0, rate: RatePenalty | None = None,
          ref: Tensor | None = None) -> tuple[Tensor, ...]:
    """The chunked search of :func:`nws.search.nearest` (``x`` and ``codebook`` already in the search dtype).

    With ``candidates = c > 0`` returns ``(index, lower, cand, rest)``: ``lower`` bounds the distance to every
    other entry from below, ``cand`` ``(n, c)`` holds the ``c`` entries ranked first (the nearest among
    them) and ``rest`` bounds the distance to every entry outside ``cand`` from below.

    With ``rate`` (``ref``: the rows' references, long) the winner minimises the penalised objective ``J``;
    the penalty is added to the approximate values and its rounding joins the error bound. ``cand`` then
    ranks entries by ``J``, and ``lower`` and ``rest`` bound the *objective root* ``sqrt(J(k)) = sqrt(|x -
    p_k|^2 + mu * bits[r, k])`` from below instead of the distance (both 1-Lipschitz in ``x`` and ``p_k``, so
    the bounded search moves them alike), ``lower`` that of every entry but the winner and the reference ``r``
    (whose own objective is the distance alone, measured when needed).
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
    u = unit_roundoff(x.dtype, x.is_cuda)
    # Bound on the rounding error of |p|^2 - 2 x.p with dot products of length d (gamma_{d+2}), doubled.
    gamma = 2.0 * (d + 2) * u / (1.0 - (d + 2) * u)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)

    def below(value: Tensor, entry: Tensor, xn: Tensor, xnorm: Tensor) -> Tensor:
        """Lower bound on the distance (with ``rate``: the objective root) of every entry whose approximate
        value is at least ``value``: such an entry nearer than that lies within ``r`` (the computed distance)
        of ``x``, so ``|p| <= |x| + r``; with a rate its penalty is at most ``r^2`` too."""
        r = (value + xn).clamp_min(0).sqrt()
        err = gamma * ((xnorm + norm[entry]) ** 2 + (2 * xnorm + r * (1 + SLACK)) ** 2)
        if rate is not None:
            err = err + 16 * u * (xn + r.square() * (1 + SLACK))
        return torch.where(torch.isinf(value), inf, (value + xn - err).clamp_min(0).sqrt() * (1 - SLACK))

    rows = max(1, chunk_elements // k)
    for start in range(0, n, rows):
        xc = x[start : start + rows]
        approx = torch.addmm(sq, xc, codebook.T, alpha=-2.0)
        if rate is not None:
            rc = ref[start : start + rows]
            approx.add_(rate.bit_rows(rc), alpha=rate.mu)  # J - |x|^2, each term rounded once more
        if candidates:
            values, ranked = approx.topk(min(c + 1, k), dim=1, largest=False)
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
            if rate is not None and k > 1:  # the reference left out of the bound on the others
                others = values[:, 1:].masked_fill(ranked[:, 1:] == rc[:, None], inf)
                second, pos = others.min(dim=1)
                arg2 = ranked[:, 1:].gather(1, pos[:, None]).squeeze(1)
            low = below(second, arg2, xn, xnorm)
            outside = below(values[:, c], ranked[:, c], xn, xnorm) if k > c else torch.full_like(low, inf)
            if rate is not None:
                low = torch.minimum(low, outside)
            # A re-ranked winner may lie outside the candidates: no bound holds for those rows.
            low[ambiguous] = 0.0
            outside[ambiguous] = 0.0
            lower[start : start + rows] = low
            rest[start : start + rows] = outside
            cand[start : start + rows] = ranked[:, :c]
    return (out, lower, cand, rest) if candidates else (out,)


def entry_neighbours(codebook: Tensor, count: int, chunk_elements: int) -> tuple[Tensor, Tensor, Tensor]:
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


def sqdist_roundup(x: Tensor) -> float:
    """The factor that rounds up a squared distance between rows of ``x``'s dtype and width computed as a sum
    of ``d`` rounded squares (at most ``d + 3`` roundings), with :data:`SLACK` to spare."""
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    d = x.shape[1]
    return (1 + SLACK) * (1 + (d + 3) * u) / (1 - (d + 3) * u)


def row_sqdists(x: Tensor, targets: list[tuple[Tensor, Tensor]], block_elements: int,
                gather: tuple[Tensor, Tensor] | None = None) -> None:
    """Squared distances ``|x - y|^2`` row by row into ``out``, for each ``(y, out)`` of ``targets``, in blocks
    of about ``block_elements`` values (each block of ``x`` read once for all, while in cache); with ``gather =
    (codebook, indices)``, each block of the first ``y`` is first gathered as ``codebook[indices]``."""
    n, d = x.shape
    ones = torch.ones(d, dtype=x.dtype, device=x.device)
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    by_product = unit_roundoff(x.dtype, x.is_cuda) == u  # unless products run in reduced precision
    block = max(1, block_elements // d)
    buf = torch.empty(min(block, n), d, dtype=x.dtype, device=x.device)
    for start in range(0, n, block):
        part = slice(start, min(n, start + block))
        if gather is not None:
            torch.index_select(gather[0], 0, gather[1][part], out=targets[0][0][part])
        diff = buf[: part.stop - part.start]
        for y, out in targets:
            torch.sub(x[part], y[part], out=diff)
            if by_product:  # the squares summed by a product with a vector of ones: the fastest way
                torch.mv(diff.square_(), ones, out=out[part])
            else:
                torch.sum(diff.square_(), dim=1, out=out[part])
