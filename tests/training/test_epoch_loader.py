"""The trainer's one DataLoader: new batches every epoch, the same worker processes throughout."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from gce.training.epoch_loader import EpochLoader


class IndexAndPid(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(index), os.getpid()


def _read(loader) -> tuple[list[list[int]], set[int]]:
    batches, pids = [], set()
    for values, batch_pids in loader:
        batches.append(values.tolist())
        pids.update(batch_pids.tolist())
    return batches, pids


def test_each_epoch_reads_its_own_plan_with_the_same_workers():
    epochs = [[[0, 1], [2, 3]], [[5], [4, 6, 7]], [[9, 8]]]
    persistent, inline = EpochLoader(IndexAndPid(), 2, False, 0), EpochLoader(IndexAndPid(), 0, False, 0)
    first, first_pids = _read(persistent.loader_for(epochs[0]))
    assert first == epochs[0] and len(first_pids) == 2 and os.getpid() not in first_pids
    stopped = iter(persistent.loader_for(epochs[1]))
    next(stopped)  # an epoch left after one batch (Ctrl-C): the next epoch still starts clean
    for plan in epochs[1:]:
        batches, pids = _read(persistent.loader_for(plan))
        assert batches == plan == _read(inline.loader_for(plan))[0]
        assert pids and pids <= first_pids  # no new processes (a one-batch epoch uses one worker)
    assert persistent.loader.persistent_workers and not inline.loader.persistent_workers
