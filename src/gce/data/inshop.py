"""In-Shop Clothes Retrieval from ``list_eval_partition.txt``; query set against gallery set."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from gce.data._common import (
    Entry,
    check_root,
    drop_missing,
    make_splits,
    parse_int,
    read_lines,
    records_from_entries,
    table_rows,
    where,
)
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "inshop"
PARTITION_FILE = "list_eval_partition.txt"
HEADER = ["image_name", "item_id", "evaluation_status"]
STATUSES = ("train", "query", "gallery")


def load_inshop(root: str | os.PathLike, *, skip_bad: bool = False) -> DatasetSplits:
    """Load In-Shop from ``root``.

    ``root`` holds ``list_eval_partition.txt`` and the ``img/`` tree its image names point into;
    the release's own layout (``Eval/list_eval_partition.txt`` next to ``Img/img/``) also works.
    Train is every ``train`` row; test is the ``query`` and ``gallery`` rows with ``is_query`` /
    ``is_gallery`` masks. An item has one label for all its test images, so queries find their
    gallery matches. ``skip_bad`` leaves out listed images that do not exist instead of failing.
    """
    root = check_root(root, NAME)
    partition, image_root = _locate(root)
    rows = _read_partition(partition, image_root)
    entries = drop_missing([entry for entry, _ in rows], NAME, skip_bad)
    status = {id(entry): s for entry, s in rows}

    train = records_from_entries([e for e in entries if status[id(e)] == "train"])
    test_entries = [e for e in entries if status[id(e)] != "train"]
    test = records_from_entries(
        test_entries,
        is_query=np.array([status[id(e)] == "query" for e in test_entries], dtype=bool),
        is_gallery=np.array([status[id(e)] == "gallery" for e in test_entries], dtype=bool),
    )
    _check_queries(test, partition)
    return make_splits(NAME, train, test, strict_disjoint=True)


def _locate(root: Path) -> tuple[Path, Path]:
    """Find the partition file and the folder its image names are relative to."""
    for partition, image_root in ((root / PARTITION_FILE, root), (root / "Eval" / PARTITION_FILE, root / "Img")):
        if partition.is_file():
            return partition, image_root
    raise DatasetError(
        f"{NAME}: {root / PARTITION_FILE} not found; expected list_eval_partition.txt"
        f" and the img/ folder (or the release's Eval/ and Img/ folders) in {root}"
    )


def _read_partition(path: Path, image_root: Path) -> list[tuple[Entry, str]]:
    """Parse the count line, the header and the ``image_name item_id evaluation_status`` rows."""
    lines = read_lines(path)
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected a count line and a header line, found {len(lines)} lines")
    declared = parse_int(lines[0].strip(), where(path, 1), "the image count")
    if lines[1].split() != HEADER:
        raise DatasetError(f"{where(path, 2)}: expected the header {' '.join(HEADER)!r}, found {lines[1].strip()!r}")
    rows = []
    for line, (name, item_id, status) in table_rows(path, 3, skip=2, lines=lines):
        if status not in STATUSES:
            raise DatasetError(
                f"{where(path, line)}: evaluation_status must be one of {', '.join(STATUSES)}, found {status!r}"
            )
        rows.append((Entry(str(image_root / name), item_id, where(path, line)), status))
    if declared != len(rows):
        raise DatasetError(f"{where(path, 1)}: declares {declared} images but lists {len(rows)}")
    return rows


def _check_queries(test, partition: Path) -> None:
    """Warn about queries whose item has no gallery image: they can never be retrieved."""
    if not test.is_query.any() or not test.is_gallery.any():
        missing = "query" if not test.is_query.any() else "gallery"
        raise DatasetError(f"{NAME}: {partition} lists no {missing} images")
    gallery_labels = set(test.labels[test.is_gallery].tolist())
    orphans = sum(1 for label in test.labels[test.is_query] if label not in gallery_labels)
    if orphans:
        warnings.warn(f"{NAME}: {orphans} query images have no gallery image of the same item", stacklevel=3)
