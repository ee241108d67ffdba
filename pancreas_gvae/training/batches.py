"""Stateless batch order: batch ``step`` depends only on (seed, step).

So a resumed run sees exactly the batches the uninterrupted run would have seen,
with no sampler state to checkpoint.
"""

from __future__ import annotations

import torch

from pancreas_gvae.training import distributed


class TensorBatches:
    """Batches from an in-memory tensor ``(N, C, *spatial)``; each epoch is a seeded permutation.

    Under several processes each rank takes its own shard of every permutation.
    """

    def __init__(self, data: torch.Tensor, *, batch_size: int, seed: int):
        world = distributed.world_size()
        self.per_rank = data.shape[0] // world
        if self.per_rank < batch_size:
            raise ValueError(f"{data.shape[0]} images over {world} process(es) is fewer than batch size {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = self.per_rank // batch_size
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.data.shape[0], generator=g)
            r = distributed.rank()
            self._perm = perm[r * self.per_rank: (r + 1) * self.per_rank]
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size: (i + 1) * self.batch_size]
        return self.data[idx]
