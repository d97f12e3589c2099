"""Exact retrieval and clustering evaluation (definitions: docs/metrics.md).

* :mod:`gce.evaluation.knn`: blocked exact kNN, ties by gallery index, self excluded by identity.
* :mod:`gce.evaluation.metrics`: Recall@K, MAP@R, R-Precision, NMI, pairwise F1 as pure functions.
* :mod:`gce.evaluation.evaluator`: :func:`extract_embeddings` and :func:`evaluate_embeddings`.
"""

from gce.evaluation.evaluator import EvalResult, default_recall_ks, evaluate_embeddings, extract_embeddings
from gce.evaluation.knn import KnnResult, exact_knn
from gce.evaluation.metrics import (
    f1_score_pairwise,
    first_positive_rank,
    kmeans,
    map_at_r,
    nmi,
    num_relevant,
    r_precision,
    recall_at_k,
    recall_at_k_from_ranks,
)
from gce.evaluation.ranks import knn_with_first_positive

__all__ = [
    "EvalResult",
    "KnnResult",
    "default_recall_ks",
    "evaluate_embeddings",
    "exact_knn",
    "extract_embeddings",
    "f1_score_pairwise",
    "first_positive_rank",
    "kmeans",
    "knn_with_first_positive",
    "map_at_r",
    "nmi",
    "num_relevant",
    "r_precision",
    "recall_at_k",
    "recall_at_k_from_ranks",
]
