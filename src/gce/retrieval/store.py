"""Embeddings of a catalogue on disk: sharded, resumable, tied to the model that made them.

Folder layout::

    embeddings.json      manifest (checksummed), rewritten atomically around every shard
    shard-00000.npz      ids, embeddings (float32 or float16), paths, labels of items [start, stop)

Item ``i`` is the ``i``-th path of the input list (sorted for folders), so the ids of a resumed run
are those of an uninterrupted one. Before a shard is written the manifest names it (``writing``);
the shard goes to a temporary name, is flushed and renamed, and only then listed with its sha256.
A killed run leaves at worst that one named, unlisted shard, which the next run removes and redoes;
readers never see it. Readers accept a store only when the manifest says it is complete, verify
the manifest's own checksum and content, and check every shard's checksum.

The folder is the command's own: a new store needs a new or empty folder, and gce removes only
files its manifest records (listed shards, the one being written) and its own temporaries.
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
from gce.io import refuse_foreign_dir
from gce.retrieval.files import check_checksum, commit_file, shown_path, write_checked_manifest
from gce.retrieval.store_manifest import DTYPES, MANIFEST, open_store, read_store_manifest, shard_name

__all__ = ["EmbeddingSet", "StoreInfo", "embed_to_store", "read_store"]

#: Why an item is left out whose path or label cannot be written as UTF-8 (a file name in another
#: encoding): manifests are JSON, and the results are printed and served as UTF-8 text.
NOT_UTF8 = "file name is not valid UTF-8 (rename it)"


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


def _utf8(text: str | None) -> bool:
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _items_digest(paths: Sequence[str], labels: Sequence[str | None]) -> str:
    digest = hashlib.sha256()
    for p, label in zip(paths, labels, strict=False):  # surrogateescape: the file name's own bytes
        digest.update(f"{p}\0{'' if label is None else label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class _Images(Dataset):
    """``(image tensor, position, error)``; with ``skip_bad`` an unreadable image gives an error text."""

    def __init__(self, paths: Sequence[str], labels, transform, size: int, skip_bad: bool) -> None:
        self.paths, self.labels, self.transform, self.size, self.skip_bad = paths, labels, transform, size, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if not (_utf8(self.paths[i]) and _utf8(self.labels[i])):
                raise BadImageError(shown_path(self.paths[i]), NOT_UTF8)
            return self.transform(load_rgb(self.paths[i])), i, ""
        except BadImageError as exc:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.size, self.size), i, exc.reason


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

    ``out_dir`` must be new, empty or a store (a folder holding anything else is refused, naming
    it). A store of another model, input list, dtype or shard size is refused (``overwrite`` starts
    over, removing only the files that store's manifest records). A path or label that is not
    valid UTF-8 is refused up front, or skipped and counted with ``skip_bad``.
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
    if not skip_bad:  # before any work, not after hours of embedding
        unnamed = [p for p, label in zip(paths, labels, strict=False) if not (_utf8(p) and _utf8(label))]
        if unnamed:
            raise DatasetError(
                f"{shown_path(unnamed[0])}: {NOT_UTF8}; {len(unnamed)} such item(s) in all"
                " (or --skip-bad to leave them out)"
            )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GceError(f"{out} exists and is not a folder")
    refuse_foreign_dir(out, marker=MANIFEST, what="embeddings folder")
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "model": embedder.metadata(),
        "items_total": len(paths),
        "items_sha256": _items_digest(paths, labels),
        "dtype": dtype,
        "shard_size": int(shard_size),
        "labels_known": any(label is not None for label in labels),
    }
    manifest = open_store(out, job, overwrite)
    done = sum(s["stop"] - s["start"] for s in manifest["shards"])
    resumed_from = done
    skipped = sum(s["skipped"] for s in manifest["shards"])
    bad: list[tuple[str, str]] = [(b[0], b[1]) for s in manifest["shards"] for b in s.get("bad", [])]
    bar = tqdm(
        total=len(paths),
        initial=done,
        desc=f"embedding into {shown_path(out.name)}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    # One loader for every shard left: its decoding processes start once and keep decoding the next
    # shard's images while this one's embeddings are written.
    stream = _decoded_batches(embedder, paths, labels, done, shard_size, batch_size, workers, skip_bad)
    try:
        while done < len(paths):
            number = len(manifest["shards"])
            start, stop = done, min(done + shard_size, len(paths))
            emb, ids, shard_bad = _embed_range(embedder, paths, start, stop, stream, bar)
            buffer = io.BytesIO()
            np.savez(
                buffer,
                ids=ids,
                embeddings=emb.astype(dtype),
                paths=np.array([paths[i] for i in ids], dtype=str),
                labels=np.array(["" if labels[i] is None else str(labels[i]) for i in ids], dtype=str),
            )
            final = out / shard_name(number)
            manifest["writing"] = final.name  # recorded before the file exists: a killed run's leftover is ours
            write_checked_manifest(out / MANIFEST, manifest)
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
                    "bad": [list(b) for b in shard_bad],
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                }
            )
            done = stop
            skipped += len(shard_bad)
            bad += shard_bad
            manifest["writing"] = None
            manifest["complete"] = done >= len(paths)
            manifest["embedded"] = done - skipped
            manifest["skipped"] = skipped
            write_checked_manifest(out / MANIFEST, manifest)
    except OSError as exc:
        raise GceError(f"cannot write embeddings to {out}: {exc.strerror or exc}; rerun to resume") from None
    finally:
        bar.close()
    return StoreInfo(out, len(paths), len(paths) - skipped, skipped, bad, resumed_from)


def _decoded_batches(embedder, paths, labels, done, shard_size, batch_size, workers, skip_bad):
    """Preprocessed batches of the items from ``done`` on, none straddling a shard's end."""
    batches = [
        list(range(s, min(s + batch_size, shard_start + shard_size, len(paths))))
        for shard_start in range(done, len(paths), shard_size)
        for s in range(shard_start, min(shard_start + shard_size, len(paths)), batch_size)
    ]
    dataset = _Images(paths, labels, embedder.transform, embedder.image_size, skip_bad)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers))


def _embed_range(embedder, paths, start, stop, stream, bar):
    chunks, ids, bad = [], [], []
    seen = start
    while seen < stop:
        images, positions, errors = next(stream)
        ok = np.array([not e for e in errors], dtype=bool)
        for pos, error in zip(positions.tolist(), errors, strict=True):
            if error:
                bad.append((shown_path(paths[pos]), error))
        if ok.any():
            chunks.append(embedder.embed_tensors(images[torch.from_numpy(ok)]))
            ids.append(positions.numpy()[ok])
        seen += len(errors)
        bar.update(len(errors))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.embedding_dim), dtype=np.float32)
    return emb, (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64)), bad


def read_store(path: str | os.PathLike, *, require_complete: bool = True) -> EmbeddingSet:
    """Read a store's embeddings (float32) with their ids, paths and labels, checking the manifest
    (its checksum and content) and every shard (its checksum and content)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such embeddings folder")
    manifest = read_store_manifest(folder / MANIFEST)
    shards, model, labels_known = manifest["shards"], manifest["model"], manifest["labels_known"]
    dim = model["embedding_dim"]
    if require_complete and not manifest["complete"]:
        done = shards[-1]["stop"] if shards else 0
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
        count = shard["count"]
        if e.ndim != 2 or e.shape != (count, dim) or e.dtype != np.dtype(manifest["dtype"]):
            raise DatasetError(
                f"{file}: holds {e.shape} {e.dtype} embeddings, the manifest says ({count}, {dim}) {manifest['dtype']}"
            )
        in_range = i.ndim == 1 and len(i) == count and bool(np.all((i >= shard["start"]) & (i < shard["stop"])))
        if not in_range or bool(np.any(np.diff(i) <= 0)) or len(p) != count or len(lab) != count:
            raise DatasetError(f"{file}: its ids, paths or labels do not match the manifest's range and count")
        embs.append(e.astype(np.float32))
        ids.append(i.astype(np.int64))
        paths += p.tolist()
        labels += [label if labels_known else None for label in lab.tolist()]
    embeddings = np.concatenate(embs) if embs else np.zeros((0, dim), dtype=np.float32)
    return EmbeddingSet(
        embeddings, np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), paths, labels, model, folder
    )
