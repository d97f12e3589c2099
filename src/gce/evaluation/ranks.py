"""Each query's first-positive rank (1 + the gallery items ranked before its best same-class item):
all Recall@K needs, so Recall@1000 on SOP costs no top-1000 list."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gce.errors import GceError
from gce.evaluation.knn import (
    DEFAULT_MEMORY_BUDGET,
    Metric,
    concat_rows,
    output_scores,
    prepare_inputs,
    score_blocks,
    symmetric_topk,
)
from gce.evaluation.topk import KnnResult, sorted_topk

__all__ = ["NO_POSITIVE", "first_positive_rank", "knn_with_first_positive"]

#: First-positive rank of a query that has no same-class gallery item at all.
NO_POSITIVE = np.iinfo(np.int64).max


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
    q, g, own, k, same_set = prepare_inputs(query, gallery, self_index, k, metric)
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
        out_v.append(output_scores(values, q[start:stop], metric))
        out_i.append(indices)
        out_r.append(torch.from_numpy(rank))
        bar.update(stop - start)
    bar.close()
    return KnnResult(
        indices=concat_rows(out_i, k, torch.int64),
        scores=concat_rows(out_v, k, torch.float32),
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
