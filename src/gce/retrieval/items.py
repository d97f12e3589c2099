"""The table that maps index ids back to image paths and labels, stored compactly (no pickle)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gce.errors import DatasetError


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
    """Per index id (0..N-1): the image path and its label (``None`` when unknown)."""

    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

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
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> ItemTable:
        """The table in ``path``; anything but what :meth:`to_bytes` writes is a one-line DatasetError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in _ARRAYS}
            paths = _unpack(*_checked(arrays["path_blob"], arrays["path_offsets"]))
            names = _unpack(*_checked(arrays["name_blob"], arrays["name_offsets"]))
            codes = arrays["label_codes"]
            if codes.dtype.kind != "i" or codes.shape != (len(paths),) or ((codes < -1) | (codes >= len(names))).any():
                raise ValueError("label codes do not match the paths and names")
        except (OSError, KeyError, ValueError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{path}: damaged item table ({type(exc).__name__})") from None
        return cls(paths, [None if c < 0 else names[c] for c in codes.tolist()])


_ARRAYS = ("path_blob", "path_offsets", "name_blob", "name_offsets", "label_codes")


def _checked(blob: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A packed string array as :func:`_pack` writes it: bytes, and offsets rising from 0 to their end."""
    if blob.dtype != np.uint8 or blob.ndim != 1 or offsets.dtype.kind != "i" or offsets.ndim != 1 or not len(offsets):
        raise ValueError("not a packed string array")
    if offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
        raise ValueError("string offsets out of order")
    return blob, offsets
