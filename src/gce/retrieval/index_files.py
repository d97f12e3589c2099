"""The on-disk form of an index folder: the manifest and the generation files it names.

``manifest.json`` (written last, atomically) names the generation's files with their sha256:
``index.<gen>.faiss`` and ``items.<gen>.npz``. ``add`` writes the next generation and then swaps
the manifest, so a killed write leaves the previous, complete index; files of other generations
are deleted afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gce.errors import GceError
from gce.io import sha256_file
from gce.retrieval.faiss_build import load_faiss
from gce.retrieval.files import commit_file, read_manifest, write_json_atomic
from gce.retrieval.items import ItemTable

__all__ = ["FORMAT", "MANIFEST", "check_model_meta", "current_files", "write_generation"]

MANIFEST = "manifest.json"
FORMAT = "gce-index-1"


def check_model_meta(meta: dict[str, Any]) -> None:
    for key in ("model_id", "embedding_dim", "num_learners", "learner_slices"):
        if key not in meta:
            raise GceError(f"model metadata lacks {key!r}")


def write_generation(folder: Path, index, items: ItemTable, manifest: dict[str, Any]) -> None:
    faiss = load_faiss()
    folder.mkdir(parents=True, exist_ok=True)
    gen = int(manifest.get("generation", -1)) + 1
    names = {"index": f"index.{gen}.faiss", "items": f"items.{gen}.npz"}
    pid = os.getpid()
    tmp_index = folder / f".{names['index']}.tmp-{pid}"
    tmp_items = folder / f".{names['items']}.tmp-{pid}"
    try:
        faiss.write_index(index, str(tmp_index))
        tmp_items.write_bytes(items.to_bytes())
        commit_file(tmp_index, folder / names["index"])
        commit_file(tmp_items, folder / names["items"])
    except (OSError, RuntimeError) as exc:
        tmp_index.unlink(missing_ok=True)
        tmp_items.unlink(missing_ok=True)
        raise GceError(f"cannot write the index to {folder}: {exc}; the previous index is kept") from None
    files = {
        key: {"name": name, "sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for key, name in names.items()
    }
    write_json_atomic(
        folder / MANIFEST, {**manifest, "format": FORMAT, "generation": gen, "files": files, "size": int(index.ntotal)}
    )
    keep = set(names.values()) | {MANIFEST}
    for path in folder.iterdir():  # older generations and temporaries of killed writers
        if path.name not in keep and (path.name.startswith(("index.", "items.", ".index.", ".items.", f".{MANIFEST}"))):
            path.unlink(missing_ok=True)


def current_files(folder: Path) -> dict[str, str]:
    manifest = read_manifest(folder / MANIFEST, "gce index", FORMAT)
    return {key: value["name"] for key, value in manifest["files"].items()}
