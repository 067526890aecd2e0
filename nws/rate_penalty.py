"""The rate term of the search objective (rate-aware search, :mod:`nws.rate`): per kernel, the price of
each pool entry in bits the task file's coder spends, against the kernel's reference entry.

Every path of the search (:func:`nws.search.nearest`, :class:`nws.bounded_search.BoundedSearch`) takes a
:class:`RatePenalty` and minimises ``J(k) = |x - p_k|^2 + mu * bits[r, k]`` exactly, ties to the lowest index.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class RatePenalty:
    """The rate term of the search objective: kernel ``i``, whose reference entry is ``reference[i]``, takes
    ``argmin_k |x_i - p_k|^2 + mu * bits[reference[i], k]`` (ties to the lowest index).

    ``reference`` ``(N,)`` (integers): the reference entry of every kernel, ``K`` for a kernel that has none
    (no penalty at all). ``bits`` ``(K + 1, K)`` float16: ``bits[r, k]`` the bits of coding entry ``k``
    against ``r``, with ``bits[r, r] = 0`` and row ``K`` all zero; or None: every change costs ``flat`` bits
    (for pools too large for the coder's neighbour ranks). ``mu`` (>= 0) is the price of a bit in
    squared-distance units. The penalty of a choice is defined as ``mu * b`` in float64, ``b`` the float16
    value; :func:`~nws.exhaustive.brute_force_nearest` with it is the definition of the search. Not to be
    changed once searched with: the bounded search keeps bounds for this object, and for a new one that
    :meth:`raises` it (the same reference and bits at a higher price); any other is searched afresh.
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

    def raises(self, other: RatePenalty | None) -> bool:
        """Whether this penalty is ``other``, or ``other`` at a price no lower (its very reference and bits):
        then no entry's objective is lower under it, so bounds on ``other``'s objective roots hold for it."""
        return other is self or (other is not None and other.reference is self.reference and other.bits is self.bits
                                 and other.flat == self.flat and self.mu >= other.mu)

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
