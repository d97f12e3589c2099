"""Checksums: files gce later reads as truth (models, checkpoints, embeddings, indexes) get a
``<name>.sha256`` sidecar that is checked on load; a missing sidecar is a failed check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gce.errors import CheckpointError, GceError
from gce.io.atomic import write_text
from gce.io.paths import CHECKSUM_SUFFIX, checksum_path

__all__ = ["CHECKSUM_SUFFIX", "checksum_path", "sha256_file", "sha256_of", "verify_checksum", "write_checksum"]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: str | os.PathLike, data: bytes | None = None) -> Path:
    """Write ``<path>.sha256`` for the file ``path`` (or for ``data``, its known content)."""
    digest = sha256_of(data) if data is not None else sha256_file(path)
    return write_text(checksum_path(path), digest + "\n", what="checksum")


def verify_checksum(
    path: str | os.PathLike, data: bytes | None = None, *, error: type[GceError] = CheckpointError
) -> None:
    """Check ``path`` (or its already-read ``data``) against ``<path>.sha256``.

    A missing or unreadable checksum file is a failed check, like a mismatch: a file that gce
    reads as truth is trusted only if it is exactly what gce wrote. Raises ``error`` naming the file.
    """
    sidecar = checksum_path(path)
    try:
        expected = sidecar.read_text(encoding="ascii").split()[0] if sidecar.exists() else None
    except (OSError, UnicodeDecodeError, IndexError):
        expected = ""
    if expected is None:
        raise error(f"{path}: no checksum file {sidecar.name} beside it, so it cannot be verified")
    actual = sha256_of(data) if data is not None else sha256_file(path)
    if actual != expected:
        raise error(f"{path}: checksum mismatch with {sidecar.name} (file is damaged or half-written)")
