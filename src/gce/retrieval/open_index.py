"""One way to open an index folder, whatever holds its items: faiss files in the folder, or a Milvus
collection its manifest names. The commands (``gce index add|info``, ``gce search``, ``gce serve``)
open indexes only through :func:`open_index`."""

from __future__ import annotations

import json
import os
from typing import Any

from gce.io import user_path
from gce.retrieval.index_manifest import MANIFEST

__all__ = ["backend_of", "open_index"]


def backend_of(folder: str | os.PathLike) -> str:
    """``"milvus"`` for a folder whose manifest points at Milvus, else ``"faiss"`` (whose loader
    reports any problem with the folder)."""
    path = user_path(folder, "index") / MANIFEST
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return "faiss"
    return "milvus" if isinstance(values, dict) and values.get("backend") == "milvus" else "faiss"


def open_index(folder: str | os.PathLike, *, verify: bool = True) -> Any:
    """A :class:`~gce.retrieval.SearchIndex` or a :class:`~gce.retrieval.milvus_index.MilvusIndex`
    (pymilvus is imported only for the latter); ``verify`` is the faiss checksum pass."""
    if backend_of(folder) == "milvus":
        from gce.retrieval.milvus_index import MilvusIndex

        return MilvusIndex.open(folder)
    from gce.retrieval.index import SearchIndex

    return SearchIndex.load(folder, verify=verify)
