"""Embeddings of a catalogue on disk: sharded, resumable, tied to the model that made them.

Folder layout::

    embeddings.json      manifest, rewritten atomically after every finished shard
    shard-00000.npz      ids, embeddings (float32 or float16), paths, labels of items [start, stop)

Item ``i`` is the ``i``-th path of the input list (sorted for folders), so the ids of a resumed run
are those of an uninterrupted one. A shard is written to a temporary name, flushed, renamed, and
only then listed in the manifest with its sha256: a killed run leaves at worst an unlisted shard,
which the next run overwrites and which readers never see. Readers accept a store only when the
manifest says it is complete, and check every shard's checksum.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gce.data.images import load_rgb
from gce.errors import BadImageError, DatasetError, GceError
from gce.retrieval.files import (
    check_checksum,
    commit_file,
    read_manifest,
    write_json_atomic,
)

__all__ = ["EmbeddingSet", "StoreInfo", "embed_to_store", "read_store"]

MANIFEST = "embeddings.json"
FORMAT = "gce-embeddings-1"
DTYPES = ("float32", "float16")


@dataclass
class EmbeddingSet:
    """Embeddings read back from a store (skipped images are absent)."""

    embeddings: np.ndarray  # (N, D) float32, learner-normalised
    ids: np.ndarray  # (N,) int64 positions in the input list
    paths: list[str]
    labels: list[str | None]
    model: dict[str, Any]
    path: Path


@dataclass
class StoreInfo:
    path: Path
    total: int
    embedded: int
    skipped: int
    bad: list[tuple[str, str]]
    resumed_from: int


def _items_digest(paths: Sequence[str], labels: Sequence[str | None]) -> str:
    digest = hashlib.sha256()
    for p, label in zip(paths, labels, strict=False):
        digest.update(f"{p}\0{'' if label is None else label}\n".encode())
    return digest.hexdigest()


class _Images(Dataset):
    """``(image tensor, position, error)``; with ``skip_bad`` an unreadable image gives an error text."""

    def __init__(self, paths: Sequence[str], transform, size: int, skip_bad: bool) -> None:
        self.paths, self.transform, self.size, self.skip_bad = paths, transform, size, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(self.paths[i])), i, ""
        except BadImageError as exc:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.size, self.size), i, exc.reason


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


def embed_to_store(
    embedder,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    shard_size: int = 4096,
    skip_bad: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    source: str = "",
    overwrite: bool = False,
) -> StoreInfo:
    """Embed ``paths`` into ``out_dir`` shard by shard, resuming a previous run of the same job.

    A store of another model, input list, dtype or shard size is refused (``overwrite`` starts over).
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise GceError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise GceError(f"shard size must be at least 1, got {shard_size}")
    paths = [str(p) for p in paths]
    labels = list(labels) if labels is not None else [None] * len(paths)
    if len(paths) == 0:
        raise DatasetError(f"no images to embed ({source or 'empty input'})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GceError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "model": embedder.metadata(),
        "items_total": len(paths),
        "items_sha256": _items_digest(paths, labels),
        "dtype": dtype,
        "shard_size": int(shard_size),
        "labels_known": any(label is not None for label in labels),
    }
    manifest = _resume_or_start(out, job, overwrite)
    done = sum(s["stop"] - s["start"] for s in manifest["shards"])
    resumed_from = done
    skipped = sum(s["skipped"] for s in manifest["shards"])
    bad: list[tuple[str, str]] = [tuple(b) for s in manifest["shards"] for b in s.get("bad", [])]
    bar = tqdm(
        total=len(paths),
        initial=done,
        desc=f"embedding into {out.name}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while done < len(paths):
            number = len(manifest["shards"])
            start, stop = done, min(done + shard_size, len(paths))
            emb, ids, shard_bad = _embed_range(embedder, paths, start, stop, batch_size, workers, skip_bad, bar)
            keep_paths = [paths[i] for i in ids]
            keep_labels = ["" if labels[i] is None else str(labels[i]) for i in ids]
            buffer = io.BytesIO()
            np.savez(
                buffer,
                ids=ids,
                embeddings=emb.astype(dtype),
                paths=np.array(keep_paths, dtype=str),
                labels=np.array(keep_labels, dtype=str),
            )
            final = out / _shard_name(number)
            tmp = out / f".{final.name}.tmp-{os.getpid()}"
            tmp.write_bytes(buffer.getvalue())
            commit_file(tmp, final)
            manifest["shards"].append(
                {
                    "file": final.name,
                    "start": start,
                    "stop": stop,
                    "count": len(ids),
                    "skipped": len(shard_bad),
                    "bad": shard_bad,
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                }
            )
            done = stop
            skipped += len(shard_bad)
            bad += shard_bad
            manifest["complete"] = done >= len(paths)
            manifest["embedded"] = done - skipped
            manifest["skipped"] = skipped
            write_json_atomic(out / MANIFEST, manifest)
    except OSError as exc:
        raise GceError(f"cannot write embeddings to {out}: {exc.strerror or exc}; rerun to resume") from None
    finally:
        bar.close()
    return StoreInfo(out, len(paths), len(paths) - skipped, skipped, bad, resumed_from)


def _resume_or_start(out: Path, job: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    path = out / MANIFEST
    if path.exists() and not overwrite:
        old = read_manifest(path, "gce embedding store", FORMAT)
        for key, what in (
            ("model", "model"),
            ("items_sha256", "list of images"),
            ("dtype", "dtype"),
            ("shard_size", "shard size"),
        ):
            mine = job[key]["model_id"] if key == "model" else job[key]
            theirs = old.get(key, {}).get("model_id") if key == "model" else old.get(key)
            if mine != theirs:
                raise GceError(
                    f"{out} holds embeddings of another {what} ({str(theirs)[:12]} there,"
                    f" {str(mine)[:12]} now); use another --out, or --overwrite to start over"
                )
        for shard in old["shards"]:  # a resumed run trusts only complete, intact shards
            check_checksum(out / shard["file"], shard["sha256"])
        listed = {s["file"] for s in old["shards"]}
        _remove_unlisted(out, listed)
        return old
    for child in out.iterdir():
        if child.name.startswith(("shard-", ".shard-")) or child.name == MANIFEST:
            child.unlink()
    manifest = {"format": FORMAT, **job, "shards": [], "complete": False, "embedded": 0, "skipped": 0}
    write_json_atomic(path, manifest)
    return manifest


def _remove_unlisted(out: Path, listed: set[str]) -> None:
    for child in out.iterdir():
        if child.name.startswith(("shard-", ".shard-")) and child.name not in listed:
            child.unlink(missing_ok=True)  # left by a killed run: never read, redone now


def _embed_range(embedder, paths, start, stop, batch_size, workers, skip_bad, bar):
    dataset = _Images(paths[start:stop], embedder.transform, embedder.image_size, skip_bad)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    chunks, ids, bad = [], [], []
    for images, positions, errors in loader:
        ok = np.array([not e for e in errors], dtype=bool)
        for pos, error in zip(positions.tolist(), errors, strict=True):
            if error:
                bad.append((paths[start + pos], error))
        if ok.any():
            chunks.append(embedder.embed_tensors(images[torch.from_numpy(ok)]))
            ids.append(start + positions.numpy()[ok])
        bar.update(len(errors))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.embedding_dim), dtype=np.float32)
    return emb, (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64)), bad


def read_store(path: str | os.PathLike, *, require_complete: bool = True) -> EmbeddingSet:
    """Read a store's embeddings (float32) with their ids, paths and labels, checking every shard."""
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such embeddings folder")
    manifest = read_manifest(folder / MANIFEST, "gce embeddings folder", FORMAT)
    try:
        shards, model, labels_known = manifest["shards"], manifest["model"], manifest["labels_known"]
        dim = int(model["embedding_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{folder / MANIFEST}: damaged manifest (missing or bad {exc})") from None
    if require_complete and not manifest.get("complete"):
        done = sum(s["stop"] - s["start"] for s in shards)
        raise DatasetError(
            f"{folder}: incomplete ({done} of {manifest['items_total']} images embedded);"
            f" rerun the same gce embed command to finish it"
        )
    embs, ids, paths, labels = [], [], [], []
    for shard in shards:
        file = folder / shard["file"]
        check_checksum(file, shard["sha256"])
        try:
            with np.load(file, allow_pickle=False) as data:
                e, i, p, lab = data["embeddings"], data["ids"], data["paths"], data["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"{file}: cannot be read ({type(exc).__name__})") from None
        if e.ndim != 2 or e.shape[1] != dim or len(e) != shard["count"] or len(i) != shard["count"]:
            raise DatasetError(f"{file}: holds {e.shape} embeddings, the manifest says ({shard['count']}, {dim})")
        embs.append(e.astype(np.float32))
        ids.append(i)
        paths += p.tolist()
        labels += [label if labels_known else None for label in lab.tolist()]
    embeddings = np.concatenate(embs) if embs else np.zeros((0, dim), dtype=np.float32)
    return EmbeddingSet(
        embeddings, np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), paths, labels, model, folder
    )
