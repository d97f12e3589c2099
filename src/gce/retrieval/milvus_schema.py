"""How a gce index lives in a Milvus collection: connection, schema, marker, index and search parameters,
and metadata filters as Milvus boolean expressions.

A gce collection has the fields ``id`` (INT64 primary key, assigned by gce: stable, never reused),
``path`` (VARCHAR), ``label`` (VARCHAR, ``""`` when unknown) and ``has_label`` (BOOL), and vectors in
one of two layouts:

- ``single``: one FLOAT_VECTOR ``vector``, the stored form of :mod:`gce.retrieval.vectors` (a learner
  subset is searched with the masked, rescaled query: approximate indexes answer it less well);
- ``learners``: ``vector`` plus one unit FLOAT_VECTOR ``learner_<k>`` per learner, each with its own
  index (a learner subset is searched per learner and merged by weight). Needs a server that
  accepts several vector fields per collection (Milvus >= 2.4, milvus-lite); Milvus 2.3 refuses it
  and the build falls back to ``single``, saying so.

The collection's description starts with :data:`MARKER` and its properties hold it too (milvus-lite
keeps no description): a collection without it was not made by gce and is never written to, let
alone dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gce.errors import GceError
from gce.extras import require_extra
from gce.retrieval.filters import ItemFilter

__all__ = [
    "CONNECT_SECONDS",
    "MARKER",
    "MILVUS_TYPES",
    "check_gce_collection",
    "connect",
    "create_collection",
    "filter_expression",
    "index_params",
    "insert_items",
    "search_params",
    "search_settings",
    "vector_fields",
]

MARKER = "gce-index"
#: A server that does not answer within this many seconds is an error, not a hang.
CONNECT_SECONDS = 10.0
#: gce index type -> Milvus index type (the metric is always IP on unit vectors: cosine).
MILVUS_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
#: The most results one Milvus search returns (its ``topk`` limit).
MAX_K = 16_384
MAX_PATH = 4096
MAX_LABEL = 1024


def _milvus_error(exc: Exception) -> str:
    """A Milvus exception's message on one line (pymilvus puts the server's reason in ``message``)."""
    text = str(getattr(exc, "message", "") or exc)
    return " ".join(text.split())[:300] or type(exc).__name__


def connect(uri: str, timeout: float = CONNECT_SECONDS):
    """A ``MilvusClient`` for a server (``http://host:port``) or a milvus-lite file (``*.db``); an
    unreachable server is a one-line error after ``timeout`` seconds."""
    require_extra("milvus")
    from pymilvus import MilvusClient  # type: ignore[import-untyped]

    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except Exception as exc:  # pymilvus raises its own types and grpc's: all mean "not reachable"
        raise GceError(f"cannot connect to Milvus at {uri} within {timeout:g} s: {_milvus_error(exc)}") from None


def normalized_uri(uri: str) -> str:
    """A server URI as given; a milvus-lite file as an absolute path (the manifest must find it again)."""
    if "://" in uri:
        return uri
    if not uri.endswith(".db"):
        raise GceError(f"--uri {uri!r}: give a server URI (http://host:19530) or a milvus-lite file ending in .db")
    return str(Path(os.path.abspath(uri)))


def vector_fields(layout: str, num_learners: int) -> list[str]:
    return ["vector"] + ([f"learner_{k}" for k in range(num_learners)] if layout == "learners" else [])


def check_gce_collection(client, name: str, model_id: str | None = None) -> dict[str, Any]:
    """The marker of gce collection ``name`` (one-line errors: absent, not gce's, another model's)."""
    try:
        described = client.describe_collection(name)
    except Exception as exc:
        raise GceError(f"Milvus collection {name!r}: {_milvus_error(exc)}") from None
    text = str(described.get("description", ""))
    properties = described.get("properties") or {}
    if MARKER in properties:  # milvus-lite keeps properties but not descriptions
        text = f"{MARKER} {properties[MARKER]}"
    if not text.startswith(MARKER + " "):
        raise GceError(f"Milvus collection {name!r} was not made by gce (no {MARKER} marker); it is left alone")
    try:
        marker = json.loads(text[len(MARKER) + 1 :])
    except json.JSONDecodeError:
        raise GceError(f"Milvus collection {name!r}: damaged {MARKER} marker in its description") from None
    if model_id is not None and marker.get("model_id") != model_id:
        raise GceError(
            f"Milvus collection {name!r} holds embeddings of model {str(marker.get('model_id'))[:12]},"
            f" not {model_id[:12]}"
        )
    return marker


def create_collection(client, name: str, meta: dict[str, Any], layout: str) -> str:
    """Create the collection; returns the layout it got (``learners`` falls back to ``single`` when
    the server allows one vector field per collection)."""
    from pymilvus import DataType

    def _marker(chosen: str) -> dict[str, str]:
        return {MARKER: json.dumps({"model_id": meta["model_id"], "layout": chosen}, separators=(",", ":"))}

    def schema(chosen: str):
        marker = _marker(chosen)[MARKER]
        s = client.create_schema(auto_id=False, enable_dynamic_field=False, description=f"{MARKER} {marker}")
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        s.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL)
        s.add_field("has_label", DataType.BOOL)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=int(meta["embedding_dim"]))
        if chosen == "learners":
            for k, (a, b) in enumerate(meta["learner_slices"]):
                s.add_field(f"learner_{k}", DataType.FLOAT_VECTOR, dim=int(b) - int(a))
        return s

    try:
        with _quiet_pymilvus():  # a refused layout is expected on Milvus 2.3: no logged traceback
            client.create_collection(
                name, schema=schema(layout), consistency_level="Bounded", properties=_marker(layout)
            )
        return layout
    except Exception as exc:
        if layout != "learners" or "vector field" not in _milvus_error(exc).lower():
            raise GceError(f"cannot create Milvus collection {name!r}: {_milvus_error(exc)}") from None
    try:
        client.create_collection(
            name, schema=schema("single"), consistency_level="Bounded", properties=_marker("single")
        )
    except Exception as exc:
        raise GceError(f"cannot create Milvus collection {name!r}: {_milvus_error(exc)}") from None
    return "single"


@contextmanager
def _quiet_pymilvus() -> Iterator[None]:
    logger = logging.getLogger("pymilvus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def index_params(client, index_type: str, fields: Sequence[str], params: dict[str, Any]):
    """Milvus index parameters for every vector field (inner product; the vectors are unit length)."""
    if index_type not in MILVUS_TYPES:
        raise GceError(f"the Milvus back end builds {', '.join(MILVUS_TYPES)} indexes, not {index_type}")
    built = {
        "flat": {},
        "hnsw": {"M": params.get("hnsw_m", 32), "efConstruction": params.get("ef_construction", 80)},
        "ivf": {"nlist": params.get("nlist", 128)},
    }[index_type]
    result = client.prepare_index_params()
    for field in fields:
        result.add_index(field, index_type=MILVUS_TYPES[index_type], metric_type="IP", params=dict(built))
    return result, built


def search_params(index_type: str, chosen: dict[str, Any], k: int) -> dict[str, Any]:
    """What one search sends: HNSW's ``ef`` must be at least ``k`` (raised to it)."""
    params: dict[str, Any] = {}
    if index_type == "hnsw":
        params["ef"] = max(int(chosen.get("ef_search", 64)), k)
    elif index_type == "ivf":
        params["nprobe"] = int(chosen.get("nprobe", 16))
    return {"metric_type": "IP", "params": params}


def search_settings(index_type: str, built: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """The settings measured at build time (as the faiss types: :func:`gce.retrieval.faiss_build.search_settings`)."""
    if index_type == "ivf":
        nlist = int(built["nlist"])
        values = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist} | {min(nlist, 256)})
        return [(f"nprobe={p}", {"nprobe": p}) for p in values]
    if index_type == "hnsw":
        return [(f"ef={e}", {"ef_search": e}) for e in (16, 32, 64, 128, 256, 512)]
    return []


def _literal(text: str) -> str:
    """A Milvus string literal: double-quoted with backslash escapes (JSON's rules, which Milvus reads)."""
    return json.dumps(text, ensure_ascii=False)


def ids_by_path(client, collection: str, paths: Sequence[str]) -> dict[str, list[int]]:
    """The ids of the items stored under each of ``paths`` (absent paths are absent keys)."""
    found: dict[str, list[int]] = {}
    unique = list(dict.fromkeys(paths))
    for start in range(0, len(unique), 1000):  # bounded expressions
        expr = f"path in [{', '.join(_literal(p) for p in unique[start : start + 1000])}]"
        rows = client.query(collection, filter=expr, output_fields=["id", "path"], consistency_level="Strong")
        for row in rows:
            found.setdefault(row["path"], []).append(int(row["id"]))
    return found


def _after_prefix(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: no such bound).

    Milvus compares VARCHARs byte-wise, and UTF-8 byte order is code point order, so a prefix test is
    ``prefix <= path < _after_prefix(prefix)``. This avoids ``like``, whose escaping of ``%``, ``_``
    and ``\\`` differs between Milvus versions (2.3 treats ``_`` literally, milvus-lite as a wildcard).
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code == 0xD800:  # surrogates cannot be encoded: the next code point is U+E000
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


def filter_expression(item_filter: ItemFilter | None) -> str:
    """``item_filter`` as a Milvus boolean expression (``""``: no condition)."""
    if item_filter is None or item_filter.empty:
        return ""
    parts = []
    if item_filter.labels is not None:
        names = ", ".join(_literal(name) for name in sorted(item_filter.labels))
        parts.append(f"(has_label == true and label in [{names}])")
    if item_filter.path_prefix is not None:
        upper = _after_prefix(item_filter.path_prefix)
        bound = f" and path < {_literal(upper)}" if upper is not None else ""
        parts.append(f"(path >= {_literal(item_filter.path_prefix)}{bound})")
    return " and ".join(parts)


#: Rows per insert request: ~10 MB at 512 dimensions, well under gRPC's 64 MB message limit.
INSERT_ROWS = 5_000


def insert_items(
    client,
    collection: str,
    layout: str,
    slices: Sequence[slice],
    x: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str | None],
    first: int,
    *,
    progress: bool = False,
) -> None:
    """Insert learner-normalised embeddings ``x`` as ids ``first, first + 1, ...`` (the stored form of
    :mod:`gce.retrieval.vectors`, and each learner's unit vector in the ``learners`` layout)."""
    from tqdm.auto import tqdm

    from gce.retrieval.embedder import normalize_learners
    from gce.retrieval.vectors import stored_vectors

    for start in tqdm(range(0, len(x), INSERT_ROWS), desc="inserting", disable=not progress, leave=False, unit="batch"):
        part = x[start : start + INSERT_ROWS]
        columns: dict[str, Any] = {"vector": stored_vectors(part, slices)}
        if layout == "learners":
            unit = normalize_learners(part, slices)
            columns.update({f"learner_{j}": unit[:, s] for j, s in enumerate(slices)})
        rows = [
            {
                "id": first + start + r,
                "path": str(paths[start + r]),
                "label": "" if labels[start + r] is None else str(labels[start + r]),
                "has_label": labels[start + r] is not None,
                **{name: values[r].tolist() for name, values in columns.items()},
            }
            for r in range(len(part))
        ]
        try:
            client.insert(collection, rows)
        except Exception as exc:
            raise GceError(f"Milvus insert into {collection!r} failed: {_milvus_error(exc)}") from None
