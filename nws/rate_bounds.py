"""The bounded search's proofs, and the rate term inside them (:class:`~nws.bounded_search.BoundedSearch`, with
or without a :class:`~nws.rate_penalty.RatePenalty`): what a lower bound on distances says about the objective
``J(k) = |x - p_k|^2 + mu * bits[r, k]``, the one comparison per kernel that the gap test and the anchored test
come down to, and the proof that a kernel keeps its entry ``a``.

Bounds kept from call to call are on the *objective roots* ``phi_k(x) = sqrt(J(k))``, of every entry but
the kernel's entry and its reference ``r`` (whose objective, the distance alone, is measured when needed):
``phi_k`` moves no more than the distance does (``sqrt(t^2 + c)`` is 1-Lipschitz in ``t``), so the drift and
movement terms of Hamerly's bounds apply unchanged, and a distance bound ``L`` is one too, lifted to
``sqrt(L^2 + mu * min bits)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nws.exhaustive import SLACK, sqdist_roundup
from nws.rate_penalty import RatePenalty


def lifted(bound: Tensor, ref: Tensor, rate: RatePenalty) -> Tensor:
    """Lower bounds on the distances of the entries but ``a`` and ``r`` (rounded down) as bounds on their
    objective roots: every one of them costs at least the fewest bits of a change (nothing without a
    reference)."""
    least = rate.floors(ref, bound.dtype) * (1 - SLACK)
    return bound.clamp_min(0).square_().mul_(1 - SLACK).add_(least).sqrt_().mul_(1 - SLACK)


def gap_limits(gap: Tensor, indices: Tensor, rate: RatePenalty | None, ref: Tensor | None, x: Tensor,
               codebook: Tensor) -> Tensor:
    """Per kernel on entry ``a`` (``indices``, long) whose gap to its nearest other entry is ``G`` (``gap``, per
    kernel, rounded down), the squared distance to ``p_a`` below which it provably keeps ``a`` by the gap alone
    (0: never), ``rho`` its rounded-up distance: ``rho^2 < (G - rho)^2`` without a rate or a reference; on the
    reference ``rho^2 < (G - rho)^2 + mu * min bits`` (every other entry costs bits); off it ``J(a) = rho^2 +
    mu * bits(a | r)`` below both that and ``(D - rho)^2 <= J(r)``, ``D = |p_a - p_r|`` (which spares
    measuring the reference); each with the roundings of :func:`proof` and a margin. ``x``: a kernel of the
    layer, for the dtype and the rounding of its squared distances."""
    one = 1 - SLACK
    c = one**4

    def root(g: Tensor, b: Tensor) -> Tensor:
        # rho^2 + b < c (g - rho)^2 holds below the positive root of (1 - c) rho^2 + 2 c g rho - (c g^2 - b)
        # on [0, g]; past g only -b > rho^2 can hold.
        half, const = c * g, c * g.square() - b
        at = const / (half + (half.square() + (1 - c) * const.clamp_min(0)).sqrt())
        return torch.where(at <= g, at, (-b).clamp_min(0).sqrt()).clamp_min_(0)

    g = gap.double() * one
    rho = root(g, torch.zeros_like(g))
    if rate is not None:
        k, least = rate.num_entries, rate.mu * rate.floor * one**2
        rho = torch.where(indices == ref, root(g, torch.full_like(g, -least)), rho)
        off = ((indices != ref) & (ref < k)).nonzero().squeeze(1)
        if len(off):
            a, r = indices[off], ref[off]
            paid = rate.penalty(r, a, torch.float64) * (1 + SLACK) ** 3
            apart = torch.linalg.vector_norm(codebook[a].double() - codebook[r].double(), dim=1) * one
            rho[off] = torch.minimum(root(g[off], paid - least), root(apart, paid))
    return ((rho / (1 + SLACK)).square() / sqdist_roundup(x) * one**4).to(x.dtype)


def _off_reference(indices: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The rows on an entry other than their reference (among those that have one, ``ref < k``), and their
    references (long)."""
    off = (indices != ref).nonzero().squeeze(1)
    ref_off = ref.index_select(0, off).long()
    has = ref_off < k  # kernels without a reference pay nothing
    return off[has], ref_off[has]


def _below_reference(x: Tensor, rows: Tensor, cost: Tensor, ref_rows: Tensor, codebook: Tensor) -> Tensor:
    """Whether ``cost`` (upper bounds on ``J(a)`` of kernels ``rows``) is below ``J(r) = |x - p_r|^2``, measured
    and rounded down."""
    diff = x.index_select(0, rows) - codebook.index_select(0, ref_rows)
    return cost < diff.square_().sum(1) / sqdist_roundup(x) * (1 - SLACK)


def proof(x: Tensor, near: Tensor, by_gap: Tensor | None, anchored: Tensor | None, indices: Tensor, ref: Tensor,
          free: Tensor, rate: RatePenalty, codebook: Tensor) -> Tensor:
    """Whether kernels ``x`` on entries ``indices`` with references ``ref`` (``free``: the rows without one)
    provably keep their entry ``a``, from upper bounds ``near`` on ``|x - p_a|^2`` and lower bounds for every
    other entry: on the distance (``by_gap``, the gap's ``L``), on the objective root of every entry but ``r``
    (``anchored``, the anchor's ``F``); either may be None. Every ``k`` outside ``{a, r}`` has ``J(k) >=
    max(L^2 + mu * min bits, F^2)``; a kernel on its reference is proved if ``J(a) = |x - p_a|^2`` is below
    that; one off it also needs ``J(a) < J(r) = |x - p_r|^2``, for which ``L^2`` is a lower bound, else
    ``|x - p_r|`` is measured. Kernels without a reference pay nothing: ``max(L, F)^2`` bounds every other
    entry. A NaN anywhere fails the proof."""
    k = rate.num_entries
    floor = rate.mu * rate.floor * (1 - SLACK) ** 2
    reach = None if by_gap is None else by_gap.clamp_min(0).square_().mul_((1 - SLACK) ** 2)
    roots = None if anchored is None else anchored.clamp_min(0).square_().mul_((1 - SLACK) ** 2)
    floored = roots if reach is None else reach + floor if roots is None else (reach + floor).maximum(roots)
    cost = near * (1 + SLACK)
    off, ref_off = _off_reference(indices, ref, k)
    if len(off):
        pen = rate.penalty(ref_off, indices[off].long(), x.dtype)
        cost[off] = (cost[off] + pen * (1 + SLACK)) * (1 + SLACK)
    ok = cost < floored
    if len(free):
        bound = roots if reach is None else reach if roots is None else reach.maximum(roots)
        ok[free] = cost[free] < bound[free]
    if len(off):
        check = ok[off] if reach is None else ok[off] & ~(cost[off] < reach[off])
        pos, ref_rows = off[check], ref_off[check]
        if len(pos):
            ok[pos] = _below_reference(x, pos, cost[pos], ref_rows, codebook)
    return ok


def anchored_proof(x: Tensor, sq: Tensor, moved_sq: Tensor, lower: Tensor, drift: float, indices: Tensor,
                   rate: RatePenalty | None, codebook: Tensor) -> Tensor:
    """Whether every kernel provably keeps its entry ``a`` by its anchor alone: ``phi_a + m < l - P``
    (``phi_a = |x - p_a|``, with a rate ``sqrt(J(a))``; ``m`` the distance from the anchor; ``lower`` the
    stored ``drift0 + l``, ``drift`` the drift now), from the squared distances to the entries (``sq``,
    overwritten) and the anchors (``moved_sq``, left holding their square roots, not rounded up). Scaled so
    that the test is one comparison per kernel after a square root each and two additions, where the terms
    one by one took a dozen passes over the kernels; every rounding is charged to the bounds, with a margin.
    A kernel off its reference also needs ``J(a) < J(r) = |x - p_r|^2``, measured for those that pass. A NaN
    anywhere fails the proof."""
    roundup = sqdist_roundup(x)
    k = (1 - SLACK) ** 2 / (1 + SLACK)  # the margin taken off the stored bound
    scale = (1 + SLACK) / k**2
    off = None
    if rate is not None:
        off, r = _off_reference(indices, rate.reference, rate.num_entries)
        if len(off):
            pen = rate.penalty(r, indices.index_select(0, off).long(), x.dtype)
            cost = (sq.index_select(0, off) * (roundup * (1 + SLACK)) + pen * (1 + SLACK)) * (1 + SLACK)
    root = sq.mul_(roundup * scale)
    if off is not None and len(off):
        root.index_copy_(0, off, cost * ((1 + SLACK) / k**2))
    root.sqrt_().add_(moved_sq.sqrt_(), alpha=math.sqrt(roundup) * (1 + SLACK) / k)
    if drift:
        root.add_(drift * (1 + SLACK) / k)
    ok = root < lower
    if off is not None and len(off):
        pos = ok.index_select(0, off).nonzero().squeeze(1)
        if len(pos):
            rows = off.index_select(0, pos)
            ok.index_copy_(0, rows, _below_reference(x, rows, cost.index_select(0, pos), r.index_select(0, pos),
                                                     codebook))
    return ok
