"""Small file helpers for the retrieval folders: atomic writes, checksums, JSON manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gce.errors import DatasetError
from gce.io import replace_file, sha256_file, sha256_of, strict_json, write_json

#: Key of a manifest's own checksum: the sha256 of its other values as canonical JSON. Inside the
#: file, not beside it, so that the atomic rename that replaces a manifest replaces its checksum too
#: (a sidecar would be a second rename, and a kill between them would make a resumable folder unreadable).
MANIFEST_CHECKSUM = "manifest_sha256"


def shown_path(text: str) -> str:
    """``text`` writable as UTF-8: the bytes of a file name in another encoding (surrogate escapes)
    as ``\\xNN``, so manifests and printed lines never fail on them."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def commit_file(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``final``: readers see the old file or the whole new one.
    A directory, FIFO, socket or device at ``final`` is refused (gce.io's rules)."""
    replace_file(tmp, final)


def write_json_atomic(path: Path, values: dict[str, Any]) -> None:
    """Strict JSON (NaN as null), atomically: :func:`gce.io.write_json`."""
    write_json(path, values)


def manifest_digest(values: dict[str, Any]) -> str:
    """sha256 of ``values`` (without its checksum) as canonical JSON: sorted keys, ASCII only."""
    body = {k: v for k, v in values.items() if k != MANIFEST_CHECKSUM}
    text = json.dumps(strict_json(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return sha256_of(text.encode("ascii"))


def write_checked_manifest(path: Path, values: dict[str, Any]) -> None:
    """Write a manifest atomically with its own checksum inside (:data:`MANIFEST_CHECKSUM`)."""
    write_json_atomic(path, {**values, MANIFEST_CHECKSUM: manifest_digest(values)})


def read_manifest(path: Path, what: str, expected_format: str, *, checksummed: bool = False) -> dict[str, Any]:
    """Load a JSON manifest, or raise a one-line :class:`DatasetError` naming the file.

    ``checksummed``: the manifest must carry :data:`MANIFEST_CHECKSUM` and match it (an edited or
    damaged manifest, or one without a checksum, is refused); the key is removed from the result.
    """
    if not path.is_file():
        raise DatasetError(f"{path.parent} is not a {what} (no {path.name})")
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: damaged manifest ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict) or values.get("format") != expected_format:
        raise DatasetError(
            f"{path}: not a {what} manifest (format {values.get('format') if isinstance(values, dict) else None!r},"
            f" expected {expected_format!r})"
        )
    if checksummed:
        expected = values.pop(MANIFEST_CHECKSUM, None)
        if not isinstance(expected, str):
            raise DatasetError(f"{path}: the manifest has no checksum ({MANIFEST_CHECKSUM}), so it cannot be verified")
        if manifest_digest(values) != expected:
            raise DatasetError(f"{path}: manifest checksum mismatch (the file was edited or is damaged)")
    return values


def check_checksum(path: Path, expected: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (listed in the manifest)")
    if sha256_file(path) != expected:
        raise DatasetError(f"{path}: checksum mismatch (the file is damaged or was changed)")
