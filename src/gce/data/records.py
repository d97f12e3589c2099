"""Plain, framework-free description of a labelled image collection and its splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecords:
    """Images of one split.

    ``labels`` are contiguous integers ``0..num_classes-1`` within this split and
    ``class_names[label]`` is the human-readable class. ``is_query``/``is_gallery`` are set only
    for benchmarks evaluated query-against-gallery (In-Shop, or a CSV with those columns); when
    they are ``None`` every image is both a query and a gallery item (leave-one-out retrieval).
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        for name in ("is_query", "is_gallery"):
            mask = getattr(self, name)
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if len(mask) != len(self.paths):
                    raise ValueError(f"{name} has {len(mask)} entries for {len(self.paths)} images")
                setattr(self, name, mask)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> ImageRecords:
        """Records for ``indices``, labels re-numbered to stay contiguous."""
        indices = np.asarray(indices, dtype=np.int64)
        old = self.labels[indices]
        kept, new = np.unique(old, return_inverse=True)
        return ImageRecords(
            paths=[self.paths[i] for i in indices],
            labels=new.astype(np.int64),
            class_names=[self.class_names[c] for c in kept],
            is_query=None if self.is_query is None else self.is_query[indices],
            is_gallery=None if self.is_gallery is None else self.is_gallery[indices],
        )


@dataclass
class DatasetSplits:
    """The train and test splits of one dataset (classes are disjoint between them)."""

    name: str
    train: ImageRecords
    test: ImageRecords
