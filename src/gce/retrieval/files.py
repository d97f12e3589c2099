"""Small file helpers for the retrieval folders: atomic writes, checksums, JSON manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gce.errors import DatasetError
from gce.io import replace_file, sha256_file, write_json


def commit_file(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``final``: readers see the old file or the whole new one.
    A directory, FIFO, socket or device at ``final`` is refused (gce.io's rules)."""
    replace_file(tmp, final)


def write_json_atomic(path: Path, values: dict[str, Any]) -> None:
    """Strict JSON (NaN as null), atomically: :func:`gce.io.write_json`."""
    write_json(path, values)


def read_manifest(path: Path, what: str, expected_format: str) -> dict[str, Any]:
    """Load a JSON manifest, or raise a one-line :class:`DatasetError` naming the file."""
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
    return values


def check_checksum(path: Path, expected: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (listed in the manifest)")
    if sha256_file(path) != expected:
        raise DatasetError(f"{path}: checksum mismatch (the file is damaged or was changed)")
