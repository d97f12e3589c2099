"""How much each base learner knows on its own, and how different the learners are.

For each trained model (``model.pt`` of a run folder), on the test split of its own dataset:

* test Recall@1 of every learner's sub-embedding alone and of the concatenation: an ensemble
  helps when the concatenation beats every learner by a clear margin;
* learner agreement: for each pair of learners, the share of test images whose nearest neighbour
  (by that learner's sub-embedding) is the same image. 100 % would mean the learners collapsed
  onto one metric; the lower, the more diverse the ensemble.

    python studies/learner_diagnostics.py runs/ablation-emoji/gce/seed0 runs/ablation-emoji/dreml/seed0

Prints one markdown table row per model. CPU: about 20 s per emoji model (one pass over the
4,653 test images plus K+1 exact kNN searches).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from gce.data import load_dataset
from gce.data.images import ImageDataset
from gce.data.transforms import test_transform
from gce.evaluation import evaluate_embeddings, extract_embeddings
from gce.evaluation.knn import exact_knn
from gce.training.checkpoint import load_model


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row (cosine; self excluded by identity)."""
    return torch.as_tensor(exact_knn(embeddings, k=1).indices)[:, 0]


def diagnose(run: Path, progress: bool) -> dict[str, object]:
    model, cfg = load_model(run / "model.pt" if run.is_dir() else run)
    d = cfg.data
    splits = load_dataset(d.dataset, d.root, **dict(d.options))
    dataset = ImageDataset(splits.test, test_transform(d.image_size, resize_to=d.test_resize))
    embeddings, labels = extract_embeddings(
        model, dataset, batch_size=cfg.eval.batch_size, progress=progress, desc=f"embedding {run}"
    )
    slices = model.learner_slices()
    recall1 = lambda e: 100 * evaluate_embeddings(e, labels, recall_ks=[1], clustering=False).recall[1]  # noqa: E731
    per_learner = [recall1(embeddings[:, s]) for s in slices]
    nn_of = [nearest_neighbours(embeddings[:, s]) for s in slices]
    agreement = [
        100 * float((nn_of[a] == nn_of[b]).float().mean()) for a, b in itertools.combinations(range(len(slices)), 2)
    ]
    return {
        "run": str(run),
        "K": len(slices),
        "full": recall1(embeddings),
        "learners": per_learner,
        "agreement": sum(agreement) / len(agreement) if agreement else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with model.pt) or model.pt files")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    print("| run | K | R@1 full | R@1 of each learner alone | mean pairwise NN agreement |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        r = diagnose(run, progress=not args.quiet)
        learners = ", ".join(f"{v:.1f}" for v in r["learners"])
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.1f} %"
        print(f"| {r['run']} | {r['K']} | {r['full']:.1f} | {learners} | {agree} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
