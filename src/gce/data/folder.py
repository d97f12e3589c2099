"""A folder per class (``root/<class>/<image>``), split by class with a seed or by train/test folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from gce.data._common import (
    Entry,
    check_fraction,
    check_root,
    make_splits,
    records_from_entries,
    split_classes,
)
from gce.data.images import IMAGE_EXTENSIONS, is_image_file
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "folder"


def load_folder(
    root: str | os.PathLike,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    skip_bad: bool = False,
) -> DatasetSplits:
    """Load ``root/<class>/<image>`` (images in sub-folders of a class folder count too).

    If ``root/train`` and ``root/test`` both exist, they hold the class folders of each split.
    Otherwise ``round(test_fraction * classes)`` classes, drawn with ``seed``, form the test split.
    Hidden files and folders are ignored; so are files without an image extension (counted in a
    warning). A class folder without images is an error unless ``skip_bad``, which drops it.
    """
    root = check_root(root, NAME)
    test_fraction = check_fraction(test_fraction)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = records_from_entries(scan_class_folders(root / "train", skip_bad))
        test = records_from_entries(scan_class_folders(root / "test", skip_bad))
        return make_splits(NAME, train, test, strict_disjoint=False)
    entries = scan_class_folders(root, skip_bad)
    test_classes = split_classes((e.key for e in entries), test_fraction, seed, f"{NAME} {root}")
    train = records_from_entries([e for e in entries if e.key not in test_classes])
    test = records_from_entries([e for e in entries if e.key in test_classes])
    return make_splits(NAME, train, test, strict_disjoint=True)


def scan_class_folders(root: Path, skip_bad: bool) -> list[Entry]:
    """One entry per image under ``root/<class>/``, in sorted order; the class is the folder name."""
    class_dirs = [p for p in sorted(root.iterdir(), key=lambda p: p.name)
                  if p.is_dir() and not _hidden(p.name)]
    if not class_dirs:
        raise DatasetError(f"{NAME}: {root} has no class folders; expected {root}/<class>/<image>")
    entries: list[Entry] = []
    ignored = sum(1 for p in root.iterdir() if p.is_file() and not _hidden(p.name))
    empty: list[Path] = []
    for class_dir in class_dirs:
        images, skipped = _images_under(class_dir)
        ignored += skipped
        if not images:
            empty.append(class_dir)
        entries += [Entry(path, class_dir.name, str(class_dir)) for path in images]
    _report_empty(empty, skip_bad)
    if ignored:
        warnings.warn(
            f"{NAME}: ignored {ignored} files under {root} that are not images in a class folder"
            f" (image extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})",
            stacklevel=3,
        )
    return entries


def _images_under(class_dir: Path) -> tuple[list[str], int]:
    """Image files anywhere below ``class_dir`` (sorted) and the count of other files."""
    images: list[str] = []
    other = 0
    seen: set[str] = set()
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop would otherwise never end
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if _hidden(name):
                continue
            if is_image_file(name):
                images.append(os.path.join(folder, name))
            else:
                other += 1
    return images, other


def _report_empty(empty: list[Path], skip_bad: bool) -> None:
    if not empty:
        return
    names = ", ".join(str(p) for p in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if not skip_bad:
        raise DatasetError(f"{NAME}: {len(empty)} class folders contain no images: {names}"
                           f" (remove them, or set skip_bad to leave them out)")
    warnings.warn(f"{NAME}: skipped {len(empty)} class folders without images: {names}", stacklevel=4)


def _hidden(name: str) -> bool:
    return name.startswith(".")
