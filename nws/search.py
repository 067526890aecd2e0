"""Exact nearest-entry search of grouped kernels in a pool (L2 distance, ties to the lowest index).

:func:`nearest` is the search's one entry point: it ranks entries with one matrix product per chunk of rows,
with a rigorous floating-point error bound and exact re-ranking of the rows in doubt (:mod:`nws.exhaustive`),
and finds vectors of length 1 by binary search (:mod:`nws.scalar_search`).
:class:`~nws.bounded_search.BoundedSearch` keeps the assignments of slowly moving kernels and proves most of
them still hold with triangle-inequality bounds (Hamerly's k-means), searching only the kernels whose bounds
fail. The pool may move too (pool pretraining): the entries' movement is accumulated and taken off the
bounds, as Hamerly's k-means does for moving centres. Both always equal
:func:`~nws.exhaustive.brute_force_nearest`, the definition of the search.

With a :class:`~nws.rate_penalty.RatePenalty` (rate-aware search, :mod:`nws.rate`) every path minimises instead
``J(k) = |x - p_k|^2 + mu * bits[r, k]``, the bits the task file's coder spends on entry ``k`` for a kernel whose
reference entry is ``r`` (``bits[r, r] = 0``), still exactly and with ties to the lowest index. The bounded
search then keeps bounds on the objective's roots (:mod:`nws.rate_bounds`), for as long as the penalty stays
the same object.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nws.exhaustive import CHUNK_ELEMENTS, scan, search_dtype
from nws.rate_penalty import RatePenalty
from nws.scalar_search import nearest_1d, nearest_1d_rate


@torch.no_grad()
def nearest(x: Tensor, codebook: Tensor, chunk_elements: int = CHUNK_ELEMENTS,
            rate: RatePenalty | None = None) -> Tensor:
    """Index of the nearest codebook row for every row of ``x`` (exact; ties to the lowest index); with
    ``rate``, of the row minimising the distance squared plus the rate penalty (see :class:`RatePenalty`).

    Works in chunks of rows, so extra memory stays near ``chunk_elements`` floats whatever ``len(x)``; vectors
    of length 1 are found by binary search. Runs in fp32 (fp64 for fp64 inputs), without autograd, whatever
    the autocast state.
    """
    dtype = search_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(dtype)
        codebook = codebook.detach().to(dtype)
        if rate is not None:
            rate.check(len(x), len(codebook))
            ref = rate.reference.long()
            if x.shape[1] == 1 and len(codebook):
                found = nearest_1d_rate(x, codebook, rate, ref)
                if found is not None:
                    return found
            return scan(x, codebook, chunk_elements, 0, rate, ref)[0]
        if x.shape[1] == 1 and len(codebook):
            found = nearest_1d(x, codebook)
            if found is not None:
                return found
        return scan(x, codebook, chunk_elements)[0]
