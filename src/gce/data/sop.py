"""Stanford Online Products from the official ``Ebay_train.txt`` / ``Ebay_test.txt`` lists."""

from __future__ import annotations

import os
from pathlib import Path

from gce.data._common import (
    Entry,
    check_root,
    drop_missing,
    make_splits,
    parse_int,
    read_lines,
    records_from_entries,
    require_file,
    table_rows,
    where,
)
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "sop"
HEADER = ["image_id", "class_id", "super_class_id", "path"]
_LAYOUT = "expected Ebay_train.txt and Ebay_test.txt with image paths relative to the root"


def load_sop(root: str | os.PathLike, *, skip_bad: bool = False) -> DatasetSplits:
    """Load SOP from ``root`` (``Stanford_Online_Products`` or the folder holding it).

    Train and test are the official lists (11,318 / 11,316 products). A class is named
    ``<super-class folder>/<class id>``, e.g. ``bicycle_final/1``.
    ``skip_bad`` leaves out listed images that do not exist instead of failing.
    """
    root = _find_root(check_root(root, NAME))
    names: dict[int, str] = {}
    splits = []
    for file_name in ("Ebay_train.txt", "Ebay_test.txt"):
        entries = _read_list(require_file(root / file_name, NAME, _LAYOUT), root, names)
        entries = drop_missing(entries, NAME, skip_bad)
        splits.append(records_from_entries(entries, names.__getitem__))
    return make_splits(NAME, splits[0], splits[1], strict_disjoint=True)


def _find_root(root: Path) -> Path:
    nested = root / "Stanford_Online_Products"
    if not (root / "Ebay_train.txt").exists() and (nested / "Ebay_train.txt").exists():
        return nested
    return root


def _read_list(path: Path, root: Path, names: dict[int, str]) -> list[Entry]:
    """Rows ``image_id class_id super_class_id path`` after the header; fills ``names``."""
    lines = read_lines(path)
    header = lines[0].split() if lines else []
    if header != HEADER:
        raise DatasetError(f"{where(path, 1)}: expected the header {' '.join(HEADER)!r}, found {' '.join(header)!r}")
    entries = []
    for line, (image_id, class_id, super_id, relative) in table_rows(path, 4, skip=1, lines=lines):
        location = where(path, line)
        parse_int(image_id, location, "image_id")
        parse_int(super_id, location, "super_class_id")
        key = parse_int(class_id, location, "class_id")
        names.setdefault(key, f"{Path(relative).parent.as_posix()}/{key}")
        entries.append(Entry(str(root / relative), key, location))
    return entries
