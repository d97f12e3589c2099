"""Reading an embedding store back: its manifest and every shard verified (see :mod:`.store`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gce.errors import DatasetError
from gce.retrieval.files import check_checksum
from gce.retrieval.store_manifest import MANIFEST, read_store_manifest

__all__ = ["EmbeddingSet", "read_store"]


@dataclass
class EmbeddingSet:
    """Embeddings read back from a store (skipped images are absent)."""

    embeddings: np.ndarray  # (N, D) float32, learner-normalised
    ids: np.ndarray  # (N,) int64 positions in the input list
    paths: list[str]
    labels: list[str | None]
    model: dict[str, Any]
    path: Path


def read_store(path: str | os.PathLike, *, require_complete: bool = True) -> EmbeddingSet:
    """Read a store's embeddings (float32) with their ids, paths and labels, checking the manifest
    (its checksum and content) and every shard (its checksum and content)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such embeddings folder")
    manifest = read_store_manifest(folder / MANIFEST)
    shards, model, labels_known = manifest["shards"], manifest["model"], manifest["labels_known"]
    dim = model["embedding_dim"]
    if require_complete and not manifest["complete"]:
        done = shards[-1]["stop"] if shards else 0
        raise DatasetError(
            f"{folder}: incomplete ({done} of {manifest['items_total']} images embedded);"
            f" rerun the same gce embed command to finish it"
        )
    embs, ids, paths, labels = [], [], [], []
    for shard in shards:
        file = folder / shard["file"]
        check_checksum(file, shard["sha256"])
        try:
            with np.load(file, allow_pickle=False) as data:
                e, i, p, lab = data["embeddings"], data["ids"], data["paths"], data["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"{file}: cannot be read ({type(exc).__name__})") from None
        count = shard["count"]
        if e.ndim != 2 or e.shape != (count, dim) or e.dtype != np.dtype(manifest["dtype"]):
            raise DatasetError(
                f"{file}: holds {e.shape} {e.dtype} embeddings, the manifest says ({count}, {dim}) {manifest['dtype']}"
            )
        in_range = i.ndim == 1 and len(i) == count and bool(np.all((i >= shard["start"]) & (i < shard["stop"])))
        if not in_range or bool(np.any(np.diff(i) <= 0)) or len(p) != count or len(lab) != count:
            raise DatasetError(f"{file}: its ids, paths or labels do not match the manifest's range and count")
        embs.append(e.astype(np.float32))
        ids.append(i.astype(np.int64))
        paths += p.tolist()
        labels += [label if labels_known else None for label in lab.tolist()]
    embeddings = np.concatenate(embs) if embs else np.zeros((0, dim), dtype=np.float32)
    return EmbeddingSet(
        embeddings, np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), paths, labels, model, folder
    )
