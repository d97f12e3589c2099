"""Exact k-nearest-neighbour search with bounded memory and a deterministic order.

Ordering (the single convention used by every metric in :mod:`gce.evaluation`)
-------------------------------------------------------------------------------
For a query ``q`` the gallery items ``g`` are ranked by the key ``(-score(q, g), g)``: higher score
first and, among exactly equal scores, the **smaller gallery index first**. The score is

* ``metric="cosine"``: the inner product ``<q, g>`` (callers L2-normalise the embeddings, so this is
  the cosine similarity);
* ``metric="euclidean"``: ``-||q - g||^2``, computed from inner products as
  ``-(||q||^2 - 2 <q, g> + ||g||^2)`` (the constant ``||q||^2`` does not change the order).

A query that is itself a gallery item (leave-one-out retrieval, or an image that is both query and
gallery) never retrieves **itself**: its own gallery index is removed by identity, i.e. its score is
set to ``-inf`` by index before the top-k. Exact duplicates of the query (other images with the same
embedding) are legitimate neighbours and are kept; dropping "the first neighbour" instead would drop
one of them, or a different item, whenever ties occur.

Memory and speed
----------------
Scores are computed one block of query rows at a time: ``block = Q[rows] @ G.T`` with as many rows
as fit ``memory_budget`` bytes (256 MiB by default, so a 60k gallery gives ~1,100 rows per block);
the ``N x N`` matrix is never materialised. ``torch.topk`` is not stable, so each block's top-k is
re-sorted by ``(-score, index)`` and a tie that straddles the k-th position is resolved by index too
(see :func:`sorted_topk`).

Leave-one-out cosine search (CUB, Cars, SOP) uses the symmetry ``<x_i, x_j> = <x_j, x_i>``: only the
tiles ``X[I] @ X[J].T`` with ``J >= I`` are computed, and each tile feeds the running top-k of the
rows ``I`` and (transposed) of the rows ``J``. This halves the matrix products, which dominate the
cost. Every pair's score is computed once, so both rows see the same value.

Each query's **first-positive rank** (1 + the number of gallery items ranked before the best
same-class item) is all that Recall@K needs, so Recall@1000 on SOP costs no top-1000 (see
:func:`gce.evaluation.ranks.knn_with_first_positive`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from gce.config.vocabulary import EVAL_BACKENDS, EvalBackend
from gce.errors import GceError
from gce.evaluation.knn_faiss import faiss_knn
from gce.evaluation.topk import KnnResult, sort_by_score_then_index, sorted_topk

Metric = Literal["cosine", "euclidean"]
Backend = EvalBackend
BACKENDS: tuple[str, ...] = EVAL_BACKENDS

#: Bytes one block of scores (chunk rows x gallery size x 4) may take. Temporaries of the rank pass
#: (boolean masks, a row subset) add at most about 1.5x this on top.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


# ----------------------------------------------------------------------------------------- inputs
def as_float_tensor(x: torch.Tensor | np.ndarray, name: str = "embeddings") -> torch.Tensor:
    """A contiguous float32 CPU copy-or-view of ``x``, checked to be 2-D and finite."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float32).contiguous()
    if t.ndim != 2:
        raise GceError(f"{name} must be a 2-D (N, D) array, got shape {tuple(t.shape)}")
    if not np.isfinite(t.numpy()).all():  # numpy: ~40x faster than torch.isfinite(...).all() on CPU
        raise GceError(f"{name} contain NaN or infinite values (did training diverge?)")
    return t


def _self_index(
    n_query: int, n_gallery: int, self_index: torch.Tensor | np.ndarray | None, same_set: bool
) -> torch.Tensor | None:
    """Per query, the gallery index of the query itself (-1 if it is not in the gallery)."""
    if same_set:
        return torch.arange(n_query, dtype=torch.int64)
    if self_index is None:
        return None
    s = torch.as_tensor(np.asarray(self_index), dtype=torch.int64)
    if s.shape != (n_query,) or bool(((s < -1) | (s >= n_gallery)).any()):
        raise ValueError("self_index must hold, per query, a gallery index or -1")
    return s


def prepare_inputs(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None,
    self_index: torch.Tensor | np.ndarray | None,
    k: int,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool]:
    """Checked ``(query, gallery, self_index, k capped, same_set)`` for the searches below."""
    _check_metric(metric)
    q = as_float_tensor(query, "query embeddings")
    same_set = gallery is None
    g = q if gallery is None else as_float_tensor(gallery, "gallery embeddings")
    if q.shape[1] != g.shape[1]:
        raise GceError(f"query dimension {q.shape[1]} != gallery dimension {g.shape[1]}")
    own = _self_index(len(q), len(g), self_index, same_set)
    return q, g, own, max(0, min(int(k), candidates_per_query(len(g), own))), same_set


def _check_metric(metric: str) -> None:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def candidates_per_query(n_gallery: int, self_index: torch.Tensor | None) -> int:
    """How many neighbours every query is guaranteed to have (the gallery, minus itself)."""
    has_self = self_index is not None and bool((self_index >= 0).any())
    return n_gallery - int(has_self)


def auto_chunk_size(n_gallery: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Query rows per block so that a float32 ``rows x n_gallery`` block fits ``memory_budget``."""
    return max(1, min(65536, memory_budget // (4 * max(1, n_gallery))))


# ----------------------------------------------------------------------------------- score blocks
def score_blocks(
    query: torch.Tensor,
    gallery: torch.Tensor,
    *,
    metric: Metric = "cosine",
    self_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)`` with ``block[i, j] = score(query[start + i], gallery[j])``.

    Larger scores are nearer (see the module docstring). The query's own gallery item (from
    ``self_index``) gets ``-inf`` so that it is excluded by identity. The block is one reused
    buffer (fresh 256 MiB allocations cost page faults every time): use it before the next one.
    """
    _check_metric(metric)
    rows = min(chunk_size or auto_chunk_size(len(gallery), memory_budget), max(1, len(query)))
    gallery_t = gallery.t()
    # -||g||^2 enters every row of a Euclidean block; computing it once keeps the block a single addmm.
    neg_sq_norms = -(gallery * gallery).sum(1) if metric == "euclidean" else None
    buffer = torch.empty(rows, len(gallery))
    for start in range(0, len(query), rows):
        stop = min(start + rows, len(query))
        block = buffer[: stop - start]
        if neg_sq_norms is None:
            torch.mm(query[start:stop], gallery_t, out=block)
        else:
            torch.addmm(neg_sq_norms, query[start:stop], gallery_t, beta=1.0, alpha=2.0, out=block)
        if self_index is not None:
            own = self_index[start:stop]
            rows_with_self = torch.nonzero(own >= 0).squeeze(1)
            block[rows_with_self, own[rows_with_self]] = float("-inf")
        yield start, stop, block


def symmetric_topk(
    x: torch.Tensor,
    k: int,
    *,
    tile: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    desc: str = "kNN",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out top-``k`` inner products of the rows of ``x``, in ``(-score, index)`` order.

    Only the tiles ``x[I] @ x[J].T`` with ``J >= I`` are computed (half the flops of the full
    product). A tile's row-wise top-k updates rows ``I``, its column-wise top-k rows ``J``; the
    running lists are merged by ``(-score, index)``. Because every per-tile list is exact under
    that order (:func:`sorted_topk`), so is the merge: the global top-k of a row is the top-k of
    the union of its per-tile top-k. ``tile`` rows/columns default to two float32 ``tile x tile``
    buffers (the tile and its transpose) within ``memory_budget``.
    """
    n = len(x)
    if k == 0 or n == 0:
        return torch.empty(n, 0), torch.empty(n, 0, dtype=torch.int64)
    tile = min(tile or max(1, int((memory_budget / 8) ** 0.5)), n)
    # Sentinels: score -inf and index n sort after every real neighbour.
    values = torch.full((n, k), float("-inf"))
    indices = torch.full((n, k), n, dtype=torch.int64)
    buffer, transposed = torch.empty(tile * tile), torch.empty(tile * tile)
    starts = list(range(0, n, tile))
    from tqdm.auto import tqdm  # only for the optional progress bar

    bar = tqdm(
        total=len(starts) * (len(starts) + 1) // 2, desc=desc, disable=not progress, leave=False, dynamic_ncols=True
    )
    for a in starts:
        rows = slice(a, min(a + tile, n))
        for b in starts[a // tile :]:
            cols = slice(b, min(b + tile, n))
            block = _contiguous_view(buffer, rows.stop - a, cols.stop - b)
            torch.mm(x[rows], x[cols].t(), out=block)
            if a == b:  # self-exclusion by identity; the diagonal tile is its own transpose
                block.fill_diagonal_(float("-inf"))
            _merge_into(values, indices, rows, *sorted_topk(block, min(k, block.shape[1])), offset=b)
            if a != b:
                block_t = _contiguous_view(transposed, block.shape[1], block.shape[0])
                block_t.copy_(block.t())  # topk over a contiguous copy is ~2x faster than strided
                _merge_into(values, indices, cols, *sorted_topk(block_t, min(k, block.shape[0])), offset=a)
            bar.update(1)
    bar.close()
    return values, indices


def _contiguous_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``rows x cols`` matrix on the front of a flat buffer (a strided slice of a
    square buffer would make ``mm(out=...)`` compute into a temporary and copy)."""
    return buffer[: rows * cols].view(rows, cols)


def _merge_into(
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: slice,
    new_values: torch.Tensor,
    new_indices: torch.Tensor,
    offset: int,
) -> None:
    """Merge a tile's sorted top-k into the running lists of ``rows`` (order ``(-score, index)``)."""
    k = values.shape[1]
    merged_v, merged_i = sort_by_score_then_index(
        torch.cat([values[rows], new_values], 1), torch.cat([indices[rows], new_indices + offset], 1)
    )
    values[rows], indices[rows] = merged_v[:, :k], merged_i[:, :k]


def output_scores(values: torch.Tensor, query_rows: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Block scores -> reported scores (cosine similarity, or squared distance >= 0)."""
    if metric == "cosine":
        return values
    sq = (query_rows * query_rows).sum(1, keepdim=True)
    return (sq - values).clamp_min_(0.0)


# ------------------------------------------------------------------------------------ public knn
def exact_knn(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    k: int = 10,
    *,
    metric: Metric = "cosine",
    backend: Backend = "torch",
    self_index: torch.Tensor | np.ndarray | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    symmetric: bool = True,
) -> KnnResult:
    """Exact ``k`` nearest gallery items of every query, nearest first.

    ``gallery=None``: leave-one-out search within ``query`` (each item excluded by identity).
    With a gallery, ``self_index`` may give, per query, the gallery index of the same image (or -1),
    to be excluded the same way; by default nothing is excluded (In-Shop: queries and gallery are
    different images). ``k`` is capped at the number of candidates (gallery size, minus one when a
    query can be in the gallery).

    ``backend="torch"``: blocked matrix products, ties ordered by gallery index everywhere; with
    ``symmetric`` (default) leave-one-out cosine search computes only half of the products
    (:func:`symmetric_topk`; ``chunk_size`` is then the tile size). Both give identical results.
    ``backend="faiss"``: ``IndexFlatIP``/``IndexFlatL2`` exact search for ``k + 1`` neighbours, the
    query's own index removed wherever it appears (else the last one dropped); the list is then
    re-sorted by ``(-score, index)``, but a tie straddling the k-th position follows faiss' order.

    >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> exact_knn(x, k=1).indices.tolist()   # item 0's duplicate (item 1) is its neighbour, and vice versa
    [[1], [0], [0]]
    """
    q, g, own, k, same_set = prepare_inputs(query, gallery, self_index, k, metric)
    if backend == "faiss":
        return faiss_knn(q, g, k, metric, own)
    if backend != "torch":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if same_set and symmetric and metric == "cosine":
        values, indices = symmetric_topk(q, k, tile=chunk_size, memory_budget=memory_budget)
        return KnnResult(indices=indices, scores=values)
    all_values, all_indices = [], []
    for start, stop, block in score_blocks(
        q, g, metric=metric, self_index=own, chunk_size=chunk_size, memory_budget=memory_budget
    ):
        values, indices = sorted_topk(block, k)
        all_values.append(output_scores(values, q[start:stop], metric))
        all_indices.append(indices)
    return KnnResult(indices=concat_rows(all_indices, k, torch.int64), scores=concat_rows(all_values, k, torch.float32))


def concat_rows(parts: list[torch.Tensor], k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=dtype)
