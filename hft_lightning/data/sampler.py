"""Deterministic, resumable batches for one stage of the curriculum.

Batch ``b`` of a stage is a pure function of ``(seed, b)``: its abilities are drawn from the stage's
mixture weights and its examples uniformly within each ability, from a generator seeded for that batch
alone. Resuming in the middle of a stage therefore needs no sampler state: start at batch
``start_batch`` and the data order is exactly the uninterrupted run's.

Under data parallelism the draw is one global batch of ``batch_size * num_replicas`` examples and process
``rank`` trains on its ``batch_size`` consecutive rows: N processes see exactly the examples that one
process with an N times larger batch sees, and every process knows the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from hft_lightning.seeds import derive_seed


class StageBatchSampler(Sampler[list[int]]):
    """Yields batches of indices into the concatenation of the abilities' training sets.

    Args:
        dataset_sizes: Number of training examples of each ability, in concatenation order.
        weights: Mixture weight of each ability in this stage (non-negative, not all zero).
        batch_size: Examples per batch on each process.
        num_batches: Batches in the stage (optimizer steps times gradient accumulation).
        seed: Seed of this stage's data order.
        start_batch: First batch to yield (batches before it were consumed before a resume).
        rank: This process's rank among the data-parallel processes.
        num_replicas: Number of data-parallel processes.
    """

    def __init__(
        self,
        dataset_sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        num_batches: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
    ):
        if len(dataset_sizes) != len(weights):
            raise ValueError(f"got {len(weights)} weights for {len(dataset_sizes)} datasets")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside the {num_replicas} processes")
        self.sizes = torch.tensor(dataset_sizes)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch={start_batch} is outside the stage's {num_batches} batches")
        self.start_batch = start_batch
        self.rank = rank
        self.num_replicas = num_replicas

    def __len__(self) -> int:
        # The whole stage, also when resuming at start_batch: Lightning continues batch_idx from its restored
        # progress and ends the epoch when the iterator is exhausted, so a shorter length would end it early.
        return self.num_batches

    def global_batch(self, index: int) -> list[int]:
        """The indices of batch ``index`` of this stage on all processes, ``batch_size * num_replicas`` of them."""
        size = self.batch_size * self.num_replicas
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batch", index))
        which = torch.multinomial(self.weights, size, replacement=True, generator=generator)
        within = (torch.rand(size, generator=generator, dtype=torch.float64) * self.sizes[which]).long()
        return (self.offsets[which] + within).tolist()

    def batch(self, index: int) -> list[int]:
        """The indices of batch ``index`` of this stage on this process."""
        start = self.rank * self.batch_size
        return self.global_batch(index)[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.start_batch, self.num_batches):
            yield self.batch(index)
