"""A folder per class (``root/<class>/<image>``), split by class with a seed or by train/test folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from gce.data._common import (
    Entry,
    check_fraction,
    check_root,
    file_identity,
    make_splits,
    records_from_entries,
    split_classes,
)
from gce.data.images import IMAGE_EXTENSIONS, is_image_file
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "folder"


#: Folder names of a pre-split layout (compared lower-cased): the training split, and the
#: evaluation split in order of preference.
TRAIN_NAMES = ("train", "training")
EVAL_NAMES = ("test", "testing", "val", "valid", "validation")


def load_folder(
    root: str | os.PathLike,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    skip_bad: bool = False,
) -> DatasetSplits:
    """Load ``root/<class>/<image>`` (images in sub-folders of a class folder count too).

    Pre-split layouts are read as splits: ``root/train`` with ``root/test`` (or, without a test
    folder, ``root/val`` / ``root/validation``, said in a warning) hold the class folders of each
    split. Split folders beside class folders, or a lone ``train``/``test``/``val`` folder among
    class folders, are refused: they would otherwise be read as classes named "train" and "val".
    Otherwise ``round(test_fraction * classes)`` classes, drawn with ``seed``, form the test split.

    Hidden files and folders are ignored; so are files without an image extension (counted in a
    warning). Links are followed, each real folder once (a link back to the root or into another
    class is not followed, and is counted in a warning); a file reached twice in one class (a
    link) is listed once, counted in a warning; one file in two classes or two splits is an error.
    A class folder without images is an error unless ``skip_bad``, which drops it.
    """
    root = check_root(root, NAME)
    test_fraction = check_fraction(test_fraction)
    layout = _pre_split_layout(root)
    if layout is not None:
        train_dir, test_dir = layout
        visited = _class_dir_reals(root, train_dir, test_dir)
        train = records_from_entries(scan_class_folders(train_dir, skip_bad, visited))
        test = records_from_entries(scan_class_folders(test_dir, skip_bad, visited))
        return make_splits(NAME, train, test, strict_disjoint=False)
    entries = scan_class_folders(root, skip_bad, _class_dir_reals(root))
    test_classes = split_classes((e.key for e in entries), test_fraction, seed, f"{NAME} {root}")
    train = records_from_entries([e for e in entries if e.key not in test_classes])
    test = records_from_entries([e for e in entries if e.key in test_classes])
    return make_splits(NAME, train, test, strict_disjoint=True)


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.is_dir() and not _hidden(p.name)]


def _pre_split_layout(root: Path) -> tuple[Path, Path] | None:
    """``(train folder, evaluation folder)`` of a pre-split root, ``None`` for a class-folder root;
    a DatasetError for a mix of the two."""
    folders = _subfolders(root)
    by_name = {p.name.lower(): p for p in folders}
    retrieval = [by_name[n] for n in ("query", "gallery") if n in by_name]
    if retrieval:  # re-identification layouts: which images are queries is not a folder's to say
        raise DatasetError(
            f"{NAME}: {retrieval[0]} looks like a query/gallery split, not a class; describe a"
            f" query-against-gallery test set with a CSV index (dataset csv, columns"
            f" path,label,split,is_query,is_gallery)"
        )
    train = next((by_name[n] for n in TRAIN_NAMES if n in by_name), None)
    evals = [by_name[n] for n in EVAL_NAMES if n in by_name]
    split_like = [p for p in folders if p.name.lower() in TRAIN_NAMES + EVAL_NAMES]
    if train is None or not evals:
        if split_like and len(folders) > len(split_like):
            raise DatasetError(
                f"{NAME}: {split_like[0]} looks like a split folder, not a class, but {root} has no"
                f" {'train' if train is None else 'test'} folder beside it; a pre-split layout is"
                f" {root}/train/<class>/ and {root}/test/<class>/, otherwise rename that class folder"
            )
        if split_like:  # only split folders (e.g. train/ alone): not a class-folder root either
            raise DatasetError(
                f"{NAME}: {root} holds only {', '.join(p.name + '/' for p in split_like)};"
                f" a pre-split layout needs both {root}/train and {root}/test (or val)"
            )
        return None
    others = [p for p in folders if p not in split_like]
    if others:
        names = ", ".join(p.name for p in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise DatasetError(
            f"{NAME}: {root} holds split folders ({train.name}/, {evals[0].name}/) beside other"
            f" folders ({names}); move those into a split folder or remove them"
        )
    chosen = evals[0]
    unused = [p.name + "/" for p in evals[1:]]
    if chosen.name.lower() not in ("test", "testing") or unused:
        extra = f"; {', '.join(unused)} not used (validation classes come from data.val_fraction)" if unused else ""
        warnings.warn(f"{NAME}: reading {train} as the train split and {chosen} as the test split{extra}", stacklevel=3)
    return train, chosen


def _class_dir_reals(*roots: Path) -> set[str]:
    """Real paths of the roots and of every folder inside a class folder (links not followed): a
    link into one of them is never walked as part of another class (a ``loop -> ..`` link would
    otherwise pull in every class), whatever the order the classes are scanned in."""
    reals = {os.path.realpath(r) for r in roots}
    for r in roots:
        for class_dir in _subfolders(r):
            reals |= {os.path.realpath(folder) for folder, _, _ in os.walk(class_dir)}
    return reals


def scan_class_folders(root: Path, skip_bad: bool, visited: set[str] | None = None) -> list[Entry]:
    """One entry per image under ``root/<class>/``, in sorted order; the class is the folder name.

    ``visited``: real paths of folders not to walk into through links (see :func:`load_folder`).
    """
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise DatasetError(f"{NAME}: {root} has no class folders; expected {root}/<class>/<image>")
    visited = set(visited or ()) | {os.path.realpath(root)}
    owner: dict[str, Path] = {}
    for class_dir in class_dirs:  # two class folders that are one folder (a link to a class)
        real = os.path.realpath(class_dir)
        if real in owner:
            raise DatasetError(
                f"{NAME}: class folders {owner[real]} and {class_dir} are the same folder"
                f" (a link); one folder must be one class"
            )
        owner[real] = class_dir
    entries: list[Entry] = []
    ignored = sum(1 for p in root.iterdir() if p.is_file() and not _hidden(p.name))
    empty: list[Path] = []
    skipped_links: list[str] = []
    duplicates: list[str] = []
    for class_dir in class_dirs:
        images, skipped = _images_under(class_dir, visited, skipped_links, duplicates)
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
    if skipped_links:
        warnings.warn(
            f"{NAME}: did not follow {len(skipped_links)} links to folders that are scanned already"
            f" (a loop, or a link to the root or another class; e.g. {skipped_links[0]})",
            stacklevel=3,
        )
    if duplicates:
        warnings.warn(
            f"{NAME}: listed {len(duplicates)} files once that a class folder reaches twice (links;"
            f" e.g. {duplicates[0]})",
            stacklevel=3,
        )
    return entries


def _images_under(
    class_dir: Path, visited: set[str], skipped_links: list[str], duplicates: list[str]
) -> tuple[list[str], int]:
    """Image files anywhere below ``class_dir`` (sorted) and the count of other files.

    Each real folder is walked once over the whole scan (``visited`` is shared); a file reached
    twice within the class (by a link) is listed once and recorded in ``duplicates``.
    """
    images: list[str] = []
    other = 0
    files_seen: set[tuple] = set()
    top = os.path.realpath(class_dir)
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        kept = []
        for d in sorted(d for d in dirs if not _hidden(d)):
            path = os.path.join(folder, d)
            real = os.path.realpath(path)
            if os.path.islink(path) and (real in visited or real == top):
                skipped_links.append(path)
                continue
            visited.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if _hidden(name):
                continue
            if is_image_file(name):
                path = os.path.join(folder, name)
                identity = file_identity(path)
                if identity in files_seen:
                    duplicates.append(path)
                    continue
                files_seen.add(identity)
                images.append(path)
            else:
                other += 1
    return images, other


def _report_empty(empty: list[Path], skip_bad: bool) -> None:
    if not empty:
        return
    names = ", ".join(str(p) for p in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if not skip_bad:
        raise DatasetError(
            f"{NAME}: {len(empty)} class folders contain no images: {names}"
            f" (remove them, or set skip_bad to leave them out)"
        )
    warnings.warn(f"{NAME}: skipped {len(empty)} class folders without images: {names}", stacklevel=4)


def _hidden(name: str) -> bool:
    return name.startswith(".")
