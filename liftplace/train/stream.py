"""The data order as a pure function of ``(seed, epoch)``, so a resumed run can skip to
exactly the batch it stopped at.

Epoch ``e`` is ``randperm(N)`` from a generator seeded by ``(seed, e)``; process ``r``
of ``R`` takes every ``R``-th index, in full batches (the ragged tail of each epoch is
dropped, so every step sees the same batch shape). Micro-batch number ``k`` of the
whole run is batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``;
gradient accumulation simply consumes consecutive micro-batches, across epoch
boundaries too, so resuming never depends on where an accumulation window fell.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


class BatchStream:
    """Deterministic, resumable iterator over micro-batches of ``dataset``."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, num_replicas: int = 1, rank: int = 0,
                 num_workers: int = 0, collate_fn=None):
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.per_rank = self.n // num_replicas
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"the dataset has {self.n} samples, fewer than train_batch_size={batch_size} x "
                             f"{num_replicas} process(es); lower train_batch_size or add data")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        perm = torch.randperm(self.n, generator=g)
        mine = perm[self.rank: self.per_rank * self.num_replicas: self.num_replicas]
        bs = self.batch_size
        return [mine[i * bs:(i + 1) * bs].tolist() for i in range(self.batches_per_epoch)]

    def position(self, micro_index: int) -> tuple[int, int]:
        return divmod(micro_index, self.batches_per_epoch)

    def iterate(self, start_micro_index: int = 0):
        """Yield ``(micro_index, batch)`` forever, starting at ``start_micro_index``."""
        epoch, offset = self.position(start_micro_index)
        k = start_micro_index
        while True:
            batches = self.epoch_batches(epoch)[offset:]
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                collate_fn=self.collate_fn)
            for batch in loader:
                yield k, batch
                k += 1
            epoch, offset = epoch + 1, 0
