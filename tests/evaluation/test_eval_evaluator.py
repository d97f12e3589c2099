"""Evaluator: result object, defaults, backends, clustering scope, embedding extraction, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from gce.errors import ConfigError, GceError
from gce.evaluation import EvalResult, default_recall_ks, evaluate_embeddings, extract_embeddings
from gce.evaluation.metrics import nmi


def clustered(n: int = 300, classes: int = 40, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes).repeat(2), rng.integers(0, classes, n - 2 * classes)])
    x = rng.normal(size=(classes, dim))[labels] + 0.9 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_to_dict_and_table():
    res = EvalResult(
        recall={4: 0.9, 1: 0.5},
        nmi=0.61,
        f1=0.2,
        map_at_r=0.25,
        r_precision=0.333,
        num_queries=10,
        num_classes=3,
        excluded_queries=2,
    )
    d = res.to_dict()
    assert list(d) == [
        "recall@1",
        "recall@4",
        "nmi",
        "f1",
        "map@r",
        "r_precision",
        "num_queries",
        "num_classes",
        "excluded_queries",
    ]
    assert d["recall@1"] == 0.5 and d["map@r"] == 0.25 and d["excluded_queries"] == 2
    table = res.format_table()
    assert "Recall@1" in table and "50.0" in table and "33.3" in table and "61.0" in table
    assert "2 queries excluded" in table
    no_clusters = EvalResult({1: 1.0}, None, None, 0.5, 0.5, 3, 2, 0)
    assert "nmi" not in no_clusters.to_dict() and "NMI" not in no_clusters.format_table()


def test_default_recall_ks():
    assert default_recall_ks("cub") == (1, 2, 4, 8)
    assert default_recall_ks("Cars196") == (1, 2, 4, 8)
    assert default_recall_ks("sop") == (1, 10, 100, 1000)
    assert default_recall_ks("inshop") == (1, 10, 20, 30, 40, 50)
    for name in ("emoji", "folder", "csv"):
        assert default_recall_ks(name) == (1, 2, 4, 8)
    with pytest.raises(ConfigError, match="unknown dataset"):
        default_recall_ks("imagenet")


def test_evaluate_fields_and_ranges():
    x, labels = clustered()
    res = evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(labels), recall_ks=(8, 1, 2, 4))
    assert list(res.recall) == [1, 2, 4, 8]
    assert all(0 <= v <= 1 for v in res.to_dict().values() if isinstance(v, float))
    assert res.recall[1] <= res.recall[2] <= res.recall[4] <= res.recall[8]
    assert res.num_queries == 300 and res.num_classes == 40 and res.excluded_queries == 0
    assert res.nmi is not None and 0 < res.nmi < 1 and res.f1 is not None


def test_torch_and_faiss_backends_agree():
    pytest.importorskip("faiss")
    x, labels = clustered(seed=1)
    is_query = np.arange(len(x)) % 3 == 0
    for masks in ({}, {"is_query": is_query, "is_gallery": ~is_query}):
        a = evaluate_embeddings(x, labels, recall_ks=(1, 5, 50), clustering=False, **masks)
        b = evaluate_embeddings(x, labels, recall_ks=(1, 5, 50), clustering=False, backend="faiss", **masks)
        assert a == b


def test_chunk_size_does_not_change_metrics():
    x, labels = clustered(seed=2)
    a = evaluate_embeddings(x, labels, recall_ks=(1, 100), clustering=False, chunk_size=37)
    b = evaluate_embeddings(x, labels, recall_ks=(1, 100), clustering=False)
    assert a == b


def test_clustering_uses_the_gallery_in_query_gallery_mode():
    x, labels = clustered(seed=3)
    is_gallery = np.arange(len(x)) % 2 == 0
    res = evaluate_embeddings(x, labels, is_query=~is_gallery, is_gallery=is_gallery, seed=5)
    want, _ = nmi(x[is_gallery], labels[is_gallery], seed=5)
    assert res.nmi == pytest.approx(want)


def test_lone_queries_in_query_gallery_mode_are_excluded_and_counted():
    x, labels = clustered(seed=4)
    labels = labels.copy()
    is_query = np.zeros(len(x), dtype=bool)
    is_query[:20] = True
    labels[:5] = 1000 + np.arange(5)  # classes absent from the gallery
    res = evaluate_embeddings(x, labels, is_query=is_query, is_gallery=~is_query, clustering=False)
    assert res.excluded_queries == 5 and res.num_queries == 15


def test_bad_inputs_raise_clear_errors():
    x, labels = clustered()
    with pytest.raises(GceError, match="labels"):
        evaluate_embeddings(x, labels[:-1])
    with pytest.raises(GceError, match="is_query"):
        evaluate_embeddings(x, labels, is_query=np.ones(3, dtype=bool))
    with pytest.raises(GceError, match="at least one query"):
        evaluate_embeddings(x, labels, is_query=np.zeros(len(x), dtype=bool))
    with pytest.raises(ConfigError, match="recall_ks"):
        evaluate_embeddings(x, labels, recall_ks=(0, 1))
    with pytest.raises(GceError, match="no embeddings"):
        evaluate_embeddings(np.zeros((0, 4)), [])
    bad = x.copy()
    bad[3, 0] = np.inf
    with pytest.raises(GceError, match="infinite"):
        evaluate_embeddings(bad, labels)


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)
        self.seen_training: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.linear(images.flatten(1))


def test_extract_embeddings_in_order_eval_mode_and_restores_mode():
    images = torch.randn(10, 1, 2, 3)
    labels = torch.arange(10) % 4
    model = _Scale()
    model.train()
    emb, lab = extract_embeddings(model, TensorDataset(images, labels), batch_size=4, progress=False)
    assert emb.dtype == torch.float32 and emb.shape == (10, 3) and emb.device.type == "cpu"
    assert torch.equal(lab, labels)
    with torch.no_grad():
        assert torch.allclose(emb, model.linear(images.flatten(1)))
    assert model.seen_training == [False, False, False] and model.training
    emb.add_(1.0)  # a normal tensor, not an inference-mode one


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def test_extract_embeddings_empty_dataset():
    with pytest.raises(GceError, match="empty"):
        extract_embeddings(_Scale(), _Empty(), progress=False)
