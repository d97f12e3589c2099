"""An index folder's ``manifest.json``: what it must hold, its own checksum, and the checks on load.

The manifest is the folder's pointer: it names the current generation's files with their sha256
and is replaced atomically (one rename), so its checksum lives inside it (``"manifest_sha256"``, as
for an embeddings folder: :func:`gce.retrieval.files.write_checked_manifest`) rather than in a
``.sha256`` sidecar, which could not be swapped in the same rename. Everything a reader relies on
is validated, so an edited or damaged manifest is a one-line error, never a traceback or a
silently different score.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any

from gce.config.vocabulary import INDEX_TYPES
from gce.errors import DatasetError
from gce.retrieval.files import MANIFEST_CHECKSUM, manifest_digest, read_manifest, write_checked_manifest

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ManifestError",
    "check_model_meta",
    "file_name",
    "read_index_manifest",
    "validate_manifest",
    "write_index_manifest",
]

MANIFEST = "manifest.json"
FORMAT = "gce-index-1"
#: Search parameters each index type understands (anything else in a manifest is refused).
SEARCH_PARAMS = {"flat": (), "ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("ef_search",)}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """What is wrong with a manifest's content (turned into a DatasetError naming the file)."""


def file_name(key: str, generation: int) -> str:
    """The one name the ``key`` file ("index" or "items") of ``generation`` may have."""
    return f"index.{generation}.faiss" if key == "index" else f"items.{generation}.npz"


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ManifestError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ManifestError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be an object, got {type(value).__name__}")
    return value


def check_model_meta(meta: Any) -> None:
    """Model metadata: an id, a dimension, K learners whose slices tile ``[0, dim)`` in order, none empty."""
    meta = _dict(meta, "model")
    for key in ("model_id", "embedding_dim", "num_learners", "learner_slices"):
        if key not in meta:
            raise ManifestError(f"model metadata lacks {key!r}")
    if not isinstance(meta["model_id"], str) or not meta["model_id"]:
        raise ManifestError(f"model_id must be a non-empty string, got {meta['model_id']!r}")
    dim = _int(meta["embedding_dim"], "embedding_dim", 1)
    k = _int(meta["num_learners"], "num_learners", 1)
    slices = meta["learner_slices"]
    if not isinstance(slices, list | tuple) or len(slices) != k:
        raise ManifestError(f"learner_slices must be a list of {k} [start, stop] pairs, got {slices!r}"[:200])
    stop = 0
    for i, pair in enumerate(slices):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ManifestError(f"learner_slices[{i}] must be a [start, stop] pair, got {pair!r}")
        a, b = _int(pair[0], f"learner_slices[{i}] start", 0), _int(pair[1], f"learner_slices[{i}] stop", 0)
        if a != stop or b <= a:  # a gap, an overlap or an empty learner would change every score
            raise ManifestError(
                f"learner_slices[{i}] = [{a}, {b}]: the learners' slices must be non-empty and tile"
                f" [0, {dim}) in order (expected a slice starting at {stop})"
            )
        stop = b
    if stop != dim:
        raise ManifestError(f"learner_slices end at {stop}, but embedding_dim is {dim}")


def validate_manifest(values: dict[str, Any]) -> None:
    """Raise :class:`ManifestError` naming the first thing a reader could not rely on."""
    gen = _int(values.get("generation"), "generation", 0)
    if values.get("index_type") not in INDEX_TYPES:
        raise ManifestError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {values.get('index_type')!r}")
    size = _int(values.get("size"), "size", 1)
    if _int(values.get("deleted", 0), "deleted", 0) > size:  # absent in indexes written before deletes
        raise ManifestError(f"deleted ({values['deleted']}) must be at most size ({size})")
    check_model_meta(values.get("model"))
    for key, value in _dict(values.get("params", {}), "params").items():
        _int(value, f"params.{key}", 1)
    allowed = SEARCH_PARAMS[values["index_type"]]
    for key, value in _dict(values.get("search_params", {}), "search_params").items():
        if key not in allowed:
            raise ManifestError(f"search_params.{key} does not apply to a {values['index_type']} index")
        _int(value, f"search_params.{key}", 1)
    if not isinstance(values.get("sources", []), list):
        raise ManifestError("sources must be a list")
    files = _dict(values.get("files"), "files")
    for key in ("index", "items"):
        entry = _dict(files.get(key), f"files.{key}")
        if entry.get("name") != file_name(key, gen):  # never a path: nothing outside the folder is read
            raise ManifestError(f"files.{key}.name must be {file_name(key, gen)!r}, got {entry.get('name')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise ManifestError(f"files.{key}.sha256 must be 64 hex digits")
        _int(entry.get("bytes"), f"files.{key}.bytes", 1)


def read_index_manifest(folder: Path) -> dict[str, Any]:
    """The verified, validated manifest of the index ``folder`` (with its ``"manifest_sha256"``, the
    identity of this version), or a one-line :class:`DatasetError`."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such index folder")
    path = folder / MANIFEST
    try:
        body = read_manifest(path, "gce index", FORMAT, checksummed=True)
    except ValueError as exc:  # NaN or infinity in an edited file: gce never writes them
        raise DatasetError(f"{path}: damaged manifest ({exc})") from None
    try:
        validate_manifest(body)
    except ManifestError as exc:
        raise DatasetError(f"{path}: damaged manifest ({exc})") from None
    return {**body, MANIFEST_CHECKSUM: manifest_digest(body)}


def write_index_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Write ``body`` with its checksum as the folder's manifest (atomically); returns what was written."""
    values = {**body, "format": FORMAT}
    write_checked_manifest(folder / MANIFEST, values)
    return {**values, MANIFEST_CHECKSUM: manifest_digest(values)}
