"""k-means of vectors (a layer's grouped kernels) into a pool: k-means++ seeding, then Lloyd iterations with the
exact nearest-entry search, optionally with fixed entries (a pool's zero entry). Used by :mod:`nws.pool_sources`."""

from __future__ import annotations


import torch
from torch import Tensor

from nws.exhaustive import CHUNK_ELEMENTS
from nws.search import nearest


def _sqdist_to_assigned(x: Tensor, centres: Tensor, assign: Tensor, chunk_elements: int) -> Tensor:
    """``|x_i - c_{assign_i}|^2`` for every row, in row chunks so memory stays near ``chunk_elements``."""
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    rows = max(1, chunk_elements // max(x.shape[1], 1))
    for s in range(0, len(x), rows):
        diff = x[s : s + rows].double() - centres[assign[s : s + rows]].double()
        out[s : s + rows] = diff.pow(2).sum(1)
    return out


def _sqdist_to_one(x: Tensor, centre: Tensor, chunk_elements: int) -> Tensor:
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    rows = max(1, chunk_elements // max(x.shape[1], 1))
    for s in range(0, len(x), rows):
        out[s : s + rows] = (x[s : s + rows].double() - centre.double()).pow(2).sum(1)
    return out


def _kmeans_pp(x: Tensor, k: int, fixed: Tensor, gen: torch.Generator, chunk_elements: int) -> Tensor:
    """k-means++ seeding: each new centre is a row drawn with probability proportional to its squared
    distance to the nearest centre so far (``fixed`` rows count as centres). Once every row coincides with a
    centre (fewer distinct rows than centres), the rest are drawn from a normal fitted per coordinate, so all
    entries differ and stay near the data."""
    n, d = x.shape
    centres = torch.empty(k, d, dtype=x.dtype, device=x.device)
    if len(fixed):
        dmin = torch.stack([_sqdist_to_one(x, f, chunk_elements) for f in fixed]).amin(0)
        start = 0
    else:
        first = int(torch.randint(n, (1,), generator=gen))
        centres[0] = x[first]
        dmin = _sqdist_to_one(x, centres[0], chunk_elements)
        start = 1
    for j in range(start, k):
        cum = dmin.cumsum(0)
        total = float(cum[-1])
        if not total > 0:
            mean = x.mean(0, dtype=torch.float64)
            std = x.std(0).double() if n > 1 else x[0].double().abs()
            noise = torch.randn(k - j, d, generator=gen, dtype=torch.float64).to(x.device)
            centres[j:] = (mean + noise * std.clamp_min(1e-8)).to(x.dtype)
            break
        u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
        pick = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device),
                                          right=True)), n - 1)
        centres[j] = x[pick]
        dmin = torch.minimum(dmin, _sqdist_to_one(x, centres[j], chunk_elements))
    return centres


@torch.no_grad()
def kmeans(vectors: Tensor, k: int, iters: int = 25, seed: int = 0, fixed: Tensor | None = None,
           chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``k`` centres ``(k, d)`` of ``vectors`` ``(N, d)``: k-means++ seeding, then up to ``iters`` Lloyd steps.

    Deterministic for a given ``seed`` (bitwise on the CPU). Assignments use the exact search of
    :func:`nws.search.nearest` and every distance is computed in chunks of rows, so extra memory stays near
    ``chunk_elements`` floats whatever ``N``. An empty cluster takes the row farthest from its centre. The
    iterations stop early once no assignment changes (later steps would change nothing). ``fixed`` rows
    ``(m, d)`` are the first ``m`` centres and never move (e.g. an all-zero entry).
    """
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"kmeans needs a non-empty (N, d) tensor, got shape {tuple(vectors.shape)}")
    x = vectors.detach().float()
    fixed = (torch.zeros(0, x.shape[1]) if fixed is None else fixed.detach()).to(x)
    m = len(fixed)
    if k <= m:
        raise ValueError(f"k ({k}) must exceed the number of fixed centres ({m})")
    gen = torch.Generator().manual_seed(seed)
    centres = torch.cat([fixed, _kmeans_pp(x, k - m, fixed, gen, chunk_elements)])
    rows = max(1, chunk_elements // x.shape[1])
    assign = None
    for _ in range(iters):
        new = nearest(x, centres, chunk_elements)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, len(x), rows):
            sums.index_add_(0, assign[s : s + rows], x[s : s + rows].double())
        moved = counts > 0
        moved[:m] = False
        centres[moved] = (sums[moved] / counts[moved, None]).to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        empty = empty[empty >= m]
        if len(empty):
            far = _sqdist_to_assigned(x, centres, assign, chunk_elements)
            for j in empty.tolist():
                i = int(far.argmax())
                if not far[i] > 0:
                    break
                centres[j] = x[i]
                far[i] = 0.0
    return centres
