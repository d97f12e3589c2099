"""A tiny generated image dataset that a model can learn in seconds (tests, smoke runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pattern_folder(root: Path, num_classes: int = 8, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Folder-per-class dataset: each class is a colour/stripe pattern, each image a noisy variant."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        base = rng.integers(0, 256, size=3)
        period = 2 + c % 5
        folder = Path(root) / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size]
            stripes = ((xx + yy * (c % 2) + i) // period) % 2
            image = base[None, None, :] * (0.5 + 0.5 * stripes[..., None])
            image = image + rng.normal(0, 12, size=image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"img_{i}.png")
    return Path(root)
