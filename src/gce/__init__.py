"""gce: deep metric learning with Group Channel-wise Ensembles.

The few names a Python user needs, imported on first use (``import gce`` loads no torch)::

    import gce
    cfg = gce.load_config("my.yaml", ["train.epochs=2"])
    result = gce.train(cfg)                                     # final test metrics
    model, cfg = gce.load_model("runs/mine/model.pt")
    embedder = gce.Embedder.from_checkpoint("runs/mine/model.pt")
    index, report = gce.build_index_from_images(embedder, paths, "catalogue.index")
    hits = gce.SearchIndex.load("catalogue.index").search(embedder.embed_paths(["q.png"]), k=5)

docs/api.md describes each; the sub-packages hold the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # `X as X`: re-exported names, for type checkers and IDEs
    from gce.config import ExperimentConfig as ExperimentConfig
    from gce.config import load_config as load_config
    from gce.errors import GceError as GceError
    from gce.evaluation import EvalResult as EvalResult
    from gce.evaluation import evaluate_embeddings as evaluate_embeddings
    from gce.retrieval import Embedder as Embedder
    from gce.retrieval import SearchHit as SearchHit
    from gce.retrieval import SearchIndex as SearchIndex
    from gce.retrieval import build_index as build_index
    from gce.retrieval import build_index_from_images as build_index_from_images
    from gce.run import train as train
    from gce.training.checkpoint import load_model as load_model

#: public name -> the module that defines it
_API: dict[str, str] = {
    "ExperimentConfig": "gce.config",
    "load_config": "gce.config",
    "train": "gce.run",
    "load_model": "gce.training.checkpoint",
    "EvalResult": "gce.evaluation",
    "evaluate_embeddings": "gce.evaluation",
    "Embedder": "gce.retrieval",
    "SearchHit": "gce.retrieval",
    "SearchIndex": "gce.retrieval",
    "build_index": "gce.retrieval",
    "build_index_from_images": "gce.retrieval",
    "GceError": "gce.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gce' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
