"""Exact kNN against a brute-force reference: order, ties, self-exclusion by identity, backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gce.errors import GceError
from gce.evaluation.knn import exact_knn
from gce.evaluation.ranks import NO_POSITIVE, knn_with_first_positive
from gce.evaluation.topk import sorted_topk


def tie_heavy(n: int = 200, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Small-integer embeddings: every score is an exact integer in float32, so ties are exact
    (and identical however the matrix product is blocked), and some rows are exact duplicates."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    x[rng.choice(n, 40, replace=False)] = x[rng.choice(n, 40)]  # exact duplicates
    return x


def brute_scores(q: np.ndarray, g: np.ndarray, metric: str) -> list[list[float]]:
    """Score matrix by pure Python loops (larger = nearer)."""
    rows = []
    for a in q.tolist():
        row = []
        for b in g.tolist():
            if metric == "cosine":
                row.append(sum(x * y for x, y in zip(a, b, strict=True)))
            else:
                row.append(-sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
        rows.append(row)
    return rows


def brute_order(scores: list[list[float]], self_index: list[int] | None) -> list[list[int]]:
    """Full neighbour order per query: key (-score, index), own index removed."""
    out = []
    for i, row in enumerate(scores):
        cands = [j for j in range(len(row)) if self_index is None or j != self_index[i]]
        out.append(sorted(cands, key=lambda j: (-row[j], j)))
    return out


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return tie_heavy()


@pytest.fixture(scope="module")
def orders(data: np.ndarray) -> dict[str, list[list[int]]]:
    return {m: brute_order(brute_scores(data, data, m), list(range(len(data)))) for m in ("cosine", "euclidean")}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 5, 37, 199])
def test_same_set_matches_brute_force_including_tie_order(data, orders, metric, k, symmetric):
    # odd chunk size: several blocks, and symmetric tiles smaller than k
    res = exact_knn(data, k=k, metric=metric, chunk_size=13, symmetric=symmetric)
    expected = [o[:k] for o in orders[metric]]
    assert res.indices.tolist() == expected
    # scores are the brute-force scores of those neighbours (squared distance for euclidean)
    s = np.asarray(brute_scores(data, data, metric))
    want = np.take_along_axis(s, np.asarray(expected), 1)
    assert np.array_equal(res.scores.numpy(), want if metric == "cosine" else -want)


def test_data_really_has_boundary_ties(data):
    """Guard for the test above: ties must straddle the k-th position for many queries."""
    s = np.asarray(brute_scores(data, data, "cosine"))
    np.fill_diagonal(s, -np.inf)
    top = -np.sort(-s, axis=1)
    assert (top[:, 4] == top[:, 5]).mean() > 0.5


@pytest.mark.parametrize("symmetric", [True, False])
def test_chunk_size_does_not_change_results(data, symmetric):
    a = exact_knn(data, k=10, chunk_size=1 if not symmetric else 6, symmetric=symmetric)
    b = exact_knn(data, k=10, chunk_size=1000, symmetric=symmetric)
    c = exact_knn(data, k=10, memory_budget=4 * 200 * 7, symmetric=symmetric)  # 7-row blocks / 20-row tiles
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, c.indices)


def test_self_excluded_by_identity_not_position():
    # Items 0, 2 and 3 are identical. Item 3's nearest neighbours are its duplicates 0 and 2 (score 1,
    # same as itself); dropping "the first neighbour" would wrongly drop item 0 instead of item 3.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    res = exact_knn(x, k=3)
    assert res.indices[3].tolist() == [0, 2, 4]
    assert res.indices[0].tolist() == [2, 3, 4]
    assert all(i not in row for i, row in enumerate(res.indices.tolist()))


def test_query_gallery_mode_excludes_nothing_by_default(data):
    q, g = data[:50], data[50:]
    res = exact_knn(q, g, k=20, chunk_size=9)
    expected = [o[:20] for o in brute_order(brute_scores(q, g, "cosine"), None)]
    assert res.indices.tolist() == expected


def test_query_gallery_mode_with_self_index(data):
    q, g = data[:30], data[20:]  # queries 20..29 are gallery items 0..9
    own = np.array([-1] * 20 + list(range(10)))
    res = exact_knn(q, g, k=15, self_index=own, chunk_size=8)
    expected = [o[:15] for o in brute_order(brute_scores(q, g, "cosine"), own.tolist())]
    assert res.indices.tolist() == expected


def test_k_is_capped_by_the_number_of_candidates(data):
    assert exact_knn(data[:5], k=50).indices.shape == (5, 4)
    assert exact_knn(data[:5], data[5:8], k=50).indices.shape == (5, 3)


def test_sorted_topk_boundary_tie_takes_smallest_indices():
    block = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0, 9.0, 2.0]])
    values, indices = sorted_topk(block, 3)
    assert indices.tolist() == [[1, 2, 3], [4, 0, 1]]
    assert values.tolist() == [[2.0, 2.0, 2.0], [9.0, 2.0, 2.0]]


def test_sorted_topk_random_ties_against_python_sort():
    gen = torch.Generator().manual_seed(1)
    block = torch.randint(0, 4, (300, 50), generator=gen).float()
    for k in (1, 7, 49, 50):
        _, idx = sorted_topk(block, k)
        expected = [sorted(range(50), key=lambda j, r=r: (-r[j], j))[:k] for r in block.tolist()]
        assert idx.tolist() == expected


@pytest.mark.parametrize("same_set", [True, False])
def test_faiss_backend_equals_torch_backend(same_set):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = (x, None) if same_set else (x[:100], x[100:])
    for metric in ("cosine", "euclidean"):
        a = exact_knn(q, g, k=25, metric=metric)
        b = exact_knn(q, g, k=25, metric=metric, backend="faiss")
        assert torch.equal(a.indices, b.indices)
        # Same float32 vectors, other products (16 dims, unit vectors): <= 16 * 2**-24 * 2 per score (2e-6).
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_faiss_backend_on_ties_same_scores_and_self_removed(data):
    pytest.importorskip("faiss")
    a = exact_knn(data, k=10)
    b = exact_knn(data, k=10, backend="faiss")
    assert torch.equal(a.scores, b.scores)  # same multiset of scores per row (ties may differ)
    assert all(i not in row for i, row in enumerate(b.indices.tolist()))
    # wherever no tie straddles position 10, the lists must be identical
    s = np.asarray(brute_scores(data, data, "cosine"))
    order = brute_order(s.tolist(), list(range(len(data))))
    clean = [s[i][o[9]] != s[i][o[10]] for i, o in enumerate(order)]
    assert any(clean)
    assert all(a.indices[i].tolist() == b.indices[i].tolist() for i in np.flatnonzero(clean))


def brute_first_positive_rank(order: list[list[int]], labels_q: np.ndarray, labels_g: np.ndarray) -> list[int]:
    ranks = []
    for i, o in enumerate(order):
        pos = [r for r, j in enumerate(o, start=1) if labels_g[j] == labels_q[i]]
        ranks.append(pos[0] if pos else int(NO_POSITIVE))
    return ranks


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3, 12])
def test_first_positive_rank_matches_brute_force(data, orders, k, symmetric):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 40, len(data))
    labels[:3] = [1000, 1001, 1002]  # lone classes: no positive at all
    res = knn_with_first_positive(data, labels, k=k, chunk_size=11, symmetric=symmetric)
    assert res.first_positive_rank.tolist() == brute_first_positive_rank(orders["cosine"], labels, labels)
    assert res.indices.tolist() == [o[:k] for o in orders["cosine"]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_first_positive_rank_capped_at_max_rank(data, orders, symmetric):
    labels = np.random.default_rng(7).integers(0, 50, len(data))
    want = brute_first_positive_rank(orders["cosine"], labels, labels)
    res = knn_with_first_positive(data, labels, k=3, max_rank=3, chunk_size=32, symmetric=symmetric)
    assert res.first_positive_rank.tolist() == [r if r <= 3 or r == NO_POSITIVE else 4 for r in want]


def test_first_positive_rank_query_gallery_and_capped_rank(data):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 60, len(data))
    q, g, ql, gl = data[:70], data[70:], labels[:70], labels[70:]
    order = brute_order(brute_scores(q, g, "cosine"), None)
    want = brute_first_positive_rank(order, ql, gl)
    full = knn_with_first_positive(q, ql, g, gl, k=4, chunk_size=16)
    assert full.first_positive_rank.tolist() == want
    capped = knn_with_first_positive(q, ql, g, gl, k=4, max_rank=4)
    assert capped.first_positive_rank.tolist() == [r if r <= 4 or r == NO_POSITIVE else 5 for r in want]


def test_non_finite_embeddings_are_reported():
    x = torch.zeros(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(GceError, match="NaN"):
        exact_knn(x, k=1)
