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
:func:`knn_with_first_positive`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gce.config.vocabulary import EVAL_BACKENDS, EvalBackend
from gce.errors import GceError

Metric = Literal["cosine", "euclidean"]
Backend = EvalBackend
BACKENDS: tuple[str, ...] = EVAL_BACKENDS

#: Bytes one block of scores (chunk rows x gallery size x 4) may take. Temporaries of the rank pass
#: (boolean masks, a row subset) add at most about 1.5x this on top.
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: First-positive rank of a query that has no same-class gallery item at all.
NO_POSITIVE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class KnnResult:
    """Neighbours of each query, nearest first, in the ``(-score, index)`` order.

    ``indices``: ``(n_query, k)`` int64 gallery indices. ``scores``: ``(n_query, k)`` float32, the
    cosine similarity for ``metric="cosine"`` and the squared Euclidean distance for
    ``metric="euclidean"``. ``first_positive_rank`` (only from :func:`knn_with_first_positive`):
    ``(n_query,)`` int64, 1-based rank of the best same-class gallery item in the full ordering,
    :data:`NO_POSITIVE` where the query has none.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    first_positive_rank: torch.Tensor | None = None


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


def _prepare(
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


def _to_output_scores(values: torch.Tensor, query_rows: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Block scores -> reported scores (cosine similarity, or squared distance >= 0)."""
    if metric == "cosine":
        return values
    sq = (query_rows * query_rows).sum(1, keepdim=True)
    return (sq - values).clamp_min_(0.0)


# ------------------------------------------------------------------------------- deterministic top-k
def sort_by_score_then_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by ``(-value, index)``: a stable descending sort after an index sort."""
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm)
    values, perm = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


def sorted_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of every row of ``block`` in the ``(-value, index)`` order.

    ``torch.topk`` returns *some* k largest values with ties in unspecified order. Asking for
    ``k + 1`` tells us, per row, whether the k-th and (k+1)-th values are equal. Where they differ
    the top-k *set* is unambiguous and only its order needs fixing. Where they are equal (a tie
    straddles the boundary) the row is recomputed exactly: every value above the k-th value, then
    the tied values by increasing column index until k are taken. Real-valued embeddings almost never
    produce such rows, so the common path costs one ``topk`` and two tiny sorts.
    """
    n_rows, n_cols = block.shape
    if k == 0 or n_rows == 0:
        return block.new_empty(n_rows, 0), torch.empty(n_rows, 0, dtype=torch.int64)
    if k > n_cols:
        raise ValueError(f"k={k} exceeds the {n_cols} gallery items")
    probe = min(k + 1, n_cols)
    values, indices = torch.topk(block, probe, dim=1, largest=True, sorted=True)
    if probe > k:
        boundary_tie = values[:, k - 1] == values[:, k]
        values, indices = values[:, :k], indices[:, :k]
        tied_rows = torch.nonzero(boundary_tie).squeeze(1)
        if len(tied_rows):
            values, indices = values.clone(), indices.clone()
            tv, ti = _topk_with_index_tiebreak(block[tied_rows], values[tied_rows, k - 1], k)
            values[tied_rows], indices[tied_rows] = tv, ti
    return sort_by_score_then_index(values, indices)


def _topk_with_index_tiebreak(rows: torch.Tensor, kth: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of rows whose k-th value ``kth`` is tied: all ``> kth``, then ``== kth`` by index."""
    above = rows > kth[:, None]
    tied = rows == kth[:, None]
    need = k - above.sum(1, keepdim=True)  # how many tied values each row still takes
    take = above | (tied & (tied.cumsum(1) <= need))  # cumsum over columns = index order
    cols = torch.nonzero(take)[:, 1].view(len(rows), k)  # exactly k per row, by construction
    return rows.gather(1, cols), cols


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
    q, g, own, k, same_set = _prepare(query, gallery, self_index, k, metric)
    if backend == "faiss":
        return _faiss_knn(q, g, k, metric, own)
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
        all_values.append(_to_output_scores(values, q[start:stop], metric))
        all_indices.append(indices)
    return KnnResult(indices=_cat(all_indices, k, torch.int64), scores=_cat(all_values, k, torch.float32))


def _cat(parts: list[torch.Tensor], k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=dtype)


def _faiss_knn(q: torch.Tensor, g: torch.Tensor, k: int, metric: Metric, own: torch.Tensor | None) -> KnnResult:
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
        dist, idx = _drop_self(dist, idx, own, k)
    # faiss' order among equal scores is unspecified; impose (-score, index) within the list.
    key = dist if metric == "cosine" else -dist
    key, idx = sort_by_score_then_index(key, idx)
    return KnnResult(indices=idx, scores=key if metric == "cosine" else -key)


def _drop_self(dist: torch.Tensor, idx: torch.Tensor, own: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove one column per row: the query's own index where present, else the last column."""
    drop = idx == own[:, None]
    missing = ~drop.any(1)
    drop[missing, -1] = True
    first = drop.int().argmax(1, keepdim=True)  # a faiss list holds each index at most once
    keep = torch.ones_like(drop).scatter_(1, first, False)
    return dist[keep].view(len(idx), -1)[:, :k], idx[keep].view(len(idx), -1)[:, :k]


# --------------------------------------------------------------- neighbours + first-positive rank
def knn_with_first_positive(
    query: torch.Tensor | np.ndarray,
    query_labels: np.ndarray | torch.Tensor,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: np.ndarray | torch.Tensor | None = None,
    k: int = 10,
    *,
    metric: Metric = "cosine",
    self_index: torch.Tensor | np.ndarray | None = None,
    max_rank: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    symmetric: bool = True,
    progress: bool = False,
    desc: str = "kNN",
) -> KnnResult:
    """:func:`exact_knn` (torch backend) plus each query's first-positive rank, from the same blocks.

    The first-positive rank of query ``q`` is its position (1-based) of the first same-class item
    in the full ``(-score, index)`` order over all candidates (the query itself excluded):

        p*   = the positive with the highest score, the smallest index among equal scores
        rank = 1 + #{g : s(q,g) > s(q,p*)} + #{g : s(q,g) = s(q,p*), g < p*}

    so that Recall@K = [rank <= K] for every K at once. If a positive is among the ``k`` returned
    neighbours the rank is read off the list. Otherwise, if ``max_rank`` (the largest K of interest,
    default: no limit) exceeds ``k``, the rank is counted on the block row (two comparisons and a
    sum); if it does not, the rank is only known to exceed ``k`` and ``k + 1`` is reported.
    Queries without any same-class candidate get :data:`NO_POSITIVE`.

    Leave-one-out cosine search with ``symmetric`` (default) finds the lists with
    :func:`symmetric_topk` and then recomputes only the rows that need counting. Their scores come
    from a differently shaped product and may differ in the last bit, so such a rank is clamped to
    at least ``k + 1``: the lists and the ranks never contradict each other.
    """
    q, g, own, k, same_set = _prepare(query, gallery, self_index, k, metric)
    q_lab = _labels(query_labels)
    g_lab = q_lab if same_set else _labels(gallery_labels)
    if len(q_lab) != len(q) or len(g_lab) != len(g):
        raise GceError("embeddings and labels have different lengths")
    members = _ClassMembers(g_lab)
    has_positive = members.count_of(q_lab) > _is_own_class(own, q_lab, g_lab)
    count_beyond_list = max_rank is None or max_rank > k
    if same_set and symmetric and metric == "cosine":
        return _symmetric_with_rank(
            q, q_lab, k, members, has_positive, count_beyond_list, chunk_size, memory_budget, progress, desc
        )
    from tqdm.auto import tqdm  # only for the optional progress bar

    bar = tqdm(total=len(q), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    out_v, out_i, out_r = [], [], []
    for start, stop, block in score_blocks(
        q, g, metric=metric, self_index=own, chunk_size=chunk_size, memory_budget=memory_budget
    ):
        values, indices = sorted_topk(block, k)
        labels = q_lab[start:stop]
        rank, unresolved = _ranks_in_lists(g_lab[indices.numpy()], labels, has_positive[start:stop])
        if len(unresolved):
            rank[unresolved] = (
                _rank_by_counting(block.numpy(), unresolved, labels[unresolved], members)
                if count_beyond_list
                else k + 1
            )
        out_v.append(_to_output_scores(values, q[start:stop], metric))
        out_i.append(indices)
        out_r.append(torch.from_numpy(rank))
        bar.update(stop - start)
    bar.close()
    return KnnResult(
        indices=_cat(out_i, k, torch.int64),
        scores=_cat(out_v, k, torch.float32),
        first_positive_rank=torch.cat(out_r) if out_r else torch.empty(0, dtype=torch.int64),
    )


def _symmetric_with_rank(
    x: torch.Tensor,
    labels: np.ndarray,
    k: int,
    members: _ClassMembers,
    has_positive: np.ndarray,
    count_beyond_list: bool,
    chunk_size: int | None,
    memory_budget: int,
    progress: bool,
    desc: str,
) -> KnnResult:
    values, indices = symmetric_topk(x, k, tile=chunk_size, memory_budget=memory_budget, progress=progress, desc=desc)
    rank, unresolved = _ranks_in_lists(labels[indices.numpy()], labels, has_positive)
    if len(unresolved) and count_beyond_list:
        own = torch.from_numpy(unresolved)
        for start, stop, block in score_blocks(
            x[own], x, self_index=own, chunk_size=chunk_size, memory_budget=memory_budget
        ):
            part = unresolved[start:stop]
            counted = _rank_by_counting(block.numpy(), np.arange(stop - start), labels[part], members)
            rank[part] = np.maximum(counted, k + 1)
    elif len(unresolved):
        rank[unresolved] = k + 1
    return KnnResult(indices=indices, scores=values, first_positive_rank=torch.from_numpy(rank))


# The bookkeeping below is numpy: on CPU it is 10-100x faster than torch for these small integer
# operations (unique, argsort, boolean counts), and the block is shared with torch without a copy.
def _labels(labels: np.ndarray | torch.Tensor | Sequence[int] | None) -> np.ndarray:
    if labels is None:
        raise GceError("gallery_labels are needed with a gallery")
    t = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return t.astype(np.int64).reshape(-1)


def _is_own_class(own: torch.Tensor | None, q_lab: np.ndarray, g_lab: np.ndarray) -> np.ndarray:
    """1 where the query is itself a gallery item of its own class (so one class member is not a
    candidate), else 0."""
    same = np.zeros(len(q_lab), dtype=np.int64)
    if own is not None:
        o = own.numpy()
        inside = o >= 0
        same[inside] = g_lab[o[inside]] == q_lab[inside]
    return same


def first_positive_rank(
    neighbor_labels: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    query_labels: np.ndarray | torch.Tensor | Sequence[int],
) -> np.ndarray:
    """1-based position of the first same-class item in each list, :data:`NO_POSITIVE` if none.

    >>> first_positive_rank(np.array([[3, 0, 0], [2, 2, 2]]), np.array([0, 1])).tolist()[0]
    2
    """
    lists = neighbor_labels.cpu().numpy() if isinstance(neighbor_labels, torch.Tensor) else np.asarray(neighbor_labels)
    hit = lists == _labels(query_labels)[:, None]
    if hit.shape[1] == 0:
        return np.full(len(hit), NO_POSITIVE, dtype=np.int64)
    rank = hit.argmax(1).astype(np.int64) + 1  # argmax: the first True
    return np.where(hit.any(1), rank, NO_POSITIVE)


def _ranks_in_lists(
    neighbor_labels: np.ndarray, labels: np.ndarray, has_positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks read off the lists, and the rows with a positive somewhere beyond their list."""
    rank = first_positive_rank(neighbor_labels, labels)
    return rank, np.flatnonzero(has_positive & (rank == NO_POSITIVE))


class _ClassMembers:
    """Gallery indices grouped by class (CSR layout), to gather a query's positives cheaply."""

    def __init__(self, gallery_labels: np.ndarray) -> None:
        self.order = np.argsort(gallery_labels, kind="stable")
        self.classes, self.counts = np.unique(gallery_labels, return_counts=True)
        self.offsets = np.cumsum(self.counts) - self.counts

    def _slot(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each label's class in ``classes`` and whether the class is in the gallery."""
        if len(self.classes) == 0:
            return np.zeros(len(labels), dtype=np.int64), np.zeros(len(labels), dtype=bool)
        slot = np.minimum(np.searchsorted(self.classes, labels), len(self.classes) - 1)
        return slot, self.classes[slot] == labels

    def count_of(self, labels: np.ndarray) -> np.ndarray:
        """Number of gallery items of each label's class."""
        slot, present = self._slot(labels)
        return np.where(present, self.counts[slot] if len(self.counts) else 0, 0).astype(np.int64)

    def positives(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, gallery_index)`` pairs, grouped by row: every gallery item of ``labels[row]``'s class."""
        slot, _ = self._slot(labels)
        counts = self.count_of(labels)
        rows = np.repeat(np.arange(len(labels)), counts)
        # position within the class run: 0..count-1 for each row, then shift to the class' offset
        within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.order[self.offsets[slot][rows] + within]


def _best_positive(
    a: np.ndarray, rows: np.ndarray, labels: np.ndarray, members: _ClassMembers
) -> tuple[np.ndarray, np.ndarray]:
    """For block rows ``rows`` (each with at least one positive besides itself): the best positive's
    score and its gallery index (the smallest index among equal scores)."""
    seg, cols = members.positives(labels)
    vals = a[rows[seg], cols]  # the query itself is -inf here, so it never wins
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])  # one segment per row, in order
    best = np.maximum.reduceat(vals, starts)
    at_best = np.where(vals == best[seg], cols, a.shape[1])
    return best, np.minimum.reduceat(at_best, starts)


def _rank_by_counting(a: np.ndarray, rows: np.ndarray, labels: np.ndarray, members: _ClassMembers) -> np.ndarray:
    """Exact first-positive rank of block rows ``rows`` (``labels``: theirs; all have a positive).

    rank = 1 + #{s > s*} + #{s = s*, index < p*}. The last term needs a third pass, so it is only
    computed for rows where some other item scores exactly s* (rare with real-valued embeddings).
    The counts run in numpy: ``np.count_nonzero(a > t, axis=1)`` is ~5x faster than torch's boolean
    ``sum`` on CPU, which would otherwise cost more than the matrix product itself.
    """
    best, best_index = _best_positive(a, rows, labels, members)
    if 2 * len(rows) >= len(a):  # most rows: scan the block in place rather than copy a subset
        threshold = np.full((len(a), 1), np.inf, dtype=a.dtype)  # +inf: nothing counted in other rows
        threshold[rows, 0] = best
        greater = np.count_nonzero(a > threshold, axis=1)[rows]
        ties = np.count_nonzero(a == threshold, axis=1)[rows]
    else:
        sub, threshold = a[rows], best[:, None]
        greater = np.count_nonzero(sub > threshold, axis=1)
        ties = np.count_nonzero(sub == threshold, axis=1)
    rank = 1 + greater.astype(np.int64)
    tied = np.flatnonzero(ties > 1)  # ties includes p* itself
    if len(tied):  # equal scores: items with a smaller index than p* come first
        cols = np.arange(a.shape[1])[None, :]
        before = (a[rows[tied]] == best[tied, None]) & (cols < best_index[tied, None])
        rank[tied] += np.count_nonzero(before, axis=1)
    return rank
