"""Helpers shared by the dataset loaders: root checks, index-file parsing, splits, records."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from gce.data.records import DatasetSplits, ImageRecords
from gce.errors import ConfigError, DatasetError

#: How many offending lines an error message lists before summarising the rest.
MAX_LISTED = 5


#: A class key: a benchmark's numeric class id or a class name (both sort, for label order).
K = TypeVar("K", int, str)


@dataclass(frozen=True)
class Entry(Generic[K]):
    """One image listed by an index: its path, class key, and where it was listed."""

    path: str
    key: K
    where: str  # "images.txt, line 7" — used in error messages


def check_root(root: str | os.PathLike, dataset: str, *, allow_file: bool = False) -> Path:
    """Return ``root`` as a Path after checking it exists, is a folder and can be read."""
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.exists():
        raise DatasetError(f"{dataset}: dataset root {path} does not exist")
    if not allow_file and not path.is_dir():
        raise DatasetError(f"{dataset}: dataset root {path} is a file, not a folder")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise DatasetError(f"{dataset}: cannot read dataset root {path} (permission denied)")
    return path


def require_file(path: Path, dataset: str, layout_hint: str) -> Path:
    """Fail with a layout hint when an index file the loader needs is absent."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: {path} not found; {layout_hint}")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"{dataset}: cannot read {path} (permission denied)")
    return path


def read_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 text index file (a clear error for binary or unreadable files)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from err


def table_rows(
    path: Path, ncols: int, *, skip: int = 0, lines: list[str] | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for whitespace-separated rows with exactly ``ncols`` fields.

    Blank lines are skipped; the first ``skip`` lines (headers) are not yielded. Line numbers are
    1-based, as an editor shows them.
    """
    lines = read_lines(path) if lines is None else lines
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != ncols:
            raise DatasetError(
                f"{path}, line {number}: expected {ncols} columns, found {len(fields)} ({line.strip()!r})"
            )
        yield number, fields


def where(path: Path, line: int) -> str:
    """``file, line N`` for error messages (file name only: the root is named elsewhere)."""
    return f"{path}, line {line}"


def parse_int(value: str, location: str, what: str) -> int:
    """``int(value)`` or a DatasetError naming the location and the field."""
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{location}: {what} must be an integer, found {value!r}") from None


def drop_missing(entries: list[Entry], dataset: str, skip_bad: bool) -> list[Entry]:
    """Check every listed image exists; fail (or, with ``skip_bad``, warn and drop) otherwise.

    Only ``os.path.exists`` is used here: decoding every image is :func:`check_records`'s job.
    """
    missing = [e for e in entries if not os.path.exists(e.path)]
    if not missing:
        return entries
    if not skip_bad:
        lines = [
            (f"{dataset}: {len(missing)} of {len(entries)} listed images not found (set skip_bad to leave them out):")
        ]
        lines += [f"  {e.where}: {e.path} (file not found)" for e in missing[:MAX_LISTED]]
        if len(missing) > MAX_LISTED:
            lines.append(f"  ... and {len(missing) - MAX_LISTED} more")
        raise DatasetError("\n".join(lines))
    warnings.warn(
        f"{dataset}: skipped {len(missing)} listed images that do not exist"
        f" (first: {missing[0].where}: {missing[0].path})",
        stacklevel=3,
    )
    gone = {id(e) for e in missing}
    return [e for e in entries if id(e) not in gone]


def records_from_entries(
    entries: Sequence[Entry[K]],
    class_name: Callable[[K], str] = str,
    /,
    *,
    is_query: np.ndarray | None = None,
    is_gallery: np.ndarray | None = None,
) -> ImageRecords:
    """Records with labels ``0..C-1`` assigned in sorted class-key order.

    Sorting by the key (e.g. the numeric class id) rather than the display name keeps label order
    equal to the benchmark's own class order.
    """
    keys = sorted({e.key for e in entries})
    label_of = {k: i for i, k in enumerate(keys)}
    return ImageRecords(
        paths=[e.path for e in entries],
        labels=np.array([label_of[e.key] for e in entries], dtype=np.int64),
        class_names=[class_name(k) for k in keys],
        is_query=is_query,
        is_gallery=is_gallery,
    )


def check_fraction(test_fraction: float) -> float:
    """Validate the ``test_fraction`` option of the folder and CSV loaders."""
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    return float(test_fraction)


def split_classes(keys: Iterable[Hashable], test_fraction: float, seed: int, dataset: str) -> set:
    """Seeded, class-disjoint choice of test classes: ``round(C * test_fraction)``, at least 1.

    The classes are sorted before shuffling, so the split depends only on the class names, the
    fraction and the seed, not on file-system listing order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(
            f"bad value for 'data.options.seed': a seed must be an integer from 0 to 2**32-1 (got {seed!r})"
        )
    classes = sorted(set(keys), key=str)
    if len(classes) < 2:
        raise DatasetError(
            f"{dataset}: found {len(classes)} class(es); a class-disjoint train/test split needs at least 2"
        )
    n_test = min(max(round(len(classes) * test_fraction), 1), len(classes) - 1)
    order = np.random.default_rng(seed).permutation(len(classes))
    return {classes[i] for i in order[:n_test]}


def make_splits(name: str, train: ImageRecords, test: ImageRecords, *, strict_disjoint: bool) -> DatasetSplits:
    """Assemble the splits after the checks every loader shares.

    Empty splits are errors. Classes shared by train and test are an error for official benchmark
    lists (they are class-disjoint by definition, so an overlap means a damaged file) and a warning
    for user-defined splits. Single-image training classes are kept but counted in a warning.
    """
    for split, records in (("train", train), ("test", test)):
        if len(records) == 0:
            raise DatasetError(f"{name}: the {split} split has no images")
    shared = sorted(set(train.class_names) & set(test.class_names))
    text = f"{name}: {len(shared)} classes appear in both train and test (e.g. {', '.join(shared[:3])})"
    if shared and strict_disjoint:
        raise DatasetError(text + "; the official split is class-disjoint")
    check_one_file_one_image(name, train, test)
    if shared:
        warnings.warn(text + "; test results then measure classes seen in training", stacklevel=3)
    warn_lone_classes(name, train)
    return DatasetSplits(name=name, train=train, test=test)


def file_identity(path: str) -> tuple:
    """What makes two paths the same image: the inode (links, hard links, ``./`` and ``..`` paths
    all resolve to it), or the real path of a file that cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return (st.st_dev, st.st_ino)


def check_one_file_one_image(name: str, train: ImageRecords, test: ImageRecords) -> None:
    """One file is one image of one class in one split; anything else is an error.

    A file in both splits leaks test images into training; in two classes it is a label
    contradiction; twice in one class it is its own nearest neighbour and inflates Recall@K.
    Files are compared by :func:`file_identity`, so a symlink or hard link to a listed file counts.
    """
    first: dict[tuple, tuple[str, str, str]] = {}
    kinds: dict[str, list[tuple[tuple[str, str, str], tuple[str, str, str]]]] = {
        "in both train and test": [],
        "in two classes": [],
        "listed twice": [],
    }
    for split, records in (("train", train), ("test", test)):
        for path, label in zip(records.paths, records.labels, strict=True):
            here = (split, records.class_names[label], path)
            seen = first.setdefault(file_identity(path), here)
            if seen is here:
                continue
            kind = (
                "in both train and test"
                if seen[0] != split
                else "in two classes"
                if seen[1] != here[1]
                else "listed twice"
            )
            kinds[kind].append((seen, here))
    found = {kind: pairs for kind, pairs in kinds.items() if pairs}
    if not found:
        return
    counts = ", ".join(f"{len(pairs)} {kind}" for kind, pairs in found.items())
    (s1, c1, p1), (s2, c2, p2) = next(iter(found.values()))[0]
    raise DatasetError(
        f"{name}: the same image file appears more than once ({counts}); e.g. {p2} ({s2}, class"
        f" {c2}) is the same file as {p1} ({s1}, class {c1}); one file must be one image of one"
        f" class in one split"
    )


def warn_lone_classes(name: str, train: ImageRecords) -> None:
    """Warn about training classes with one image: they can never form a positive pair."""
    counts = np.bincount(train.labels, minlength=train.num_classes)
    lone = int((counts == 1).sum())
    if lone:
        warnings.warn(
            f"{name}: {lone} of {train.num_classes} training classes have a single image;"
            f" they are kept but cannot form positive pairs",
            stacklevel=4,
        )
