"""``gce serve``: an HTTP search API and an offline web page over a :mod:`gce.retrieval` index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gce.serve.app import create_app
from gce.serve.errors import RequestError
from gce.serve.service import SearchService
from gce.serve.settings import ServeSettings

__all__ = ["RequestError", "SearchService", "ServeSettings", "create_app", "load_service"]


def load_service(
    index_dir: str | Path,
    checkpoint: str | Path | None,
    settings: ServeSettings | None = None,
    *,
    runtime: str = "torch",
    say: Callable[[str], None] | None = None,
    before_model: Callable[[], None] | None = None,
) -> SearchService:
    """Load the index and the model that built it (``checkpoint=None``: search by item id only);
    ``runtime`` runs the model (:mod:`gce.retrieval.runtimes`; ``say`` hears which, and of an export);
    ``before_model`` runs once the index is loaded, before the model is (``gce serve`` binds there)."""
    from gce.retrieval import Embedder
    from gce.retrieval.open_index import open_index

    settings = settings or ServeSettings()
    index = open_index(index_dir)
    if before_model is not None:
        before_model()
    embedder = None
    if checkpoint is not None:
        embedder = Embedder.from_checkpoint(checkpoint, device=settings.device, runtime=runtime, say=say)
    return SearchService(index, embedder, settings, index_dir=index_dir)
