"""Building an index folder from embeddings: the faiss structure, its measured search settings,
the first generation (:mod:`gce.retrieval.index_files`) and the build report."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from gce.config.vocabulary import INDEX_TYPES
from gce.errors import GceError
from gce.io import user_path, write_json
from gce.retrieval.embedder import slices_from_json
from gce.retrieval.faiss_build import apply_search_params, build_faiss
from gce.retrieval.faiss_tuning import TARGET_RECALL, BuildReport, choose_setting, measure_settings
from gce.retrieval.index import SearchIndex
from gce.retrieval.index_files import REPORT, check_build_target, previous_manifest, write_generation, writer_lock
from gce.retrieval.index_manifest import ManifestError, check_model_meta
from gce.retrieval.items import ItemTable

__all__ = ["build_index"]


def build_index(
    embeddings: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out_dir: str | os.PathLike,
    model: dict[str, Any],
    *,
    index_type: str = "flat",
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    sample: int = 500,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    progress: bool = False,
    sources: list[dict[str, Any]] | None = None,
) -> tuple[SearchIndex, BuildReport]:
    """Build an index folder from learner-normalised ``embeddings`` (N x D) and their paths/labels.

    ``model`` holds ``model_id``, ``embedding_dim``, ``num_learners`` and ``learner_slices`` (as
    :meth:`Embedder.metadata` or an embedding store gives them). Approximate types are measured on
    ``sample`` gallery queries and get as default the fastest search setting reaching
    ``target_recall`` (see :class:`BuildReport`).
    """
    meta = model_meta(model)
    if index_type not in INDEX_TYPES:
        raise GceError(f"unknown index type {index_type!r}; valid types: {', '.join(INDEX_TYPES)}")
    out = user_path(out_dir, "index folder")
    check_build_target(out, overwrite=overwrite)  # before the work, and again under the lock
    slices = slices_from_json(meta["learner_slices"])
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != meta["embedding_dim"]:
        raise GceError(f"embeddings have shape {x.shape}, expected (N, {meta['embedding_dim']})")
    if len(x) == 0:
        raise GceError("no embeddings to index")
    labels = list(labels) if labels is not None else [None] * len(x)
    if len(paths) != len(x) or len(labels) != len(x):
        raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
    start = time.perf_counter()
    index, used = build_faiss(x, index_type, slices, params, seed=seed, progress=progress)
    build_seconds = time.perf_counter() - start
    rows, n_sample = measure_settings(index, index_type, x, slices, sample=sample, seed=seed)
    chosen = choose_setting(rows, target_recall)
    search_params: dict[str, Any] = {key: chosen[key] for key in ("nprobe", "ef_search") if key in chosen}
    apply_search_params(index, search_params)
    items = ItemTable()
    items.extend(paths, labels)
    body = {
        "index_type": index_type,
        "params": used,
        "search_params": search_params,
        "model": meta,
        "sources": list(sources or []),
    }
    with writer_lock(out):
        check_build_target(out, overwrite=overwrite)  # another build may have finished meanwhile
        manifest = write_generation(out, index, items, body, previous_manifest(out))
        report = BuildReport(
            index_type,
            int(index.ntotal),
            build_seconds,
            int(manifest["files"]["index"]["bytes"]),
            n_sample,
            10,
            rows,
            {key: chosen[key] for key in ("setting",) if key in chosen},
        )
        write_json(out / REPORT, asdict(report), what="build report")
    return SearchIndex(index, items, manifest, out), report


def model_meta(model: dict[str, Any]) -> dict[str, Any]:
    """The model metadata an index records, validated (one-line errors) and as plain JSON values."""
    try:
        check_model_meta(model)
    except ManifestError as exc:
        raise GceError(f"model metadata: {exc}") from None
    return {
        "model_id": model["model_id"],
        "embedding_dim": int(model["embedding_dim"]),
        "num_learners": int(model["num_learners"]),
        "learner_slices": [[int(a), int(b)] for a, b in model["learner_slices"]],
    }
