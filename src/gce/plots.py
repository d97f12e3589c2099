"""PNG figures: training curves, ablation curves, meta-class sizes and retrieval grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def _save(fig, path: Path) -> Path:
    from gce.io import atomic_path  # never a half-written PNG; a FIFO or folder is refused

    fig.tight_layout()
    try:
        with atomic_path(path, what="figure") as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _retrieval_points(records: list[dict[str, Any]]) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """``(title, [(epochs trained, record)])``: the per-epoch ``curve`` records when the run has them
    (epoch -1 is the model before training), else the ``test`` records."""
    curve = [r for r in records if r["event"] == "curve"]
    chosen, title = (
        (curve, "test retrieval per epoch") if curve else ([r for r in records if r["event"] == "test"], "test metrics")
    )
    return title, [(r["epoch"] + 1, r) for r in chosen]


def plot_training_curve(
    records: list[dict[str, Any]], path: Path, title: str = "", reference: tuple[str, float] | None = None
) -> Path:
    """Training loss and test Recall@1 / MAP@R against the number of epochs trained, from a run's
    metrics.jsonl records. ``reference``: (label, Recall@1) drawn as a horizontal line."""
    train = [r for r in records if r["event"] == "train"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["epoch"] + 1 for r in train], [r["loss"] for r in train], marker="o")
    ax_loss.set(xlabel="epochs trained", ylabel="triplet loss", title="training loss")
    metric_title, points = _retrieval_points(records)
    for key, label in (("recall@1", "Recall@1"), ("map@r", "MAP@R"), ("nmi", "NMI")):
        xy = [(x, 100 * r[key]) for x, r in points if r.get(key) is not None]
        if xy:
            ax_metric.plot(*zip(*xy, strict=True), marker="o", label=label)
    if reference is not None:
        ax_metric.axhline(100 * reference[1], color="grey", linestyle="--", label=f"{reference[0]} (Recall@1)")
    ax_metric.set(xlabel="epochs trained (0: before training)", ylabel="%", title=metric_title)
    ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_recall_curves(results: dict[str, list[dict[str, Any]]], path: Path, metric: str = "recall@1") -> Path:
    """Mean (band: min-max over seeds) test ``metric`` per epoch for each variant."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, runs in results.items():
        # An undefined metric is null in the strict JSON logs: drawn as a gap (NaN), not a crash.
        curves = [
            {r["epoch"]: 100 * (r[metric] if r.get(metric) is not None else float("nan")) for r in run["test"]}
            for run in runs
        ]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            continue
        values = np.array([[c[e] for e in epochs] for c in curves])
        ax.plot(epochs, values.mean(0), marker="o", label=variant)
        if len(runs) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel=f"test {metric} (%)", title=f"test {metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:  # no finished run yet: an empty plot without a legend
        ax.legend()
    return _save(fig, path)


def plot_metaclass_sizes(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Classes per learner at each meta-class update (first seed of each variant with K > 1 data
    subsets; the all-data reading, where every learner sees every class, is left out). The y axis
    starts at 0 so that balanced subsets read as flat lines; titles give the share of classes that
    moved at each refresh."""
    shown = {
        v: runs[0]["metaclass"]
        for v, runs in results.items()
        if runs
        and runs[0]["metaclass"]
        and len(runs[0]["metaclass"][0]["classes_per_learner"]) > 1
        and "classes_per_metaclass" not in runs[0]["metaclass"][0]
    }
    cols = min(3, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, (variant, updates) in zip(axes.flat, shown.items(), strict=False):
        sizes = np.array([u["classes_per_learner"] for u in updates])
        epochs = [u["epoch"] for u in updates]
        for k in range(sizes.shape[1]):
            ax.plot(epochs, sizes[:, k], marker="o", label=f"learner {k}")
        moved = ", ".join(f"{100 * u['moved_fraction']:.0f}" for u in updates[1:])
        ax.set(
            xlabel="epoch",
            ylabel="classes",
            ylim=(0, 1.15 * sizes.max()),
            title=variant + (f" (moved %: {moved})" if moved else ""),
        )
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # drawn once (e.g. DREML): centre the lone point
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def retrieval_grid(
    query_images: Sequence, neighbour_images: Sequence[Sequence], correct: np.ndarray, path: Path, title: str = ""
) -> Path:
    """Each row: a query, then its nearest neighbours framed green (same class) or red (other)."""
    rows, cols = len(query_images), 1 + len(neighbour_images[0])
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(query_images[r])
        axes[r][0].set_title("query" if r == 0 else "", fontsize=8)
        for c, image in enumerate(neighbour_images[r], start=1):
            ax = axes[r][c]
            ax.imshow(image)
            colour = "#1a9641" if correct[r][c - 1] else "#d7191c"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            if r == 0:
                ax.set_title(f"#{c}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
