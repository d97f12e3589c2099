"""The table that maps index ids back to image paths and labels, and which ids are deleted,
stored compactly (no pickle)."""

from __future__ import annotations

import io
import numbers
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gce.errors import DatasetError, GceError


def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all strings back to back, and N+1 offsets (a million paths cost ~100 MB, not 400)."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


@dataclass
class ItemTable:
    """Per index id (0..N-1): the image path and its label (``None`` when unknown); ``deleted``
    holds the ids of deleted items (tombstones: an id is never given again, see SearchIndex.delete)."""

    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    deleted: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if any(not 0 <= i < len(self.paths) for i in self.deleted):
            raise ValueError("deleted ids outside the table")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def live(self) -> int:
        """The number of items not deleted."""
        return len(self.paths) - len(self.deleted)

    def is_live(self, id: int) -> bool:
        return 0 <= id < len(self.paths) and id not in self.deleted

    def live_mask(self) -> np.ndarray:
        """A boolean array, True for the ids not deleted."""
        mask = np.ones(len(self.paths), dtype=bool)
        if self.deleted:
            mask[np.fromiter(self.deleted, dtype=np.int64, count=len(self.deleted))] = False
        return mask

    def live_ids_of(self, paths: Iterable[str]) -> tuple[list[int], list[str]]:
        """The ids of the live items stored under each of ``paths`` (every one, if a path was indexed
        twice), and the paths no live item has."""
        wanted = dict.fromkeys(str(p) for p in paths)
        found: dict[str, list[int]] = {}
        for i, path in enumerate(self.paths):
            if path in wanted and i not in self.deleted:
                found.setdefault(path, []).append(i)
        return sorted(i for ids in found.values() for i in ids), [p for p in wanted if p not in found]

    def check_live(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as sorted distinct live ids, or a one-line error naming those that are not."""
        try:
            values = list(ids)
        except TypeError:
            raise GceError(f"ids must be a list of item ids, got {ids!r}") from None
        if not values:
            raise GceError("no ids given")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise GceError(f"ids must be integers, got {bad[0]!r}")
        wanted = sorted({int(v) for v in values})
        unknown = [i for i in wanted if not 0 <= i < len(self.paths)]
        gone = [i for i in wanted if i in self.deleted]
        if unknown or gone:
            parts = [f"unknown id(s) {_listed(unknown)} (ids are 0..{len(self.paths) - 1})"] if unknown else []
            parts += [f"already deleted: {_listed(gone)}"] if gone else []
            raise GceError("; ".join(parts))
        return wanted

    def with_deleted(self, ids: Iterable[int]) -> ItemTable:
        """A copy with ``ids`` deleted too (this table is left as it is)."""
        return ItemTable(list(self.paths), list(self.labels), self.deleted | frozenset(int(i) for i in ids))

    def extend(self, paths: Iterable[str], labels: Iterable[str | None]) -> None:
        paths, labels = [str(p) for p in paths], list(labels)
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths += paths
        self.labels += [None if label is None else str(label) for label in labels]

    def to_bytes(self) -> bytes:
        names = sorted({label for label in self.labels if label is not None})
        code = {name: i for i, name in enumerate(names)}
        path_blob, path_offsets = _pack(self.paths)
        name_blob, name_offsets = _pack(names)
        codes = np.array([-1 if label is None else code[label] for label in self.labels], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            path_blob=path_blob,
            path_offsets=path_offsets,
            name_blob=name_blob,
            name_offsets=name_offsets,
            label_codes=codes,
            deleted_ids=np.array(sorted(self.deleted), dtype=np.int64),
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> ItemTable:
        """The table in ``path``; anything but what :meth:`to_bytes` writes is a one-line DatasetError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in _ARRAYS}
                # absent in tables written before deletes existed: nothing deleted
                deleted = data["deleted_ids"] if "deleted_ids" in data.files else np.zeros(0, dtype=np.int64)
            paths = _unpack(*_checked(arrays["path_blob"], arrays["path_offsets"]))
            names = _unpack(*_checked(arrays["name_blob"], arrays["name_offsets"]))
            codes = arrays["label_codes"]
            if codes.dtype.kind != "i" or codes.shape != (len(paths),) or ((codes < -1) | (codes >= len(names))).any():
                raise ValueError("label codes do not match the paths and names")
            if deleted.dtype.kind != "i" or deleted.ndim != 1:
                raise ValueError("deleted ids are not a list of ids")
            if deleted.size and (deleted[0] < 0 or deleted[-1] >= len(paths) or (np.diff(deleted) <= 0).any()):
                raise ValueError("deleted ids are not sorted ids of the table")
        except (OSError, KeyError, ValueError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{path}: damaged item table ({type(exc).__name__})") from None
        return cls(paths, [None if c < 0 else names[c] for c in codes.tolist()], frozenset(deleted.tolist()))


def _listed(ids: list[int], most: int = 5) -> str:
    return ", ".join(map(str, ids[:most])) + (f" and {len(ids) - most} more" if len(ids) > most else "")


_ARRAYS = ("path_blob", "path_offsets", "name_blob", "name_offsets", "label_codes")


def _checked(blob: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A packed string array as :func:`_pack` writes it: bytes, and offsets rising from 0 to their end."""
    if blob.dtype != np.uint8 or blob.ndim != 1 or offsets.dtype.kind != "i" or offsets.ndim != 1 or not len(offsets):
        raise ValueError("not a packed string array")
    if offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
        raise ValueError("string offsets out of order")
    return blob, offsets
