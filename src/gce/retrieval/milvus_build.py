"""``gce index build --backend milvus``: a collection filled with embeddings, indexed, loaded and
measured (recall@10 against exact search per search setting, as for the faiss types), and the index
folder that points at it."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from gce.errors import GceError
from gce.io import user_path, write_json
from gce.retrieval.embedder import slices_from_json
from gce.retrieval.faiss_tuning import TARGET_RECALL, BuildReport, choose_setting, exact_topk
from gce.retrieval.index_files import REPORT, check_build_target, writer_lock
from gce.retrieval.index_manifest import MANIFEST
from gce.retrieval.milvus_index import FORMAT, MilvusIndex, read_milvus_manifest, write_milvus_manifest
from gce.retrieval.milvus_schema import (
    MILVUS_TYPES,
    check_gce_collection,
    connect,
    create_collection,
    index_params,
    normalized_uri,
    search_settings,
    vector_fields,
)
from gce.retrieval.vectors import query_vectors

__all__ = ["build_milvus_index"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")  # Milvus' rule for collection names


def _check_target(out, overwrite: bool) -> None:
    """A new or empty folder, or (with ``overwrite``) a gce index folder of either back end."""
    manifest = out / MANIFEST
    if overwrite and manifest.is_file() and f'"{FORMAT}"' in manifest.read_text(errors="replace"):
        read_milvus_manifest(out)  # a damaged or foreign manifest is refused
        return
    check_build_target(out, overwrite=overwrite)


def build_milvus_index(
    embeddings: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out_dir: str | os.PathLike,
    model: dict[str, Any],
    *,
    uri: str,
    collection: str | None = None,
    index_type: str = "hnsw",
    params: dict[str, Any] | None = None,
    layout: str = "learners",
    overwrite: bool = False,
    sample: int = 500,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    progress: bool = False,
    sources: list[dict[str, Any]] | None = None,
) -> tuple[MilvusIndex, BuildReport]:
    """Fill a new collection ``collection`` (default: the folder's name) at ``uri`` and write the
    index folder ``out_dir`` pointing at it. ``layout="learners"`` asks for one vector field per
    learner and falls back to ``single`` where the server allows one (see
    :mod:`gce.retrieval.milvus_schema`); the report's ``chosen`` says which it got."""
    from gce.retrieval.index_build import model_meta

    meta = model_meta(model)
    if index_type not in MILVUS_TYPES:
        raise GceError(f"the Milvus back end builds {', '.join(MILVUS_TYPES)} indexes, not {index_type!r}")
    if layout not in ("single", "learners"):
        raise GceError(f"layout must be single or learners, got {layout!r}")
    out = user_path(out_dir, "index folder")
    name = collection or re.sub(r"[^A-Za-z0-9_]", "_", out.name) or "gce_index"
    if not _NAME.match(name):
        name = f"gce_{name}" if _NAME.match(f"gce_{name}") else ""
    if not name:
        raise GceError(f"collection name {collection or out.name!r}: letters, digits and _ only, not a digit first")
    _check_target(out, overwrite)
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != meta["embedding_dim"] or len(x) == 0:
        raise GceError(f"embeddings have shape {x.shape}, expected (N >= 1, {meta['embedding_dim']})")
    labels = list(labels) if labels is not None else [None] * len(x)
    if len(paths) != len(x) or len(labels) != len(x):
        raise GceError(f"{len(x)} embeddings but {len(paths)} paths and {len(labels)} labels")
    given = {key: value for key, value in (params or {}).items() if value is not None}
    if index_type == "ivf":
        given.setdefault("nlist", max(1, min(round(math.sqrt(len(x))), len(x) // 39 or 1)))
    uri = normalized_uri(uri)
    client = connect(uri)
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):
        _check_target(out, overwrite)
        if client.has_collection(name):
            check_gce_collection(client, name)  # another program's collection: refused, never dropped
            if not overwrite:
                raise GceError(f"Milvus collection {name!r} at {uri} exists; pick another --collection or overwrite")
            client.drop_collection(name)
        got = create_collection(client, name, meta, layout)
        body = {
            "uri": uri,
            "collection": name,
            "index_type": index_type,
            "layout": got,
            "params": {},
            "search_params": {},
            "model": meta,
            "next_id": len(x),
            "sources": list(sources or []),
        }
        index = MilvusIndex.__new__(MilvusIndex)
        index.path, index._client, index._size = out, client, 0
        index._set(body)
        start = time.perf_counter()
        index.insert_rows(x, paths, labels, 0, progress=progress)
        insert_seconds = time.perf_counter() - start
        client.flush(name)
        built_params, used = index_params(client, index_type, vector_fields(got, meta["num_learners"]), given)
        client.create_index(name, built_params)
        client.load_collection(name)
        build_seconds = time.perf_counter() - start
        body["params"] = {k: int(v) for k, v in used.items()}
        index._set(body)
        index._size = index._count()
        rows, n_sample = _measure(index, x, slices_from_json(meta["learner_slices"]), sample, seed)
        chosen = choose_setting(rows, target_recall)
        body["search_params"] = {key: chosen[key] for key in ("nprobe", "ef_search") if key in chosen}
        index._set(write_milvus_manifest(out, body))
        report = BuildReport(
            f"milvus {index_type} ({got} layout)",
            index.size,
            build_seconds,
            0,
            n_sample,
            10,
            rows,
            {"setting": chosen["setting"], "insert_seconds": insert_seconds} if "setting" in chosen else {},
        )
        write_json(out / REPORT, asdict(report), what="build report")
    return index, report


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, truth.size)


def _without_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids with the query's own id removed, cut to ``k`` (padded with -1)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, o) in enumerate(zip(ids, own, strict=True)):
        kept = row[row != o][:k]
        out[r, : len(kept)] = kept
    return out


def _measure(index: MilvusIndex, x: np.ndarray, slices, sample: int, seed: int, k: int = 10):
    """Recall@k (full embedding, learner 0 alone) against exact search and batch queries/s per setting."""
    settings = search_settings(index.index_type, index.manifest["params"])
    if not settings:
        return [], 0
    rng = np.random.default_rng(seed)
    own = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    truth_full = exact_topk(query_vectors(x[own], slices), x, slices, k, own)
    truth_one = exact_topk(query_vectors(x[own], slices, learners=[0]), x, slices, k, own)
    rows = []
    for name, params in settings:
        index.search_params = dict(params)
        seconds = math.inf
        for _ in range(3):  # the fastest of three, as for faiss
            start = time.perf_counter()
            found = index.search_arrays(x[own], k + 1)[1]
            seconds = min(seconds, time.perf_counter() - start)
        one = index.search_arrays(x[own], k + 1, learners=[0])[1]
        rows.append(
            {
                "setting": name,
                **params,
                "recall": _recall(_without_own(found, own, k), truth_full),
                "recall_learner0": _recall(_without_own(one, own, k), truth_one),
                "qps": len(own) / max(seconds, 1e-9),
            }
        )
    return rows, len(own)
