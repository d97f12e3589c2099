"""The end-to-end demo: untrained backbone vs trained GCE on a test split, with figures.

Trains (or resumes, or reuses a finished run), evaluates both models with the same protocol, and
writes a comparison table, a retrieval grid and a training-curve PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gce.config import ExperimentConfig
from gce.data.images import ImageDataset, load_rgb
from gce.data.records import ImageRecords
from gce.data.transforms import test_transform
from gce.evaluation import EvalResult, default_recall_ks, evaluate_embeddings, exact_knn, extract_embeddings
from gce.models.plain import PooledTrunk
from gce.plots import plot_training_curve, retrieval_grid
from gce.training.logging import MetricsLogger
from gce.outputs import check_output_dir, write_json, write_text
from gce.training.trainer import Trainer

TABLE_METRICS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
                 ("nmi", "NMI"), ("map@r", "MAP@R"))


@dataclass
class Evaluated:
    result: EvalResult
    embeddings: torch.Tensor


def embed(model: torch.nn.Module, records: ImageRecords, cfg: ExperimentConfig, progress: bool,
          desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ImageDataset(records, test_transform(cfg.data.image_size, resize_to=cfg.data.test_resize))
    return extract_embeddings(model, dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers,
                              progress=progress, desc=desc)


def embed_and_evaluate(model: torch.nn.Module, records: ImageRecords, cfg: ExperimentConfig,
                       progress: bool, desc: str) -> Evaluated:
    embeddings, labels = embed(model, records, cfg, progress, desc)
    result = evaluate_embeddings(embeddings, labels, recall_ks=cfg.eval.recall_ks or default_recall_ks(cfg.data.dataset),
                                 is_query=records.is_query, is_gallery=records.is_gallery,
                                 clustering=cfg.eval.clustering, seed=cfg.train.seed)
    return Evaluated(result, embeddings)


def comparison_table(rows: dict[str, EvalResult]) -> str:
    header = "| model | " + " | ".join(label for _, label in TABLE_METRICS) + " |"
    lines = [header, "|---|" + "---|" * len(TABLE_METRICS)]
    for name, result in rows.items():
        values = result.to_dict()
        cells = ["-" if values.get(key) is None else f"{100 * values[key]:.1f}" for key, _ in TABLE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pick_queries(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Spread-out queries whose class has at least one other image (so a right match exists)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def write_retrieval_grid(embeddings: torch.Tensor, records: ImageRecords, path: Path, *, queries: int = 8,
                         neighbours: int = 5, seed: int = 0, title: str = "") -> Path:
    chosen = pick_queries(records.labels, queries, seed)
    found = exact_knn(embeddings[chosen], embeddings, k=neighbours, self_index=torch.as_tensor(chosen))
    indices = found.indices.numpy()
    correct = records.labels[indices] == records.labels[chosen][:, None]
    return retrieval_grid([load_rgb(records.paths[q]) for q in chosen],
                          [[load_rgb(records.paths[j]) for j in row] for row in indices], correct, path, title)


def run_demo(cfg: ExperimentConfig, out: Path, *, progress: bool = True, log=print) -> str:
    """Untrained backbone vs trained model on the test split; returns the markdown table."""
    out = check_output_dir(out, what="--out", inputs=[cfg.data.root])
    run_dir = Path(cfg.train.out_dir)
    trainer = Trainer(cfg, resume=(run_dir / "last.pt").exists(), progress=progress, log=log)
    trained_result = trainer.run()  # a finished run resumes at its end and only re-evaluates
    test = trainer.data.test
    untrained = embed_and_evaluate(PooledTrunk(cfg.model.backbone, pretrained=cfg.model.pretrained), test, cfg,
                                   progress, "untrained backbone")
    trained = Evaluated(trained_result, embed(trainer.model, test, cfg, progress, "trained model")[0])
    names = {f"{cfg.model.backbone} (untrained, pooled)": untrained.result,
             f"{cfg.name} ({cfg.train.epochs} epochs)": trained.result}
    table = comparison_table(names)
    write_text(out / "comparison.md", table + "\n")
    write_json(out / "comparison.json", {name: r.to_dict() for name, r in names.items()})
    write_retrieval_grid(trained.embeddings, test, out / "retrieval_grid.png", seed=cfg.train.seed,
                         title=f"{cfg.name}: queries (left) and top-5 test neighbours")
    write_retrieval_grid(untrained.embeddings, test, out / "retrieval_grid_untrained.png", seed=cfg.train.seed,
                         title=f"untrained {cfg.model.backbone}: same queries")
    plot_training_curve(MetricsLogger(run_dir, tensorboard=False).read(), out / "training_curve.png", title=cfg.name)
    return table

