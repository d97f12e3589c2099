"""What a run's data split was, recorded in its checkpoints, and the check that it has not changed.

A resumed run must train on exactly the data it started with: classes removed from the dataset
redraw the class split (test classes then get trained on), classes added shift every label. The
record holds, per split, the class list and a SHA-256 digest of the sorted ``(file, class)``
list; :func:`check_same_split` compares it with the data found now and says what changed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gce.data.records import ImageRecords
from gce.errors import DatasetError

__all__ = ["check_same_split", "split_record"]

_FORMAT = 1


def _digest(records: ImageRecords) -> str:
    rows = sorted(
        f"{path}\t{records.class_names[label]}" for path, label in zip(records.paths, records.labels, strict=True)
    )
    return hashlib.sha256("\n".join(rows).encode("utf-8", "surrogateescape")).hexdigest()


def split_record(splits: dict[str, ImageRecords | None]) -> dict[str, Any]:
    """``{"format", "splits": {name: {"classes", "files", "digest"}}}`` for the splits that exist."""
    return {
        "format": _FORMAT,
        "splits": {
            name: {"classes": list(records.class_names), "files": len(records), "digest": _digest(records)}
            for name, records in splits.items()
            if records is not None
        },
    }


def _names(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def split_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two records, one short phrase per split (empty: the same data)."""
    changes = []
    old, new = saved.get("splits", {}), current.get("splits", {})
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            changes.append(f"the {name} split {'is new' if a is None else 'is gone'}")
            continue
        if a["digest"] == b["digest"]:
            continue
        removed = [c for c in a["classes"] if c not in set(b["classes"])]
        added = [c for c in b["classes"] if c not in set(a["classes"])]
        parts = []
        if removed:
            parts.append(f"{len(removed)} classes removed ({_names(removed)})")
        if added:
            parts.append(f"{len(added)} classes added ({_names(added)})")
        if a["files"] != b["files"]:
            parts.append(f"{a['files']} -> {b['files']} images")
        if not parts:
            parts.append("the same number of images and classes, but other files or labels")
        changes.append(f"{name}: " + ", ".join(parts))
    return changes


def check_same_split(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str, warn=print) -> None:
    """Refuse (one line saying what changed) to resume on data other than the checkpoint's.

    A checkpoint written before splits were recorded cannot be checked: that is said, not refused.
    """
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT or not isinstance(saved.get("splits"), dict):
        warn(
            f"warning: {checkpoint} records no data split (written by an older gce); whether the data changed"
            f" since cannot be checked"
        )
        return
    changes = split_changes(saved, current)
    if changes:
        raise DatasetError(
            f"the data changed since {checkpoint} was written ({'; '.join(changes)}); resuming would"
            f" train and test on another split: restore the data, or start a new run in another"
            f" train.out_dir"
        )
