"""Build-time tuning of approximate indexes: recall@k against exact search and speed per search
setting, and the default chosen from them (:class:`BuildReport`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gce.evaluation.knn import exact_knn
from gce.evaluation.knn_faiss import keep_all_but_own
from gce.retrieval.faiss_build import apply_search_params, search_settings
from gce.retrieval.vectors import query_vectors, stored_vectors

__all__ = ["TARGET_RECALL", "BuildReport", "choose_setting", "exact_topk", "measure_settings"]

#: Recall@10 (against exact search) that the build-time tuning aims for.
TARGET_RECALL = 0.95


@dataclass
class BuildReport:
    """What ``build`` measured: per search setting, recall@k against exact search and speed."""

    index_type: str
    size: int
    build_seconds: float
    index_bytes: int
    sample: int
    k: int
    rows: list[dict[str, Any]]
    chosen: dict[str, Any]

    def format_table(self) -> str:
        lines = [
            (
                f"{self.index_type} index: {self.size:,} vectors, built in {self.build_seconds:.1f} s,"
                f" {self.index_bytes / 2**20:.1f} MiB"
            )
        ]
        if self.rows:
            lines.append(
                f"recall@{self.k} against exact search on {self.sample} gallery items as queries"
                f" (each one's own id left out); queries/s: one batch of them, fastest of 3:"
            )
            lines.append(f"  {'setting':<14} {'recall@' + str(self.k):>10} {'learner 0 only':>15} {'queries/s':>10}")
            for row in self.rows:
                mark = "  <- default" if row["setting"] == self.chosen.get("setting") else ""
                lines.append(
                    f"  {row['setting']:<14} {row['recall']:>10.3f} {row['recall_learner0']:>15.3f}"
                    f" {row['qps']:>10,.0f}{mark}"
                )
        return "\n".join(lines)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _topk_without_self(index, queries: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The index's top ``k`` of each query, its own id left out (evaluation's rule for faiss lists)."""
    ids = torch.from_numpy(index.search(queries, k + 1)[1].astype(np.int64))
    return ids[keep_all_but_own(ids, torch.from_numpy(own))].view(len(ids), -1)[:, :k].numpy()


def exact_topk(
    queries: np.ndarray, embeddings: np.ndarray, slices: Sequence[slice], k: int, own: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """Ids of the exact inner-product top ``k`` of (already rescaled) queries against the stored forms
    of ``embeddings``, each query's own id ``own`` left out: evaluation's exact kNN (ties by id), a
    gallery chunk at a time (no second copy of a large gallery), the chunks merged by the same rule."""
    best_s = np.zeros((len(queries), 0), dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), chunk):
        part = stored_vectors(embeddings[start : start + chunk], slices)
        inside = (own >= start) & (own < start + len(part))
        found = exact_knn(queries, part, k, metric="cosine", self_index=np.where(inside, own - start, -1))
        best_s = np.hstack([best_s, found.scores.numpy()])
        best_i = np.hstack([best_i, found.indices.numpy() + start])
        order = np.lexsort((best_i, -best_s), axis=1)[:, :k]  # by score, then by id
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_i


def measure_settings(
    index,
    index_type: str,
    embeddings: np.ndarray,
    slices: Sequence[slice],
    *,
    sample: int = 500,
    k: int = 10,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Recall@k (full embedding and learner 0 alone) against exact search, and batch queries/s,
    for each search setting of an approximate index. Queries are sampled gallery items, each
    one's own id left out of both lists."""
    settings = search_settings(index_type, index)
    if not settings:
        return [], 0
    rng = np.random.default_rng(seed)
    own = np.sort(rng.choice(len(embeddings), size=min(sample, len(embeddings)), replace=False))
    full_q = query_vectors(embeddings[own], slices)
    one_q = query_vectors(embeddings[own], slices, learners=[0])
    truth_full = exact_topk(full_q, embeddings, slices, k, own)
    truth_one = exact_topk(one_q, embeddings, slices, k, own)
    rows = []
    for name, params in settings:
        apply_search_params(index, params)
        seconds = math.inf
        for _ in range(3):  # the fastest of three: one timing on a busy machine is noise
            start = time.perf_counter()
            found = _topk_without_self(index, full_q, own, k)
            seconds = min(seconds, time.perf_counter() - start)
        rows.append(
            {
                "setting": name,
                **params,
                "recall": _recall(found, truth_full),
                "recall_learner0": _recall(_topk_without_self(index, one_q, own, k), truth_one),
                "qps": len(own) / max(seconds, 1e-9),
            }
        )
    return rows, len(own)


def choose_setting(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The fastest setting at or above ``target`` recall, else the most accurate one."""
    if not rows:
        return {}
    good = [r for r in rows if r["recall"] >= target]
    return max(good, key=lambda r: r["qps"]) if good else max(rows, key=lambda r: (r["recall"], r["qps"]))
