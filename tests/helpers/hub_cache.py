"""A Hugging Face cache laid out as ``snapshot_download`` leaves it, filled from a local folder."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Store ``folder``'s files as ``repo_id`` at ``revision`` in the cache ``cache`` (``HF_HUB_CACHE``):
    ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` linking to them and
    ``refs/<revision>`` naming the commit. Returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # any 40 hex digits
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot
