"""The splits of one run: the dataset's train/test, a class-disjoint validation hold-out, verified."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gce.config import ExperimentConfig
from gce.data import load_dataset
from gce.data.images import check_records
from gce.data.records import ImageRecords
from gce.errors import ConfigError

__all__ = ["RunData", "prepare_data", "split_validation"]


def split_validation(records: ImageRecords, fraction: float, seed: int) -> tuple[ImageRecords, ImageRecords | None]:
    """Hold out a seeded ``fraction`` of the training classes for validation (class-disjoint)."""
    if fraction <= 0:
        return records, None
    rng = np.random.default_rng(seed)
    classes = rng.permutation(records.num_classes)
    num_val = max(2, round(fraction * records.num_classes))
    if records.num_classes - num_val < 2:
        raise ConfigError(f"data.val_fraction={fraction} leaves fewer than 2 training classes of {records.num_classes}")
    is_val = np.isin(records.labels, classes[:num_val])
    return records.subset(np.flatnonzero(~is_val)), records.subset(np.flatnonzero(is_val))


@dataclass
class RunData:
    train: ImageRecords
    val: ImageRecords | None
    test: ImageRecords


def prepare_data(cfg: ExperimentConfig, progress: bool) -> RunData:
    d = cfg.data
    # data.skip_bad also covers what the loader skips (listed-but-missing files, empty class
    # folders); an explicit data.options.skip_bad wins.
    splits = load_dataset(d.dataset, d.root, **{"skip_bad": d.skip_bad, **d.options})
    train, val = split_validation(splits.train, d.val_fraction, cfg.train.seed)
    test = splits.test
    if d.verify_images:
        train = check_records(train, skip_bad=d.skip_bad, progress=progress, split="train")
        test = check_records(test, skip_bad=d.skip_bad, progress=progress, split="test")
        if val is not None:
            val = check_records(val, skip_bad=d.skip_bad, progress=progress, split="validation")
    return RunData(train=train, val=val, test=test)
