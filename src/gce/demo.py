"""The end-to-end demo: untrained backbone vs trained GCE on a test split, with figures.

Trains (or resumes, or reuses a finished run), evaluates both models with the same protocol, and
writes a comparison table, a retrieval grid and a training-curve PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gce.config import ExperimentConfig
from gce.data.images import ImageDataset, load_rgb
from gce.data.records import ImageRecords
from gce.errors import CheckpointError
from gce.evaluation import EvalResult, exact_knn
from gce.evaluation.pipeline import EmbedFn, MetricSettings, evaluate_split
from gce.io import check_output_dir, try_lock, write_json, write_text
from gce.models.plain import PooledTrunk
from gce.plots import plot_training_curve, retrieval_grid
from gce.training.checkpoint import load_checkpoint, setting_differences
from gce.training.logging import MetricsLogger
from gce.training.parts import build_parts
from gce.training.trainer import Trainer

TABLE_METRICS = (
    ("recall@1", "R@1"),
    ("recall@2", "R@2"),
    ("recall@4", "R@4"),
    ("recall@8", "R@8"),
    ("nmi", "NMI"),
    ("map@r", "MAP@R"),
)
CURVE_EVENT = "curve"


@dataclass
class RetrievalCurve:
    """Retrieval metrics of the test split (no clustering), measured by the trainer before training
    and after every epoch: the points of the demo's training curve."""

    dataset: ImageDataset
    embed: EmbedFn
    metrics: MetricSettings
    event: str = CURVE_EVENT

    def __call__(self, model: nn.Module, desc: str) -> dict[str, Any]:
        metrics = replace(self.metrics, clustering=False)  # k-means every epoch would cost more than the pass
        return evaluate_split(model, self.dataset, self.embed, metrics, desc).result.to_dict()


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


def write_retrieval_grid(
    embeddings: torch.Tensor,
    records: ImageRecords,
    path: Path,
    *,
    queries: int = 8,
    neighbours: int = 5,
    seed: int = 0,
    title: str = "",
) -> Path:
    chosen = pick_queries(records.labels, queries, seed)
    found = exact_knn(embeddings[chosen], embeddings, k=neighbours, self_index=torch.as_tensor(chosen))
    indices = found.indices.numpy()
    correct = records.labels[indices] == records.labels[chosen][:, None]
    return retrieval_grid(
        [load_rgb(records.paths[q]) for q in chosen],
        [[load_rgb(records.paths[j]) for j in row] for row in indices],
        correct,
        path,
        title,
    )


def _other_configuration(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """How the settings of the run in ``run_dir`` differ from ``cfg`` (None: the same, or a
    checkpoint that cannot be read, which the trainer's resume then reports)."""
    try:
        state, _ = load_checkpoint(run_dir, warn=lambda message: None)
        differences = setting_differences(state["config"], cfg.to_dict())
    except (CheckpointError, KeyError, TypeError, AttributeError):
        return None
    return "; ".join(differences) or None


def being_trained(run_dir: Path) -> bool:
    """Whether a live process holds the run's ``running.lock`` (one left by a killed run is free)."""
    with try_lock(run_dir / "running.lock") as holder:
        return holder is not None


def _free_sibling(folder: Path, suffix: str) -> Path:
    """``folder`` + ``suffix`` + ``-N``, the first N that names nothing yet."""
    n = 1
    while (candidate := folder.with_name(f"{folder.name}{suffix}-{n}")).exists():
        n += 1
    return candidate


def run_demo(cfg: ExperimentConfig, out: Path, *, progress: bool = True, log=print) -> str:
    """Untrained backbone vs trained model on the test split; returns the markdown table."""
    out = check_output_dir(out, what="--out", inputs=[cfg.data.root])
    run_dir = Path(cfg.train.out_dir)
    resume = (run_dir / "last.pt").exists()
    # A folder a live process is training in (its running.lock is held) is never moved.
    if resume and not being_trained(run_dir) and (differences := _other_configuration(run_dir, cfg)):
        # The demo's own run folder, left by an earlier demo of other settings (an edited config, or
        # defaults changed by an upgrade): kept under a new name, and the demo trains anew.
        kept = _free_sibling(run_dir, ".previous")
        run_dir.rename(kept)
        log(f"{run_dir} held a run of another configuration ({differences}); moved it to {kept}, training anew")
        resume = False
    parts = build_parts(cfg, resume=resume, progress=progress)
    curve = RetrievalCurve(parts.test_set, parts.embed, parts.metrics)
    trained_result = Trainer(parts, resume=resume, log=log, observers=[curve]).run()  # a finished run only re-evaluates
    untrained_model = PooledTrunk(cfg.model.backbone, pretrained=cfg.model.pretrained).to(parts.device)
    untrained = evaluate_split(untrained_model, parts.test_set, parts.embed, parts.metrics, "untrained backbone")
    trained_embeddings, _ = parts.embed(parts.model, parts.test_set, "trained model")
    names = {
        f"{cfg.model.backbone} (untrained, pooled)": untrained.result,
        f"{cfg.name} ({cfg.train.epochs} epochs)": trained_result,
    }
    table = comparison_table(names)
    write_text(out / "comparison.md", table + "\n")
    write_json(out / "comparison.json", {name: r.to_dict() for name, r in names.items()})
    test = parts.data.test
    write_retrieval_grid(
        trained_embeddings,
        test,
        out / "retrieval_grid.png",
        seed=cfg.train.seed,
        title=f"{cfg.name}: queries (left) and top-5 test neighbours",
    )
    write_retrieval_grid(
        untrained.embeddings,
        test,
        out / "retrieval_grid_untrained.png",
        seed=cfg.train.seed,
        title=f"untrained {cfg.model.backbone}: same queries",
    )
    plot_training_curve(
        MetricsLogger(run_dir).read(),
        out / "training_curve.png",
        title=cfg.name,
        reference=(f"untrained {cfg.model.backbone}", untrained.result.recall[min(untrained.result.recall)]),
    )
    return table
