"""Embed a dataset and compute the standard DML metrics on the embeddings.

The metric definitions live in :mod:`gce.evaluation.metrics`, the neighbour search in
:mod:`gce.evaluation.knn`; docs/metrics.md describes both for users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gce.errors import ConfigError, GceError
from gce.evaluation import metrics as M
from gce.evaluation.knn import BACKENDS, Backend, as_float_tensor, exact_knn
from gce.evaluation.ranks import knn_with_first_positive
from gce.runtime import loader_worker_ignores_sigterm

_RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "emoji": (1, 2, 4, 8),
    "folder": (1, 2, 4, 8),
    "csv": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}


def default_recall_ks(dataset_name: str) -> tuple[int, ...]:
    """The K values papers report for a dataset: CUB/Cars 1,2,4,8; SOP 1,10,100,1000;
    In-Shop 1,10,20,30,40,50; our own folder/CSV/emoji datasets use 1,2,4,8."""
    try:
        return _RECALL_KS[dataset_name.lower()]
    except KeyError:
        raise ConfigError(
            f"data.dataset: unknown dataset {dataset_name!r} for default recall K "
            f"(known: {', '.join(sorted(_RECALL_KS))}); set eval.recall_ks"
        ) from None


@dataclass
class EvalResult:
    """Metrics of one evaluation; every score is a fraction in [0, 1].

    ``num_queries`` counts the queries the retrieval metrics average over; ``excluded_queries``
    the queries left out because their class has no other gallery item. ``nmi``/``f1`` are
    ``None`` when clustering was not requested. ``num_classes``: distinct labels among the
    evaluated images (queries and gallery).
    """

    recall: dict[int, float]
    nmi: float | None
    f1: float | None
    map_at_r: float
    r_precision: float
    num_queries: int
    num_classes: int
    excluded_queries: int

    def to_dict(self) -> dict[str, Any]:
        """Flat dict for logs: ``recall@K`` ..., ``nmi``, ``f1`` (only when computed), ``map@r``,
        ``r_precision``, ``num_queries``, ``num_classes``, ``excluded_queries``."""
        out: dict[str, Any] = {f"recall@{k}": v for k, v in sorted(self.recall.items())}
        if self.nmi is not None:
            out["nmi"] = self.nmi
        if self.f1 is not None:
            out["f1"] = self.f1
        out.update(
            {
                "map@r": self.map_at_r,
                "r_precision": self.r_precision,
                "num_queries": self.num_queries,
                "num_classes": self.num_classes,
                "excluded_queries": self.excluded_queries,
            }
        )
        return out

    def format_table(self) -> str:
        """Readable two-column table, scores in percent with one decimal."""
        rows: list[tuple[str, float | None]] = [(f"Recall@{k}", v) for k, v in sorted(self.recall.items())]
        rows += [("NMI", self.nmi), ("F1", self.f1)] if self.nmi is not None else []
        rows += [("MAP@R", self.map_at_r), ("R-Precision", self.r_precision)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'metric':<{width}}  {'%':>6}", f"{'-' * width}  {'-' * 6}"]
        lines += [f"{name:<{width}}  {_percent(v):>6}" for name, v in rows]
        lines.append(
            f"{self.num_queries} queries, {self.num_classes} classes"
            + (
                f", {self.excluded_queries} queries excluded (no other gallery item of their class)"
                if self.excluded_queries
                else ""
            )
        )
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


# ----------------------------------------------------------------------------------- evaluation
def _query_gallery_split(n: int, is_query: Any, is_gallery: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(query_rows, gallery_rows, self_index)`` or ``None`` for leave-one-out retrieval.

    A mask left ``None`` while the other is given means "every image". ``self_index[q]`` is the
    gallery position of query q's own image, -1 if it is not in the gallery.
    """
    if is_query is None and is_gallery is None:
        return None
    masks = []
    for name, mask in (("is_query", is_query), ("is_gallery", is_gallery)):
        m = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if m.shape != (n,):
            raise GceError(f"{name} has {m.size} entries for {n} embeddings")
        masks.append(m)
    q_mask, g_mask = masks
    if not q_mask.any() or not g_mask.any():
        raise GceError(
            f"evaluation needs at least one query and one gallery image "
            f"(got {int(q_mask.sum())} queries, {int(g_mask.sum())} gallery images)"
        )
    gallery_pos = np.cumsum(g_mask) - 1
    query_rows = np.flatnonzero(q_mask)
    self_index = np.where(g_mask[query_rows], gallery_pos[query_rows], -1)
    return query_rows, np.flatnonzero(g_mask), self_index


def _check_ks(recall_ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in recall_ks}))
    if not ks or ks[0] < 1:
        raise ConfigError(f"eval.recall_ks must be positive integers, got {list(recall_ks)}")
    return ks


def evaluate_embeddings(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    is_query: Any = None,
    is_gallery: Any = None,
    clustering: bool = True,
    backend: Backend = "torch",
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Recall@K, MAP@R, R-Precision and (optionally) NMI and pairwise F1 of labelled embeddings.

    Retrieval (cosine similarity, the embeddings being L2-normalised by the model):

    * ``is_query``/``is_gallery`` both ``None``: every image queries all the others (leave-one-out),
      itself excluded by identity.
    * otherwise (In-Shop) the query images search the gallery images; an image that is both a query
      and a gallery item is excluded from its own results.

    Neighbours are ordered by decreasing similarity, ties by smaller gallery index. Queries whose
    class has no other gallery item are excluded from all retrieval metrics and counted in
    ``excluded_queries``. With ``backend="torch"`` the neighbour lists are ``max R`` long (what
    MAP@R and R-Precision need) and Recall@K comes from each query's exact first-positive rank, so
    Recall@1000 costs no top-1000. ``backend="faiss"`` searches ``k = max(max(recall_ks), max R)``
    neighbours (capped by the gallery) and computes everything from the lists.

    Clustering (``clustering=True``): seeded k-means with as many clusters as classes, on all
    embeddings in leave-one-out mode and on the gallery embeddings in query/gallery mode; NMI uses
    arithmetic averaging; F1 is the pairwise F-measure (see :mod:`gce.evaluation.metrics`).
    """
    x, y = _checked_inputs(embeddings, labels, backend)
    ks = _check_ks(recall_ks)
    split = _query_gallery_split(len(x), is_query, is_gallery)
    if split is None:
        q, q_lab, g, g_lab, self_index = x, y, None, None, None
        relevant = M.num_relevant(y)
    else:
        q_rows, g_rows, self_index = split
        q, q_lab, g, g_lab = x[q_rows], y[q_rows], x[g_rows], y[g_rows]
        relevant = M.num_relevant(q_lab, g_lab, query_in_gallery=self_index >= 0)
    neighbor_labels, recall = _retrieve(
        q,
        q_lab,
        g,
        y if g_lab is None else g_lab,
        self_index,
        ks,
        relevant,
        backend,
        chunk_size,
        progress,
        same_set=g is None,
    )
    nmi = f1 = None
    if clustering:  # the gallery (all images in leave-one-out mode)
        nmi, clusters = M.nmi(x if g is None else g, y if g_lab is None else g_lab, seed=seed)
        f1 = M.f1_score_pairwise(y if g_lab is None else g_lab, clusters)
    excluded = int((relevant <= 0).sum())
    return EvalResult(
        recall=recall,
        nmi=nmi,
        f1=f1,
        map_at_r=M.map_at_r(neighbor_labels, q_lab, relevant),
        r_precision=M.r_precision(neighbor_labels, q_lab, relevant),
        num_queries=len(q_lab) - excluded,
        num_classes=len(np.unique(y)),
        excluded_queries=excluded,
    )


def _checked_inputs(
    embeddings: torch.Tensor | np.ndarray, labels: Any, backend: str
) -> tuple[torch.Tensor, np.ndarray]:
    x = as_float_tensor(embeddings)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
    if len(x) == 0:
        raise GceError("no embeddings to evaluate")
    if len(y) != len(x):
        raise GceError(f"{len(x)} embeddings but {len(y)} labels")
    if len(x) < 2:
        raise GceError("evaluation needs at least two embeddings")
    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return x, y


def _retrieve(
    q: torch.Tensor,
    q_lab: np.ndarray,
    g: torch.Tensor | None,
    g_lab: np.ndarray,
    self_index: np.ndarray | None,
    ks: tuple[int, ...],
    relevant: np.ndarray,
    backend: str,
    chunk_size: int | None,
    progress: bool,
    *,
    same_set: bool,
) -> tuple[np.ndarray, dict[int, float]]:
    """Neighbour labels (``max R`` or more per query) and Recall@K (see :func:`evaluate_embeddings`)."""
    gallery = None if same_set else g
    gallery_labels = None if same_set else g_lab
    max_r = int(relevant.max(initial=0))
    if backend == "torch":
        found = knn_with_first_positive(
            q,
            q_lab,
            gallery,
            gallery_labels,
            k=max_r,
            self_index=self_index,
            max_rank=ks[-1],
            chunk_size=chunk_size,
            progress=progress,
            desc="retrieval",
        )
        assert found.first_positive_rank is not None  # always set by knn_with_first_positive
        return g_lab[found.indices.numpy()], M.recall_at_k_from_ranks(found.first_positive_rank, ks, relevant)
    found = exact_knn(q, gallery, k=max(ks[-1], max_r), backend="faiss", self_index=self_index)
    neighbor_labels = g_lab[found.indices.numpy()]
    return neighbor_labels, M.recall_at_k(neighbor_labels, q_lab, ks, relevant)


# ----------------------------------------------------------------------------------- extraction
def extract_embeddings(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``dataset`` in order: ``(embeddings float32 (N, D) on CPU, labels int64 (N,))``.

    Items are ``(image_tensor, label)``. The model runs in eval mode under ``torch.inference_mode``
    (its train/eval mode is restored afterwards); its output is used as is (the GCE model already
    L2-normalises each learner's slice).
    """
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise GceError(f"{desc}: the dataset is empty, nothing to embed")
    from tqdm.auto import tqdm

    on_gpu = torch.device(device).type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=on_gpu,
        worker_init_fn=loader_worker_ignores_sigterm if num_workers > 0 else None,
    )
    was_training = model.training
    model.eval()
    chunks, label_chunks = [], []
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
                out = model(images.to(device, non_blocking=True))
                if not isinstance(out, torch.Tensor) or out.ndim != 2:
                    raise GceError(
                        f"{desc}: the model must return an (N, D) tensor, got "
                        f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
                    )
                # Non-blocking on a GPU: the next batch is queued while this one is copied back.
                chunks.append(out.float().to("cpu", non_blocking=on_gpu))
                label_chunks.append(torch.as_tensor(labels).reshape(-1).to(torch.int64))
    finally:
        model.train(was_training)
    if not chunks:
        raise GceError(f"{desc}: the dataset is empty, nothing to embed")
    if on_gpu:  # the copies must have landed before the CPU reads them
        torch.cuda.synchronize(device)
    return torch.cat(chunks), torch.cat(label_chunks)
