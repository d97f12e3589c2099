"""One DataLoader for every epoch of a run, so that its worker processes persist between epochs.

Each epoch has its own plan of batches; :class:`PlannedBatches` is the loader's batch sampler and
takes the new plan before the epoch is iterated. The sampler runs in the main process, so the
workers (started once, at the first epoch) only ever see indices. Starting workers costs seconds
per epoch on a GPU machine with many of them (imports, dataset copies), every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gce.runtime import loader_worker_ignores_sigterm

__all__ = ["EpochLoader", "PlannedBatches"]


class PlannedBatches(Sampler[list[Any]]):
    """A batch sampler whose batches are replaced between epochs."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """``loader_for(batches)``: the run's DataLoader, set to iterate ``batches`` next.

    With workers they are persistent; ``pin_memory`` on CUDA. The loader draws its workers' base
    seed from its own generator (seeded once): a DataLoader otherwise draws it from the global
    torch RNG, and a resumed run would start from a shifted RNG state. Augmentation does not use
    that seed (it is seeded per item), so nothing else depends on it.
    """

    def __init__(self, dataset: Dataset, workers: int, pin_memory: bool, seed: int) -> None:
        self.batches = PlannedBatches()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=loader_worker_ignores_sigterm if workers > 0 else None,
        )

    def loader_for(self, batches: Sequence[list[Any]]) -> DataLoader:
        self.batches.batches = list(batches)
        return self.loader
