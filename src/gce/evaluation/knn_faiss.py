"""The faiss back end of the exact kNN (``eval.backend: faiss``): flat indexes, the same order."""

from __future__ import annotations

import numpy as np
import torch

from gce.errors import GceError
from gce.evaluation.topk import KnnResult, sort_by_score_then_index

__all__ = ["faiss_knn", "keep_all_but_own"]


def faiss_knn(q: torch.Tensor, g: torch.Tensor, k: int, metric: str, own: torch.Tensor | None) -> KnnResult:
    try:
        import faiss
    except ImportError as exc:  # an optional dependency: say how to get it
        raise GceError("backend 'faiss' needs faiss: pip install faiss-cpu (a dependency of gce-dml)") from exc
    if k == 0:
        return KnnResult(indices=torch.empty(len(q), 0, dtype=torch.int64), scores=torch.empty(len(q), 0))
    index = faiss.IndexFlatIP(g.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(g.shape[1])
    index.add(g.numpy())
    extra = 1 if own is not None and bool((own >= 0).any()) else 0
    found_dist, found_idx = index.search(q.numpy(), k + extra)  # k + extra <= gallery size (k was capped)
    dist = torch.from_numpy(np.ascontiguousarray(found_dist, dtype=np.float32))
    idx = torch.from_numpy(found_idx.astype(np.int64))
    if own is not None and extra:
        keep = keep_all_but_own(idx, own)
        dist, idx = dist[keep].view(len(idx), -1)[:, :k], idx[keep].view(len(idx), -1)[:, :k]
    # faiss' order among equal scores is unspecified; impose (-score, index) within the list.
    key = dist if metric == "cosine" else -dist
    key, idx = sort_by_score_then_index(key, idx)
    return KnnResult(indices=idx, scores=key if metric == "cosine" else -key)


def keep_all_but_own(idx: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Mask of ``idx`` (a faiss list of ``k + 1`` per row) without one column per row: the query's own
    index where present, else the last column. Every row keeps ``k`` columns."""
    drop = idx == own[:, None]
    missing = ~drop.any(1)
    drop[missing, -1] = True
    first = drop.int().argmax(1, keepdim=True)  # a faiss list holds each index at most once
    return torch.ones_like(drop).scatter_(1, first, False)
