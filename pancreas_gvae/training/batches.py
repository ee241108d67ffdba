"""Stateless batch order: batch ``step`` depends only on (seed, step).

So a resumed run sees exactly the batches the uninterrupted run would have seen,
with no sampler state to checkpoint.
"""

from __future__ import annotations

import torch

from pancreas_gvae.errors import PipelineError
from pancreas_gvae.training import distributed


class TensorBatches:
    """Batches from an in-memory tensor ``(N, C, *spatial)``; each epoch is a seeded permutation.

    Under several processes each rank takes its own shard of every permutation.
    """

    def __init__(self, data: torch.Tensor, *, batch_size: int, seed: int):
        world = distributed.world_size()
        self.per_rank = data.shape[0] // world
        if self.per_rank < batch_size:
            raise PipelineError(f"{data.shape[0]} images over {world} process(es) is fewer than batch size "
                                f"{batch_size}: lower --batch-size or add data")
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

    def fit_sample(self, n: int, seed: int) -> torch.Tensor:
        """Up to ``n`` images of the whole tensor (every rank the same), a seeded subset."""
        if n >= self.data.shape[0]:
            return self.data
        return self.data[torch.randperm(self.data.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size: (i + 1) * self.batch_size]
        return self.data[idx]


class DatasetBatches:
    """Batches from a map-style dataset with ``set_epoch`` (e.g. ``pancreas_gvae.transforms.slice_dataset.CTSliceDataset``).

    Batch ``step`` is items ``[i*B, (i+1)*B)`` of epoch ``step // steps_per_epoch`` (this rank's
    shard), so a resumed run restarts the loader mid-epoch at the right item. ``to_tensor`` turns a
    collated batch dict into the model input.
    """

    def __init__(self, dataset, *, batch_size: int, to_tensor, num_workers: int = 0, pin_memory: bool = False):
        world, r = distributed.world_size(), distributed.rank()
        self.dataset = dataset
        self.rank_items = list(range(r, len(dataset) - len(dataset) % world, world))
        if len(self.rank_items) < batch_size:
            raise PipelineError(f"{len(dataset)} samples per epoch over {world} process(es) is fewer than "
                                f"batch size {batch_size}: lower --batch-size or add data")
        self.batch_size = batch_size
        self.steps_per_epoch = len(self.rank_items) // batch_size
        self.to_tensor = to_tensor
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._iter = None
        self._next_step = None

    def _start(self, step: int) -> None:
        epoch, i = divmod(step, self.steps_per_epoch)
        self.dataset.set_epoch(epoch)
        items = self.rank_items[i * self.batch_size: self.steps_per_epoch * self.batch_size]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=items,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory,
                                             drop_last=True)
        self._iter = iter(loader)

    def fit_sample(self, n: int, seed: int) -> torch.Tensor:
        """Up to ``n`` items of the dataset's slices (every rank the same), read with the one slice loader; the
        dataset's epoch order is restored, so the batches are unchanged. In a cohort with image-only cases only
        the labelled slices are returned (when there are at least 16): samples are image+mask pairs, so the
        prior is fitted to the codes of slices whose mask is known."""
        from pancreas_gvae.transforms.slice_dataset import read_slices  # CT only: MNIST never imports the CT layer

        order = self.dataset.order
        try:
            items = read_slices(self.dataset, max_slices=int(n), seed=int(seed))
        finally:
            self.dataset.order = order
        x = self.to_tensor(items)
        if isinstance(x, tuple):
            x, has_label = x
            if int((has_label > 0).sum()) >= 16:
                x = x[has_label > 0]
        return x

    def batch(self, step: int) -> torch.Tensor:
        if step != self._next_step or step % self.steps_per_epoch == 0:
            self._start(step)
        self._next_step = step + 1
        return self.to_tensor(next(self._iter))
