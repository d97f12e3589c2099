"""The one ordering of every neighbour list: by ``(-score, index)``, ties resolved by the smaller
gallery index, whatever order ``torch.topk`` or faiss returned them in; and the result type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KnnResult", "sort_by_score_then_index", "sorted_topk"]


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
