"""Stanford Cars (Cars196) from ``cars_annos.mat``; classes 1-98 train, 99-196 test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from gce.data._common import (
    Entry,
    check_root,
    drop_missing,
    make_splits,
    records_from_entries,
    require_file,
)
from gce.data.records import DatasetSplits
from gce.errors import DatasetError

NAME = "cars196"
NUM_CLASSES = 196
NUM_TRAIN_CLASSES = 98
ANNOTATION_FILE = "cars_annos.mat"
_LAYOUT = "expected cars_annos.mat next to the car_ims/ folder (the 'all images' Stanford Cars release)"


def load_cars196(root: str | os.PathLike, *, skip_bad: bool = False) -> DatasetSplits:
    """Load Cars196 from ``root`` holding ``cars_annos.mat`` and ``car_ims/``.

    The split is the deep-metric-learning one: classes 1-98 train, 99-196 test (the ``test`` flag
    of each annotation is a classification split and is ignored). Bounding boxes are not used.
    ``skip_bad`` leaves out listed images that do not exist instead of failing.
    """
    root = check_root(root, NAME)
    mat_path = require_file(root / ANNOTATION_FILE, NAME, _LAYOUT)
    mat = _load_mat(mat_path)
    class_names = _class_names(mat, mat_path)
    entries = _entries(mat, mat_path, root, len(class_names))
    entries = drop_missing(entries, NAME, skip_bad)

    def name_of(class_id: int) -> str:
        return class_names[class_id - 1]

    train = records_from_entries([e for e in entries if e.key <= NUM_TRAIN_CLASSES], name_of)
    test = records_from_entries([e for e in entries if e.key > NUM_TRAIN_CLASSES], name_of)
    return make_splits(NAME, train, test, strict_disjoint=True)


def _load_mat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises ValueError/TypeError/OSError for damaged files
        raise DatasetError(f"{path}: cannot read MATLAB file ({err})") from err


def _field(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise DatasetError(f"{path}: no variable {key!r} (found: {', '.join(_variables(mat))})")
    return np.asarray(mat[key])


def _variables(mat: dict) -> list[str]:
    return sorted(k for k in mat if not k.startswith("__"))


def _scalar(value: object) -> Any:
    """MATLAB cells and structs nest every value in 1x1 arrays; unwrap to a Python scalar."""
    array = np.asarray(value)
    while array.dtype == object and array.size == 1:
        array = np.asarray(array.reshape(-1)[0])
    if array.size != 1:
        raise ValueError(f"expected one value, found an array of shape {array.shape}")
    item = array.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item


def _class_names(mat: dict, path: Path) -> list[str]:
    names = _field(mat, "class_names", path).reshape(-1)
    try:
        return [str(_scalar(n)).strip() for n in names]
    except ValueError as err:
        raise DatasetError(f"{path}: class_names is not a list of strings ({err})") from None


def _entries(mat: dict, path: Path, root: Path, num_names: int) -> list[Entry]:
    annotations = _field(mat, "annotations", path).reshape(-1)
    fields = annotations.dtype.names or ()
    for required in ("relative_im_path", "class"):
        if required not in fields:
            raise DatasetError(f"{path}: annotations lack the field {required!r} (found: {', '.join(fields)})")
    entries = []
    for index, record in enumerate(annotations, start=1):
        location = f"{path}, annotation {index}"
        try:
            relative = str(_scalar(record["relative_im_path"])).strip()
            class_id = int(_scalar(record["class"]))
        except (ValueError, TypeError) as err:
            raise DatasetError(f"{location}: malformed record ({err})") from None
        if not 1 <= class_id <= min(num_names, NUM_CLASSES):
            raise DatasetError(f"{location}: class {class_id} is outside 1-{min(num_names, NUM_CLASSES)}")
        entries.append(Entry(str(root / relative), class_id, location))
    return entries
