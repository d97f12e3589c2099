"""CUB-200-2011 in its official layout; classes 1-100 train, 101-200 test."""

from __future__ import annotations

import os
from pathlib import Path

from gce.data._common import (
    Entry,
    check_root,
    drop_missing,
    make_splits,
    parse_int,
    records_from_entries,
    require_file,
    table_rows,
    where,
)
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "cub"
NUM_CLASSES = 200
NUM_TRAIN_CLASSES = 100
_LAYOUT = "expected the official CUB_200_2011 layout: images.txt, image_class_labels.txt, classes.txt, images/"


def load_cub(root: str | os.PathLike, *, skip_bad: bool = False) -> DatasetSplits:
    """Load CUB-200-2011 from ``root`` (the ``CUB_200_2011`` folder or the folder holding it).

    The split is the deep-metric-learning one: classes 1-100 train, 101-200 test
    (``train_test_split.txt`` is a per-image classification split and is not used).
    ``skip_bad`` leaves out listed images that do not exist instead of failing.
    """
    root = _find_root(check_root(root, NAME))
    class_names = _read_classes(root / "classes.txt")
    paths = _read_images(root / "images.txt", root / "images")
    labels = _read_labels(root / "image_class_labels.txt", class_names)

    entries = []
    for image_id, (path, line) in paths.items():
        if image_id not in labels:
            raise DatasetError(
                f"{where(root / 'images.txt', line)}: image id {image_id} has no class"
                f" in {root / 'image_class_labels.txt'}"
            )
        entries.append(Entry(path, labels[image_id], where(root / "images.txt", line)))
    entries = drop_missing(entries, NAME, skip_bad)

    name_of = class_names.__getitem__
    train = records_from_entries([e for e in entries if e.key <= NUM_TRAIN_CLASSES], name_of)
    test = records_from_entries([e for e in entries if e.key > NUM_TRAIN_CLASSES], name_of)
    return make_splits(NAME, train, test, strict_disjoint=True)


def _find_root(root: Path) -> Path:
    """Accept the dataset folder itself or its parent (the archive extracts to CUB_200_2011/)."""
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        return root / "CUB_200_2011"
    return root


def _read_classes(path: Path) -> dict[int, str]:
    """``classes.txt``: ``<class id> <NNN.Name>`` -> {class id: "NNN.Name"}."""
    require_file(path, NAME, _LAYOUT)
    names: dict[int, str] = {}
    for line, (raw_id, name) in table_rows(path, 2):
        class_id = parse_int(raw_id, where(path, line), "class id")
        if not 1 <= class_id <= NUM_CLASSES:
            raise DatasetError(f"{where(path, line)}: class id {class_id} is outside 1-{NUM_CLASSES}")
        if class_id in names:
            raise DatasetError(f"{where(path, line)}: class id {class_id} is listed twice")
        names[class_id] = name
    return names


def _read_images(path: Path, image_dir: Path) -> dict[int, tuple[str, int]]:
    """``images.txt``: ``<image id> <relative path>`` -> {image id: (full path, line number)}."""
    require_file(path, NAME, _LAYOUT)
    images: dict[int, tuple[str, int]] = {}
    for line, (raw_id, relative) in table_rows(path, 2):
        image_id = parse_int(raw_id, where(path, line), "image id")
        if image_id in images:
            raise DatasetError(f"{where(path, line)}: image id {image_id} is listed twice")
        images[image_id] = (str(image_dir / relative), line)
    return images


def _read_labels(path: Path, class_names: dict[int, str]) -> dict[int, int]:
    """``image_class_labels.txt``: ``<image id> <class id>`` -> {image id: class id}."""
    require_file(path, NAME, _LAYOUT)
    labels: dict[int, int] = {}
    for line, (raw_image, raw_class) in table_rows(path, 2):
        image_id = parse_int(raw_image, where(path, line), "image id")
        class_id = parse_int(raw_class, where(path, line), "class id")
        if class_id not in class_names:
            raise DatasetError(f"{where(path, line)}: class id {class_id} is not in classes.txt")
        if image_id in labels:
            raise DatasetError(f"{where(path, line)}: image id {image_id} is listed twice")
        labels[image_id] = class_id
    return labels
