"""A layer's kernel pool: ``K`` grouped-kernel vectors of length ``d``, searched by exact L2 distance.

Pretrained once by an exponential moving average of the kernels assigned to each entry (VQ-VAE with EMA,
as in the NWS reference), then frozen and shared by every task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

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
        zero_entry: entry 0 is all zero and stays so (sparsification: kernels searched to it are pruned).
    """

    def __init__(self, num_entries: int, dim: int, decay: float = 0.99, eps: float = 1e-5, seed: int = 0,
                 zero_entry: bool = False):
        super().__init__()
        if num_entries < 1 or dim < 1:
            raise ValueError(f"a pool needs num_entries >= 1 and dim >= 1, got {num_entries} and {dim}")
        self.decay, self.eps = decay, eps
        self.zero_entry = False
        codebook = torch.randn(num_entries, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_entries))
        self.register_buffer("embed_sum", codebook.clone())
        # Counts and sums of the assignments seen since the last update (one optimizer step).
        self.register_buffer("step_count", torch.zeros(num_entries), persistent=False)
        self.register_buffer("step_sum", torch.zeros(num_entries, dim), persistent=False)
        self.trainable = True
        if zero_entry:
            self.add_zero_entry()

    @property
    def num_entries(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def extra_repr(self) -> str:
        zero = ", zero_entry=True" if self.zero_entry else ""
        return f"num_entries={self.num_entries}, dim={self.dim}, trainable={self.trainable}{zero}"

    def search(self, vectors: Tensor) -> Tensor:
        """Index of the nearest entry for each row of ``vectors`` ``(N, d)``; ties go to the lowest."""
        return nearest(vectors, self.codebook)

    @torch.no_grad()
    def add_zero_entry(self) -> KernelPool:
        """Make entry 0 all zero and keep it so through EMA updates: kernels searched to it are pruned."""
        if self.num_entries < 2:
            raise ValueError("a pool with a zero entry needs num_entries >= 2")
        self.zero_entry = True
        self.codebook[0] = 0.0
        self.embed_sum[0] = 0.0
        return self

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
        if self.zero_entry:
            self.codebook[0] = 0.0
            self.embed_sum[0] = 0.0
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
        if self.zero_entry:
            entries[0] = 0.0
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


@torch.no_grad()
def all_reduce_step_statistics(pools: Iterable[KernelPool], group: object = None) -> None:
    """Average this step's counts ``n_k`` and sums ``s_k`` over the processes of a distributed run, in one
    collective, before :meth:`KernelPool.ema_update`; a no-op without an initialised process group.

    Why the mean, not the sum: the statistics are computed from the *weights* (each layer's grouped kernels
    and their nearest entries), not from the data. Under DDP every rank holds the same weights after the
    gradient all-reduce, so every rank has already observed exactly the statistics a single process
    training on the whole global batch would (one forward, the same kernels). Summing would count those
    kernels world-size times, inflating ``N_k`` and ``S_k`` and changing the pools; the mean of identical
    values is the single-process value itself (exactly, for counts and for power-of-two world sizes;
    within a rounding of it otherwise). Should ranks ever disagree (a non-deterministic search on
    different hardware), the mean is their consensus. In every case all ranks end with identical
    statistics, hence identical pools after the update.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    pools = list(pools)
    world = torch.distributed.get_world_size(group)
    if world == 1 or not pools:
        return
    flat = torch.cat([torch.cat([p.step_count, p.step_sum.reshape(-1)]) for p in pools])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    flat.div_(world)
    offset = 0
    for p in pools:
        k, n = p.step_count.numel(), p.step_sum.numel()
        p.step_count.copy_(flat[offset:offset + k])
        p.step_sum.copy_(flat[offset + k:offset + k + n].view_as(p.step_sum))
        offset += k + n
