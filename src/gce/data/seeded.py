"""Training images whose augmentation is a pure function of (seed, epoch, batch, position)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from gce.data.images import load_rgb
from gce.data.records import ImageRecords

__all__ = ["SeededAugmentedDataset", "item_seed"]


def item_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """Seed of one image's augmentation: independent of workers, batch order and resumption."""
    return int(np.random.SeedSequence([seed, epoch, batch, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededAugmentedDataset(Dataset):
    """Training images whose random augmentation is drawn from a per-item seed.

    Items are requested as ``(index, seed)``; the transform runs inside ``fork_rng`` so the global
    torch RNG is left untouched and DataLoader workers cannot change the result.
    """

    def __init__(self, records: ImageRecords, transform: Callable) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = load_rgb(self.records.paths[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tensor = self.transform(image)
        return tensor, int(self.records.labels[index])
