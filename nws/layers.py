"""NWS layers: ``Conv2d`` and ``Linear`` whose forward uses the nearest pool entries of their weights.

The layer keeps the *temporary* weight (``weight``, trained by SGD) and a :class:`KernelPool`. Forward
rearranges the weight into grouped kernels ``o (g i) h w -> (o i) (g h w)``, replaces each by its nearest
pool entry and runs the ordinary op with those *searched* weights; the gradient reaches the temporary
weight unchanged (straight-through estimator). With a rate set (``layer.rate``, see :mod:`nws.rate`) each kernel
takes instead the entry minimising its squared distance plus the price of the bits the task file spends on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nws.bounded_search import BoundedSearch
from nws.pool import KernelPool
from nws.rate_penalty import RatePenalty


class _StraightThrough(torch.autograd.Function):
    """Returns the searched weight exactly (a view, no copy); passes its gradient unchanged to the temporary
    weight."""

    @staticmethod
    def forward(ctx, weight: Tensor, searched: Tensor) -> Tensor:  # noqa: ARG004
        return searched.view_as(searched)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Commitment(torch.autograd.Function):
    """``mean((w - sg(q))^2)`` whose value is given (the search's own squared distances, so no pass over the
    weights) and whose gradient is ``F.mse_loss``'s, bit for bit."""

    @staticmethod
    def forward(ctx, weight: Tensor, searched: Tensor, value: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(weight, searched)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, searched = ctx.saved_tensors
        # Into an uninitialised buffer: the plain op zero-fills one first, a pass over the weight for nothing.
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        mean = 1  # torch's reduction code for 'mean'
        return torch.ops.aten.mse_loss_backward.grad_input(grad, weight, searched, mean, grad_input=out), None, None


class NWSLayer(nn.Module):
    """What NWS conv and linear layers share: grouping, search with a cache, straight-through weight."""

    weight: nn.Parameter
    pool: KernelPool
    group_size: int

    def _init_nws(self, pool_size: int, group_size: int, decay: float, eps: float, seed: int) -> None:
        in_per_group = self.weight.shape[1]
        # A group size that does not divide the layer's input channels falls back to the largest that does.
        self.group_size = math.gcd(group_size, in_per_group)
        kernel = math.prod(self.weight.shape[2:])
        self.pool = KernelPool(pool_size, self.group_size * kernel, decay=decay, eps=eps, seed=seed)
        self._search = BoundedSearch()  # keeps the searched kernels in step with the temporary weight
        self._forward: tuple | None = None  # (weight key, searched weight) of the last forward
        self._rate: RatePenalty | None = None

    @property
    def rate(self) -> RatePenalty | None:
        """The rate penalty of the search (None: the nearest entry), set by :func:`nws.rate.set_rate`."""
        return self._rate

    @rate.setter
    def rate(self, rate: RatePenalty | None) -> None:
        if rate is not None:
            rate.check(self.num_kernels, self.pool.num_entries)
        self._rate = rate
        self._forward = None

    @property
    def num_kernels(self) -> int:
        """Number of grouped kernels, i.e. of indices this layer stores per task."""
        return self.weight.numel() // self.pool.dim

    def kernels(self, weight: Tensor | None = None) -> Tensor:
        """Grouped kernels ``(N, d)`` of ``weight`` (default: the temporary weight)."""
        w = self.weight if weight is None else weight
        out, cin = w.shape[:2]
        g = self.group_size
        w = w.reshape(out, g, cin // g, -1).transpose(1, 2)
        return w.reshape(-1, self.pool.dim)

    def weight_from_kernels(self, vectors: Tensor) -> Tensor:
        """Inverse of :meth:`kernels`: a weight of this layer's shape from ``(N, d)`` vectors."""
        out, cin = self.weight.shape[:2]
        g = self.group_size
        w = vectors.reshape(out, cin // g, g, -1).transpose(1, 2)
        return w.reshape(self.weight.shape)

    @torch.no_grad()
    def search(self) -> Tensor:
        """Indices ``(N,)`` (int64) of the nearest pool entry of each grouped kernel."""
        return self._searched()[0].long()

    @torch.no_grad()
    def searched_weight(self) -> Tensor:
        """The weight built from the nearest pool entries (a new tensor, no gradient)."""
        return self._searched()[1].clone()

    def _searched(self) -> tuple[Tensor, Tensor]:
        """Current indices and searched weight; only kernels that may have changed entry are searched again."""
        rate = self._rate
        if rate is not None and rate.reference.device != self.weight.device:
            rate = self._rate = rate.to(self.weight.device)
        indices = self._search(self.kernels().detach(), self.pool.codebook, rate)
        return indices, self.weight_from_kernels(self._search.searched).to(self.weight.dtype)

    def forward_searched_weight(self) -> Tensor:
        """The searched weight of the most recent forward (searched again if the weight changed since)."""
        w = self.weight
        if self._forward is not None and self._forward[0] == (w.data_ptr(), w._version, w.shape):
            return self._forward[1]
        with torch.no_grad():
            return self._searched()[1]

    def commitment(self) -> Tensor:
        """``mean((w - sg(q))^2)``, ``q`` the searched weight of the most recent forward (searched again if
        the weight changed since): the layer's term of :func:`nws.commitment_loss`. Its value is the search's
        sum of squared distances (equal to ``F.mse_loss`` but for rounding), its gradient ``F.mse_loss``'s."""
        searched = self.forward_searched_weight()
        total = getattr(self._search, "sq_total", None)
        if total is None or not torch.is_grad_enabled():
            return F.mse_loss(self.weight, searched)
        value = (total.to(torch.float64) / self.weight.numel()).to(torch.promote_types(self.weight.dtype,
                                                                                        searched.dtype))
        return _Commitment.apply(self.weight, searched, value)

    def nws_weight(self) -> Tensor:
        """Searched weight carrying the straight-through gradient; records EMA statistics when pretraining."""
        indices, searched = self._searched()
        w = self.weight
        self._forward = ((w.data_ptr(), w._version, w.shape), searched)
        if self.training and self.pool.trainable and torch.is_grad_enabled():
            self.pool.accumulate(self.kernels().detach(), indices.long())  # index_add_ is 4x slower with int32
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return searched
        return _StraightThrough.apply(self.weight, searched)

    @torch.no_grad()
    def set_indices(self, indices: Tensor) -> None:
        """Set the temporary weight to the pool entries at ``indices`` (so the search returns them)."""
        indices = indices.to(self.pool.codebook.device, torch.long)
        if indices.shape != (self.num_kernels,):
            raise ValueError(f"expected {self.num_kernels} indices, got shape {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.pool.num_entries):
            raise ValueError(f"indices out of range for a pool of {self.pool.num_entries} entries")
        self.weight.copy_(self.weight_from_kernels(self.pool.codebook[indices]))
        self._search.prime(indices, self.pool.codebook)


class NWSConv2d(nn.Conv2d, NWSLayer):
    """``nn.Conv2d`` searched in a pool; stride, padding, dilation, bias and groups as usual."""

    def __init__(self, *args, pool_size: int = 512, group_size: int = 1, decay: float = 0.99,
                 eps: float = 1e-5, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nws(pool_size, group_size, decay, eps, seed)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.nws_weight(), self.bias)


class NWSLinear(nn.Linear, NWSLayer):
    """``nn.Linear`` searched in a pool; its ``(out, in)`` weight is treated as a 1x1 conv."""

    def __init__(self, *args, pool_size: int = 512, group_size: int = 1, decay: float = 0.99,
                 eps: float = 1e-5, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_nws(pool_size, group_size, decay, eps, seed)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.nws_weight(), self.bias)
