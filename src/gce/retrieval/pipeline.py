"""The steps chained: embed a catalogue, build or grow an index from an embeddings folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gce.data.records import ImageRecords
from gce.errors import GceError
from gce.retrieval.embedder import Embedder
from gce.retrieval.faiss_tuning import BuildReport
from gce.retrieval.index import SearchIndex
from gce.retrieval.index_build import build_index
from gce.retrieval.store import read_store

__all__ = ["add_store_to_index", "build_index_from_images", "build_index_from_store", "records_to_items"]


def records_to_items(images: ImageRecords | Sequence[str | os.PathLike]) -> tuple[list[str], list[str | None]]:
    """Paths and labels (class names) of records, or paths without labels."""
    if isinstance(images, ImageRecords):
        return list(images.paths), [images.class_names[c] for c in images.labels.tolist()]
    paths = [os.fspath(p) for p in images]
    return paths, [None] * len(paths)


def build_index_from_images(
    checkpoint: str | os.PathLike | Embedder,
    images: ImageRecords | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    index_type: str = "flat",
    *,
    device: str = "cpu",
    overwrite: bool = False,
    **kwargs: Any,
) -> tuple[SearchIndex, BuildReport]:
    """Embed images in memory and build an index of them (small catalogues, tests, notebooks).

    Large catalogues go through ``gce embed`` (sharded, resumable) and :func:`build_index_from_store`.
    """
    embedder = checkpoint if isinstance(checkpoint, Embedder) else Embedder.from_checkpoint(checkpoint, device=device)
    paths, labels = records_to_items(images)
    if not paths:
        raise GceError("no images to index")
    embeddings = embedder.embed_paths(paths)
    return build_index(
        embeddings,
        paths,
        labels,
        out_dir,
        embedder.metadata(),
        index_type=index_type,
        overwrite=overwrite,
        sources=[{"images": len(paths), "checkpoint": embedder.source}],
        **kwargs,
    )


def build_index_from_store(
    store: str | os.PathLike, out_dir: str | os.PathLike, index_type: str = "flat", **kwargs: Any
) -> tuple[SearchIndex, BuildReport]:
    data = read_store(store)
    if len(data.embeddings) == 0:
        raise GceError(f"{store}: holds no embeddings (every image was skipped)")
    return build_index(
        data.embeddings,
        data.paths,
        data.labels,
        out_dir,
        data.model,
        index_type=index_type,
        sources=[{"embeddings": str(Path(store).resolve()), "count": len(data.embeddings)}],
        **kwargs,
    )


def add_store_to_index(index_dir: str | os.PathLike, store: str | os.PathLike) -> tuple[Any, range]:
    """Append an embeddings folder to an index of either back end (:func:`gce.retrieval.open_index.open_index`)."""
    from gce.retrieval.open_index import open_index

    index = open_index(index_dir)
    data = read_store(store)
    dim = int(data.model["embedding_dim"])
    if dim != index.dim:
        raise GceError(f"{store}: embeddings of dimension {dim}, the index {index_dir} holds {index.dim}")
    index.check_model(data.model["model_id"], f"the embeddings in {store} come from")
    ids = index.add(
        data.embeddings,
        data.paths,
        data.labels,
        model_id=data.model["model_id"],
        source={"embeddings": str(Path(store).resolve()), "count": len(data.embeddings)},
    )
    return index, ids
