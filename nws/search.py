"""Exact nearest-entry search of grouped kernels in a pool (L2 distance, ties to the lowest index).

The fast path ranks entries with one fp32 matrix product per chunk, ``|p|^2 - 2 x.p``; a rigorous
floating-point error bound flags the rows whose winner the rounding could have changed, and only
those rows are re-ranked with exact float64 distances. The result always equals
:func:`brute_force_nearest`, the definition of the search.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so a chunk's distance matrix holds about this many floats (16 MB).
CHUNK_ELEMENTS = 1 << 22


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


def _unit_roundoff(x: Tensor) -> float:
    """Unit roundoff of the fp32 matrix product actually used (TF32/bf16 modes are coarser)."""
    if x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    if torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    return 2.0**-24


@torch.no_grad()
def nearest(x: Tensor, codebook: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Index of the nearest codebook row for every row of ``x`` (exact; ties to the lowest index).

    Works in chunks of rows, so extra memory stays near ``chunk_elements`` floats whatever ``len(x)``.
    """
    x = x.detach().float()
    codebook = codebook.detach().float()
    n, d = x.shape
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    sq = codebook.pow(2).sum(1)
    norm = sq.sqrt()
    # Bound on the rounding error of |p|^2 - 2 x.p for fp32 dot products of length d (gamma_{d+2}),
    # doubled for safety.
    gamma = 2.0 * (d + 2) * _unit_roundoff(x) / (1.0 - (d + 2) * _unit_roundoff(x))
    rows = max(1, chunk_elements // codebook.shape[0])
    for start in range(0, n, rows):
        xc = x[start : start + rows]
        approx = torch.addmm(sq, xc, codebook.T, alpha=-2.0)
        best, arg = approx.min(dim=1)
        xn = xc.pow(2).sum(1)
        xnorm = xn.sqrt()
        # A true winner k lies within the computed winner's distance r, so |p_k| <= |x| + r; its error
        # and the computed winner's error together bound how far the ranking can be off.
        radius = (best + xn).clamp_min(0).sqrt()
        slack = gamma * ((xnorm + norm[arg]) ** 2 + (2 * xnorm + radius) ** 2 + 1e-30)
        ambiguous = ((approx <= (best + slack)[:, None]).sum(1) > 1).nonzero().squeeze(1)
        if ambiguous.numel():
            arg[ambiguous] = brute_force_nearest(xc[ambiguous], codebook)
        out[start : start + rows] = arg
    return out
