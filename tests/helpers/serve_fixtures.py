"""A small real index for the service tests and the browser test: generated images, a tiny model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gce.data.synthetic import make_pattern_folder
from gce.retrieval import Embedder, build_index
from helpers.retrieval_fixtures import make_checkpoint


@dataclass(frozen=True)
class ServeFixture:
    checkpoint: Path
    index_dir: Path
    paths: list[str]
    labels: list[str]


def make_serve_index(
    root: Path,
    *,
    num_classes: int = 6,
    per_class: int = 5,
    num_learners: int = 4,
    size: int = 32,
    backbone: str = "resnet18",
) -> ServeFixture:
    """Pattern images (a class per folder), an untrained K-learner model, and a flat index of them.

    ResNet-18: an untrained MobileNetV2 maps these 32 px images to one and the same embedding.
    """
    root = Path(root)
    images = make_pattern_folder(root / "images", num_classes=num_classes, per_class=per_class, size=size)
    paths = sorted(str(p) for p in images.glob("*/*.png"))
    labels = [Path(p).parent.name for p in paths]
    checkpoint = make_checkpoint(
        root / "model.pt", num_learners=num_learners, embedding_dim=8 * num_learners, image_size=size, backbone=backbone
    )
    embedder = Embedder.from_checkpoint(checkpoint)
    build_index(embedder.embed_paths(paths), paths, labels, root / "index", embedder.metadata())
    return ServeFixture(checkpoint, root / "index", paths, labels)
