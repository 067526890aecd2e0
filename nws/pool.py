"""A layer's kernel pool: ``K`` grouped-kernel vectors of length ``d``, searched by exact L2 distance.

Pretrained once by an exponential moving average of the kernels assigned to each entry (VQ-VAE with EMA,
as in the NWS reference), then frozen and shared by every task.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from nws.search import nearest


class KernelPool(nn.Module):
    """``codebook`` of shape ``(K, d)`` with EMA statistics.

    Args:
        num_entries: ``K``, the number of entries.
        dim: ``d = g * kh * kw``, the length of a grouped kernel.
        decay: EMA decay of counts and sums (reference 0.99).
        eps: Laplace-smoothing constant (reference 1e-5).
        seed: seeds the standard-normal initialisation, so equal seeds give equal pools.
    """

    def __init__(self, num_entries: int, dim: int, decay: float = 0.99, eps: float = 1e-5, seed: int = 0):
        super().__init__()
        if num_entries < 1 or dim < 1:
            raise ValueError(f"a pool needs num_entries >= 1 and dim >= 1, got {num_entries} and {dim}")
        self.decay, self.eps = decay, eps
        codebook = torch.randn(num_entries, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_entries))
        self.register_buffer("embed_sum", codebook.clone())
        # Counts and sums of the assignments seen since the last update (one optimizer step).
        self.register_buffer("step_count", torch.zeros(num_entries), persistent=False)
        self.register_buffer("step_sum", torch.zeros(num_entries, dim), persistent=False)
        self.trainable = True

    @property
    def num_entries(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def extra_repr(self) -> str:
        return f"num_entries={self.num_entries}, dim={self.dim}, trainable={self.trainable}"

    def search(self, vectors: Tensor) -> Tensor:
        """Index of the nearest entry for each row of ``vectors`` ``(N, d)``; ties go to the lowest."""
        return nearest(vectors, self.codebook)

    def freeze(self) -> KernelPool:
        """Stop EMA updates (task training): the pool is the fixed search space from now on."""
        self.trainable = False
        self.step_count.zero_()
        self.step_sum.zero_()
        return self

    def unfreeze(self) -> KernelPool:
        self.trainable = True
        return self

    @torch.no_grad()
    def accumulate(self, vectors: Tensor, indices: Tensor) -> None:
        """Add one forward pass's assignments to this step's counts ``n_k`` and sums ``s_k``."""
        vectors = vectors.detach().float()
        self.step_count.index_add_(0, indices, torch.ones_like(indices, dtype=self.step_count.dtype))
        self.step_sum.index_add_(0, indices, vectors)

    @torch.no_grad()
    def ema_update(self) -> None:
        """One EMA step from the accumulated assignments, then reset them.

        ``N <- decay N + (1-decay) n``, ``S <- decay S + (1-decay) s``,
        ``N'_k = (N_k + eps) / (sum N + K eps) * sum N``, ``p_k = S_k / N'_k``.
        """
        if not self.trainable:
            raise RuntimeError("ema_update on a frozen pool")
        self.cluster_size.mul_(self.decay).add_(self.step_count, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(self.step_sum, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_entries * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.step_count.zero_()
        self.step_sum.zero_()

    @torch.no_grad()
    def init_from(self, vectors: Tensor, seed: int = 0) -> KernelPool:
        """Initialise the entries from ``vectors`` (e.g. the layer's own kernels), sampled with a seeded
        generator; with fewer vectors than entries, repeats get a little seeded noise so all entries differ.
        The EMA statistics start at one observation per entry."""
        vectors = vectors.detach().float().cpu()
        gen = torch.Generator().manual_seed(seed)
        n, k = vectors.shape[0], self.num_entries
        pick = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(n, (k,), generator=gen)
        entries = vectors[pick]
        if n < k:
            scale = vectors.std() if n > 1 else vectors.abs().mean()
            noise = torch.randn(k - n, self.dim, generator=gen) * (1e-2 * float(scale) + 1e-8)
            entries[n:] += noise
            entries[:n] = vectors[torch.randperm(n, generator=gen)]
        self.codebook.copy_(entries)
        # Each entry starts as one observed kernel, so entries the first steps do not use stay where they are
        # instead of being divided by a near-zero count (which sends them far away, out of use).
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(entries)
        return self

    def fingerprint(self) -> str:
        """sha256 of the codebook's float32 bytes: names the exact search space a task was encoded in."""
        data = self.codebook.detach().float().contiguous().cpu().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()
