"""A CSV index: ``path,label`` plus optional ``split``, ``is_query`` and ``is_gallery`` columns."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gce.data._common import (
    Entry,
    check_fraction,
    check_root,
    drop_missing,
    file_identity,
    make_splits,
    records_from_entries,
    split_classes,
)
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "csv"
DEFAULT_FILE = "labels.csv"
REQUIRED = ("path", "label")
SPLITS = ("train", "test")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


@dataclass(frozen=True)
class _Row:
    entry: Entry
    split: str | None
    is_query: bool | None
    is_gallery: bool | None


def load_csv(
    root: str | os.PathLike,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    skip_bad: bool = False,
) -> DatasetSplits:
    """Load the images listed in a CSV file (``root`` is the file, or a folder with ``labels.csv``).

    Relative paths are resolved against the CSV's folder. With a ``split`` column (``train`` /
    ``test``) the split is given; without it ``round(test_fraction * classes)`` classes drawn with
    ``seed`` form the test split. ``is_query`` / ``is_gallery`` (0/1/true/false) mark the test
    images for query-against-gallery evaluation; a blank cell, or a missing one of the two columns,
    means true.
    Unknown columns are ignored. ``skip_bad`` leaves out listed images that do not exist.
    """
    path = _csv_path(check_root(root, NAME, allow_file=True), NAME)
    return splits_from_csv(path, NAME, test_fraction=test_fraction, seed=seed, skip_bad=skip_bad)


def splits_from_csv(
    path: Path, name: str, *, test_fraction: float = 0.5, seed: int = 0, skip_bad: bool = False
) -> DatasetSplits:
    """Read the CSV file ``path`` into splits named ``name`` (see :func:`load_csv`)."""
    rows, columns = _read_rows(path)
    rows = _drop_missing_rows(rows, name, skip_bad)
    _refuse_duplicate_rows(rows, path)

    if "split" in columns:
        train_rows = [r for r in rows if r.split == "train"]
        test_rows = [r for r in rows if r.split == "test"]
    else:
        test_classes = split_classes((r.entry.key for r in rows), check_fraction(test_fraction), seed, f"{name} {path}")
        train_rows = [r for r in rows if r.entry.key not in test_classes]
        test_rows = [r for r in rows if r.entry.key in test_classes]

    train = records_from_entries([r.entry for r in train_rows])
    test = records_from_entries([r.entry for r in test_rows], **_masks(test_rows, columns, path))
    return make_splits(name, train, test, strict_disjoint="split" not in columns)


def _csv_path(root: Path, name: str) -> Path:
    if root.is_file():
        return root
    path = root / DEFAULT_FILE
    if not path.is_file():
        raise DatasetError(f"{name}: {path} not found; pass the CSV file itself or a folder holding {DEFAULT_FILE}")
    return path


def _read_rows(path: Path) -> tuple[list[_Row], set[str]]:
    """Parse and validate every row; errors name the file and the line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate Excel's BOM
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            columns = _check_header(header, path)
            rows = [
                _parse_row(values, header, columns, path, reader.line_num)
                for values in reader
                if any(v.strip() for v in values)
            ]
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise DatasetError(f"{path}: malformed CSV ({err})") from err
    return rows, columns


def _check_header(header: list[str], path: Path) -> set[str]:
    if not header:
        raise DatasetError(f"{path}: the file is empty; expected a header with columns path,label")
    for column in REQUIRED:
        if column not in header:
            raise DatasetError(f"{path}, line 1: missing required column {column!r} (found: {','.join(header)})")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DatasetError(f"{path}, line 1: duplicated column {duplicated[0]!r}")
    return set(header)


def _parse_row(values: list[str], header: list[str], columns: set[str], path: Path, line: int) -> _Row:
    location = f"{path}, line {line}"
    if len(values) != len(header):
        raise DatasetError(f"{location}: expected {len(header)} columns, found {len(values)}")
    fields = {h: v.strip() for h, v in zip(header, values, strict=True)}
    for column in REQUIRED:
        if not fields[column]:
            raise DatasetError(f"{location}: empty {column!r}")
    split = fields.get("split")
    if split is not None:
        split = split.lower()
        if split not in SPLITS:
            raise DatasetError(f"{location}: split must be train or test, found {fields['split']!r}")
    image = fields["path"]
    full = image if os.path.isabs(image) else str(path.parent / image)
    return _Row(
        entry=Entry(full, fields["label"], location),
        split=split,
        is_query=_flag(fields, "is_query", location),
        is_gallery=_flag(fields, "is_gallery", location),
    )


def _flag(fields: dict[str, str], column: str, location: str) -> bool | None:
    value = fields.get(column, "").lower()
    if not value:  # absent or blank (e.g. on train rows): the default, see _masks
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DatasetError(f"{location}: {column} must be 0/1/true/false, found {fields[column]!r}")


def _drop_missing_rows(rows: list[_Row], name: str, skip_bad: bool) -> list[_Row]:
    kept = {id(e) for e in drop_missing([r.entry for r in rows], name, skip_bad)}
    return [r for r in rows if id(r.entry) in kept]


def _refuse_duplicate_rows(rows: list[_Row], path: Path) -> None:
    """One image listed on two rows is an error naming both lines: evaluated twice it is its own
    nearest neighbour (Recall@1 of a doubled test set is 100%); in two classes it contradicts itself."""
    first: dict[tuple, _Row] = {}
    repeats: list[tuple[_Row, _Row]] = []
    for row in rows:
        seen = first.setdefault(file_identity(row.entry.path), row)
        if seen is not row:
            repeats.append((seen, row))
    if repeats:
        seen, row = repeats[0]
        raise DatasetError(
            f"{row.entry.where}: {row.entry.path} is listed again (first at"
            f" {seen.entry.where.rsplit(', ', 1)[-1]}); {len(repeats)} rows of {path} repeat an"
            f" image listed earlier; list every image once"
        )


def _masks(test_rows: list[_Row], columns: set[str], path: Path) -> dict[str, np.ndarray]:
    """``is_query`` / ``is_gallery`` for the test split, or nothing (leave-one-out retrieval)."""
    if "is_query" not in columns and "is_gallery" not in columns:
        return {}
    n = len(test_rows)
    is_query = np.array([r.is_query is not False for r in test_rows], dtype=bool)
    is_gallery = np.array([r.is_gallery is not False for r in test_rows], dtype=bool)
    if n and not is_query.any():
        raise DatasetError(f"{path}: no test image is marked is_query")
    if n and not is_gallery.any():
        raise DatasetError(f"{path}: no test image is marked is_gallery")
    return {"is_query": is_query, "is_gallery": is_gallery}
