"""Tiny real checkpoints and image folders for the retrieval tests (random weights, 32 px)."""

from __future__ import annotations

from pathlib import Path

import torch

from gce.config import config_from_dict
from gce.models import build_model
from gce.training.checkpoint import save_model_only


def make_checkpoint(
    path: Path,
    *,
    num_learners: int = 2,
    embedding_dim: int = 16,
    image_size: int = 32,
    backbone: str = "mobilenet_v2",
    seed: int = 0,
    data: dict | None = None,
) -> Path:
    """A ``model.pt`` of an untrained MobileNetV2 + GCE head: random weights, yet distinct embeddings."""
    torch.manual_seed(seed)
    cfg = config_from_dict(
        {
            "data": {
                "dataset": "folder",
                "root": str(path.parent),
                "image_size": image_size,
                "test_resize": image_size,
                **(data or {}),
            },
            "model": {
                "backbone": backbone,
                "head": "gce",
                "num_learners": num_learners,
                "embedding_dim": embedding_dim,
                "pretrained": False,
                "freeze_bn": False,
            },
        }
    )
    model = build_model(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_only(model, cfg, path)
    return path


def model_meta(dim: int = 32, num_learners: int = 4, model_id: str = "m" * 64) -> dict:
    """Model metadata for indexes built from synthetic embeddings."""
    step = dim // num_learners
    return {
        "model_id": model_id,
        "embedding_dim": dim,
        "num_learners": num_learners,
        "learner_slices": [[k * step, (k + 1) * step] for k in range(num_learners)],
    }


def clustered_embeddings(
    n: int, dim: int = 32, num_learners: int = 4, clusters: int = 40, noise: float = 0.6, seed: int = 0
):
    """Learner-normalised embeddings around ``clusters`` centres, and the cluster of each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    step = dim // num_learners
    for k in range(num_learners):
        part = x[:, k * step : (k + 1) * step]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels
