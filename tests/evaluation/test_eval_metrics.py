"""Retrieval and clustering metrics against brute-force loops and pytorch-metric-learning."""

from __future__ import annotations

import doctest
import itertools
import logging

import numpy as np
import pytest
import torch

import gce.evaluation.evaluator as evaluator_module
import gce.evaluation.knn as knn_module
import gce.evaluation.metrics as metrics_module
import gce.evaluation.ranks as ranks_module
import gce.evaluation.topk as topk_module
from gce.evaluation import evaluate_embeddings
from gce.evaluation.metrics import (
    f1_score_pairwise,
    map_at_r,
    nmi,
    num_relevant,
    r_precision,
    recall_at_k,
)

KS = (1, 2, 4, 8, 16, 1000)


# ------------------------------------------------------------------------------ brute force
def brute_retrieval(x: np.ndarray, labels: np.ndarray, ks=KS, query_rows=None, gallery_rows=None) -> dict:
    """Recall@K, MAP@R, R-Precision by loops over the full score matrix.

    Order: (-score, gallery index); the query's own image is removed by identity; queries with
    R = 0 are skipped (and counted).
    """
    n = len(x)
    qs = list(range(n)) if query_rows is None else list(query_rows)
    gs = list(range(n)) if gallery_rows is None else list(gallery_rows)
    hits = {k: [] for k in ks}
    aps, rps, excluded = [], [], 0
    for q in qs:
        score = {g: float(np.dot(x[q], x[g])) for g in gs if g != q}
        order = sorted(score, key=lambda g: (-score[g], gs.index(g)))
        rel = [labels[g] == labels[q] for g in order]
        r = sum(rel)
        if r == 0:
            excluded += 1
            continue
        for k in ks:
            hits[k].append(any(rel[:k]))
        rps.append(sum(rel[:r]) / r)
        ap, found = 0.0, 0
        for i in range(r):
            if rel[i]:
                found += 1
                ap += found / (i + 1)
        aps.append(ap / r)
    return {
        "recall": {k: float(np.mean(v)) for k, v in hits.items()},
        "map@r": float(np.mean(aps)),
        "r_precision": float(np.mean(rps)),
        "excluded": excluded,
    }


def brute_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


# ----------------------------------------------------------------------------------- data
def tie_heavy_labelled(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued embeddings with exact ties and duplicates, 25 classes plus 6 lone classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 25, n)
    labels[:6] = np.arange(100, 106)
    centres = rng.integers(-1, 2, size=(25, dim))
    x = np.where(rng.random((n, dim)) < 0.6, centres[labels % 25], rng.integers(-1, 2, size=(n, dim)))
    x = x.astype(np.float32)
    x[rng.choice(n, 30, replace=False)] = x[rng.choice(n, 30)]  # exact duplicates across classes too
    return x, labels


def random_float_labelled(
    n: int = 240, dim: int = 16, classes: int = 30, seed: int = 1, lone: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised random floats around class centres (no ties); every class has >= 2 members
    unless ``lone`` single-member classes are appended."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate(
        [
            np.arange(classes).repeat(2),
            rng.integers(0, classes, n - 2 * classes - lone),
            np.arange(classes, classes + lone),
        ]
    )
    rng.shuffle(labels)
    x = rng.normal(size=(classes + lone, dim))[labels] + 1.2 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_leave_one_out_matches_brute_force_with_ties_and_lone_classes(backend):
    x, labels = tie_heavy_labelled()
    want = brute_retrieval(x, labels)
    if backend == "faiss":
        pytest.importorskip("faiss")
        x, labels = random_float_labelled(lone=5)  # faiss' boundary tie order is its own
        want = brute_retrieval(x, labels)
    got = evaluate_embeddings(x, labels, recall_ks=KS, clustering=False, backend=backend, chunk_size=17)
    assert got.recall == pytest.approx(want["recall"], abs=1e-12)
    assert got.map_at_r == pytest.approx(want["map@r"], abs=1e-12)
    assert got.r_precision == pytest.approx(want["r_precision"], abs=1e-12)
    assert got.excluded_queries == want["excluded"] > 0
    assert got.num_queries == len(x) - want["excluded"]


def test_query_gallery_mode_matches_brute_force():
    x, labels = tie_heavy_labelled(seed=2)
    rng = np.random.default_rng(0)
    is_query = rng.random(len(x)) < 0.4
    is_gallery = ~is_query
    is_gallery[np.flatnonzero(is_query)[:10]] = True  # some images are both: excluded by identity
    want = brute_retrieval(x, labels, query_rows=np.flatnonzero(is_query), gallery_rows=np.flatnonzero(is_gallery))
    got = evaluate_embeddings(
        x, labels, recall_ks=KS, is_query=is_query, is_gallery=is_gallery, clustering=False, chunk_size=5
    )
    assert got.recall == pytest.approx(want["recall"], abs=1e-12)
    assert got.map_at_r == pytest.approx(want["map@r"], abs=1e-12)
    assert got.r_precision == pytest.approx(want["r_precision"], abs=1e-12)
    assert got.excluded_queries == want["excluded"]


def test_metric_functions_on_neighbour_lists_match_brute_force():
    x, labels = tie_heavy_labelled(seed=3)
    want = brute_retrieval(x, labels)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    order = np.array([sorted(range(len(x)), key=lambda j, r=r: (-r[j], j))[:-1] for r in s])
    nl = labels[order]
    r = num_relevant(labels)
    assert recall_at_k(nl, labels, KS, r) == pytest.approx(want["recall"], abs=1e-12)
    assert map_at_r(nl, labels, r) == pytest.approx(want["map@r"], abs=1e-12)
    assert r_precision(nl, labels, r) == pytest.approx(want["r_precision"], abs=1e-12)


def test_no_retrievable_query_gives_nan():
    nl = np.array([[1], [0]])
    assert np.isnan(map_at_r(nl, [0, 1], num_relevant=[0, 0]))
    assert np.isnan(recall_at_k(nl, [0, 1], [1], num_relevant=[0, 0])[1])


def test_num_relevant_modes():
    assert num_relevant([0, 0, 0, 1]).tolist() == [2, 2, 2, 0]
    assert num_relevant([0, 1, 2], [0, 0, 1], query_in_gallery=[True, False, False]).tolist() == [1, 1, 0]


@pytest.mark.parametrize("lone", [0, 7])
def test_matches_pytorch_metric_learning(lone, caplog):
    """P@1 (= Recall@1), MAP@R and R-Precision equal PML's AccuracyCalculator.

    PML (same-set ``get_accuracy(x, labels)``, i.e. ``ref_includes_query=True``) removes the query
    by identity from a k+1 search and, like us, drops queries of single-member classes.
    """
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = random_float_labelled(lone=lone)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    with caplog.at_level(logging.ERROR):
        pml = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    ours = evaluate_embeddings(x, labels, recall_ks=(1,), clustering=False)
    assert ours.recall[1] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours.map_at_r == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours.r_precision == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours.excluded_queries == lone


# -------------------------------------------------------------------------------- clustering
def test_f1_matches_pair_loop():
    rng = np.random.default_rng(4)
    for _ in range(5):
        labels = rng.integers(0, 8, 120)
        clusters = rng.integers(0, 6, 120) * 10 + 3  # arbitrary cluster ids
        assert f1_score_pairwise(labels, clusters) == pytest.approx(brute_f1(labels, clusters), abs=1e-12)
    assert f1_score_pairwise([0, 1, 2], [0, 1, 2]) == 0.0  # no pairs at all


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_nmi_on_obvious_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 15)
    x = 10 * np.eye(8)[labels] + 0.01 * rng.normal(size=(90, 8))
    score, clusters = nmi(x, labels, seed=0, n_init=3, kmeans_backend=backend)
    assert score == pytest.approx(1.0)
    assert score == pytest.approx(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))
    assert f1_score_pairwise(labels, clusters) == pytest.approx(1.0)


def test_nmi_equals_sklearn_on_partial_clustering():
    from sklearn.metrics import normalized_mutual_info_score

    x, labels = random_float_labelled()
    score, clusters = nmi(x, labels, seed=1)
    assert len(np.unique(clusters)) <= len(np.unique(labels))
    assert 0.0 < score < 1.0
    assert score == pytest.approx(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))
    again, clusters_again = nmi(x, labels, seed=1)
    assert again == score and np.array_equal(clusters, clusters_again)  # seeded


def test_docstring_examples_run():
    for module in (metrics_module, knn_module, ranks_module, topk_module, evaluator_module):
        result = doctest.testmod(module)
        assert result.failed == 0
