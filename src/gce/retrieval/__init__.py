"""Use a trained model: embed images, index them with faiss, search (on any subset of the learners),
export to ONNX/TorchScript. The ``gce embed/index/search/export`` commands wrap this API.

    from gce.retrieval import Embedder, SearchIndex
    emb = Embedder.from_checkpoint("runs/emoji-gce/model.pt")
    index = SearchIndex.load("catalogue.index")
    hits = index.search(emb.embed_paths(["query.png"]), k=5, learners=[0, 3])
"""

from gce.config.vocabulary import INDEX_TYPES
from gce.retrieval.embedder import Embedder, model_fingerprint, normalize_learners
from gce.retrieval.faiss_tuning import BuildReport
from gce.retrieval.filters import FilterError, ItemFilter, parse_filter
from gce.retrieval.index import SearchHit, SearchIndex
from gce.retrieval.index_build import build_index
from gce.retrieval.items import ItemTable
from gce.retrieval.open_index import open_index
from gce.retrieval.pipeline import (
    add_store_to_index,
    build_index_from_images,
    build_index_from_store,
    records_to_items,
)
from gce.retrieval.store import EmbeddingSet, StoreInfo, embed_to_store, read_store
from gce.retrieval.vectors import query_vectors

__all__ = [
    "INDEX_TYPES",
    "BuildReport",
    "Embedder",
    "EmbeddingSet",
    "FilterError",
    "ItemFilter",
    "ItemTable",
    "SearchHit",
    "SearchIndex",
    "StoreInfo",
    "add_store_to_index",
    "build_index",
    "build_index_from_images",
    "build_index_from_store",
    "embed_to_store",
    "model_fingerprint",
    "normalize_learners",
    "open_index",
    "parse_filter",
    "query_vectors",
    "read_store",
    "records_to_items",
]
