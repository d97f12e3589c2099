"""Embed a split, then compute its metrics: the one evaluation path of training, ``gce eval`` and the demo.

Two small parts, each replaceable on its own:

* :class:`DatasetEmbedder` runs a model over a dataset (batch size, loader workers, device, progress bar).
  A distributed run swaps it for one that embeds a shard per rank and gathers the result.
* :class:`MetricSettings` says which metrics to compute and how (Recall@K values, clustering,
  neighbour-search back end, k-means seed).

:func:`evaluate_split` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from gce.evaluation.evaluator import EvalResult, default_recall_ks, evaluate_embeddings, extract_embeddings
from gce.evaluation.knn import Backend

if TYPE_CHECKING:
    from gce.config import ExperimentConfig
    from gce.data.images import ImageDataset

__all__ = ["DatasetEmbedder", "EmbedFn", "Evaluated", "MetricSettings", "evaluate_split"]


class EmbedFn(Protocol):
    """What the trainer and :func:`evaluate_split` call to embed a dataset."""

    def __call__(self, model: nn.Module, dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class DatasetEmbedder:
    """``(model, dataset, desc) -> (embeddings (N, D) on CPU, labels (N,))`` in dataset order."""

    batch_size: int = 128
    workers: int = 0
    device: torch.device = torch.device("cpu")
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, device: torch.device, progress: bool) -> DatasetEmbedder:
        return cls(batch_size=cfg.eval.batch_size, workers=cfg.data.workers, device=device, progress=progress)

    def __call__(self, model: nn.Module, dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_embeddings(
            model,
            dataset,
            batch_size=self.batch_size,
            num_workers=self.workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
        )


@dataclass(frozen=True)
class MetricSettings:
    """Arguments of :func:`~gce.evaluation.evaluator.evaluate_embeddings` besides the embeddings."""

    recall_ks: tuple[int, ...]
    clustering: bool = True
    backend: Backend = "torch"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> MetricSettings:
        ks = cfg.eval.recall_ks or default_recall_ks(cfg.data.dataset)
        return cls(recall_ks=tuple(ks), clustering=cfg.eval.clustering, backend=cfg.eval.backend, seed=cfg.train.seed)


@dataclass
class Evaluated:
    """Metrics of a split and the embeddings they were computed from (CPU, dataset order)."""

    result: EvalResult
    embeddings: torch.Tensor


def evaluate_split(
    model: nn.Module, dataset: ImageDataset, embed: EmbedFn, metrics: MetricSettings, desc: str
) -> Evaluated:
    """Embed ``dataset`` with ``model`` and compute ``metrics``; query/gallery roles come from its records."""
    embeddings, labels = embed(model, dataset, desc)
    records = dataset.records
    result = evaluate_embeddings(
        embeddings,
        labels,
        recall_ks=metrics.recall_ks,
        is_query=records.is_query,
        is_gallery=records.is_gallery,
        clustering=metrics.clustering,
        backend=metrics.backend,
        seed=metrics.seed,
    )
    return Evaluated(result, embeddings)
