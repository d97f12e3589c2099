"""Embeddings of a catalogue on disk: sharded, resumable, tied to the model that made them.

Folder layout::

    embeddings.json          manifest (checksummed): the shards from the first on, in order
    shard-00000.npz          ids, embeddings (float32 or float16), paths, labels of items [start, stop)
    embeddings.part-R.json   while a job runs: process R's shards not yet in the manifest

Item ``i`` is the ``i``-th path of the input list (sorted for folders), so the ids of a resumed run
are those of an uninterrupted one; shard ``n`` always holds items ``[n * shard_size, ...)``. Before
a shard is written its process's part file names it (``writing``); the shard goes to a temporary
name, is flushed and renamed, and only then listed there with its sha256. Rank 0 (the only process
of a one-process job) moves the listed shards into the manifest when they continue it
(:mod:`.store_parts`). A killed run leaves at worst one named, unlisted shard per process, which
the next run removes and redoes; readers never see it. Readers accept a store only when the
manifest says it is complete, verify the manifest's own checksum and content, and check every
shard's checksum (:mod:`.store_read`).

N processes (``ctx``): each embeds its share of the missing shards (:mod:`.store_ranks`); the
finished store is the same files, byte for byte, as one process writes with the same threads.

The folder is the command's own: a new store needs a new or empty folder, and gce removes only
files its manifest and part files record (shards, those being written) and its own temporaries.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gce.data.images import load_rgb
from gce.distributed import SINGLE, DistContext, broadcast_object, distributed_errors
from gce.errors import BadImageError, DatasetError, GceError
from gce.io import refuse_foreign_dir
from gce.retrieval.batch_lanes import BatchLanes
from gce.retrieval.files import commit_file, shown_path, write_checked_manifest
from gce.retrieval.store_manifest import DTYPES, MANIFEST, open_store, shard_name
from gce.retrieval.store_parts import PartWriter, consolidate, files_in_parts, fold, part_name, read_parts, shard_count
from gce.retrieval.store_ranks import JobProgress, rank_share
from gce.retrieval.store_read import EmbeddingSet, read_store

__all__ = ["EmbeddingSet", "StoreInfo", "embed_to_store", "prepare_store", "read_store"]


#: Why an item is left out whose path or label cannot be written as UTF-8 (a file name in another
#: encoding): manifests are JSON, and the results are printed and served as UTF-8 text.
NOT_UTF8 = "file name is not valid UTF-8 (rename it)"


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
    ctx: DistContext | None = None,
) -> StoreInfo:
    """Embed ``paths`` into ``out_dir`` shard by shard, resuming a previous run of the same job.

    ``out_dir`` must be new, empty or a store (a folder holding anything else is refused, naming
    it). A store of another model, input list, dtype or shard size is refused (``overwrite`` starts
    over, removing only the files that store's manifest records). A path or label that is not
    valid UTF-8 is refused up front, or skipped and counted with ``skip_bad``.

    ``ctx``: one of the processes of a job (every process calls this with the same arguments):
    each embeds its share of the missing shards (:mod:`.store_ranks`), rank 0 alone writes the
    manifest and shows the progress of all; the store is the one a single process writes.
    """
    ctx = ctx or SINGLE
    paths, labels, job = _job(embedder, paths, labels, dtype, shard_size, skip_bad, source)
    out = Path(out_dir)
    with distributed_errors(ctx):
        manifest, carried, plan = _open_job(ctx, out, job, overwrite)
        done = plan["done"]
        mine = rank_share([n for n in range(shard_count(job)) if n not in done], ctx.rank, ctx.world_size)
        resumed_from = sum(_shard_range(n, job)[1] - _shard_range(n, job)[0] for n in done)
        bar = tqdm(
            total=len(paths),
            initial=resumed_from,
            desc=f"embedding into {shown_path(out.name)}" + (f" ({ctx.world_size} processes)" if ctx.enabled else ""),
            unit="img",
            disable=not (progress and ctx.is_main),
            dynamic_ncols=True,
        )
        tally = JobProgress(ctx, plan["token"], bar)
        part = PartWriter(out, ctx.rank, job, list(carried.values()))
        # One loader for every shard of this process's share: its decoding processes start once and
        # keep decoding the next shard's images while this one's embeddings are written.
        stream = _decoded_batches(
            embedder, paths, labels, [_shard_range(n, job) for n in mine], batch_size, workers, skip_bad
        )
        lanes = BatchLanes(embedder)
        try:
            for number in mine:
                start, stop = _shard_range(number, job)
                emb, ids, bad = _embed_range(embedder, paths, start, stop, stream, tally.advance, lanes)
                _write_shard(out, number, start, stop, (emb.astype(dtype), ids, bad), paths, labels, part)
                if ctx.is_main and fold(manifest, part.records):  # rank 0's shards continue the manifest's
                    write_checked_manifest(out / MANIFEST, manifest)
            tally.wait_for_all()
            summary = _finish(out, manifest, job, ctx) if ctx.is_main else None
        except OSError as exc:
            raise GceError(f"cannot write embeddings to {out}: {exc.strerror or exc}; rerun to resume") from None
        finally:
            lanes.close()
            bar.close()
        skipped, bad_all = broadcast_object(ctx, summary)  # also: no rank returns before the manifest is whole
    return StoreInfo(out, len(paths), len(paths) - skipped, skipped, bad_all, resumed_from)


def prepare_store(
    embedder,
    paths: Sequence[str],
    labels: Sequence[str | None] | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    shard_size: int = 4096,
    skip_bad: bool = False,
    source: str = "",
    overwrite: bool = False,
) -> int:
    """What :func:`embed_to_store` does before it embeds (checks; the store opened, resumed or
    started over), in one process: the number of shards left to embed. ``gce embed --nproc``."""
    paths, labels, job = _job(embedder, paths, labels, dtype, shard_size, skip_bad, source)
    _manifest, _carried, plan = _open_job(SINGLE, Path(out_dir), job, overwrite)
    return shard_count(job) - len(plan["done"])


def _job(embedder, paths, labels, dtype: str, shard_size: int, skip_bad: bool, source: str):
    """The input checked (one-line errors before any work) and what a store of it records."""
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
    job = {
        "model": embedder.metadata(),
        "items_total": len(paths),
        "items_sha256": _items_digest(paths, labels),
        "dtype": dtype,
        "shard_size": int(shard_size),
        "labels_known": any(label is not None for label in labels),
    }
    return paths, labels, job


def _shard_range(number: int, job: dict[str, Any]) -> tuple[int, int]:
    start = number * job["shard_size"]
    return start, min(start + job["shard_size"], job["items_total"])


def _open_job(
    ctx: DistContext, out: Path, job: dict[str, Any], overwrite: bool
) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]]:
    """Rank 0 opens the store (new, or resumed with every finished shard verified) before any
    process writes; every rank gets the finished shards' numbers, or rank 0's refusal as its own."""
    manifest: dict[str, Any] = {}
    carried: dict[int, dict[str, Any]] = {}
    plan: dict[str, Any] = {"refusal": None}
    if ctx.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise GceError(f"{out} exists and is not a folder")
            refuse_foreign_dir(out, marker=MANIFEST, what="embeddings folder")
            out.mkdir(parents=True, exist_ok=True)
            manifest = open_store(out, job, overwrite, files_in_parts(out))
            carried = consolidate(out, manifest, job)
            plan["done"] = set(range(len(manifest["shards"]))) | set(carried)
        except GceError as exc:
            if not ctx.enabled:
                raise
            plan["refusal"] = str(exc)
        plan["job"] = (job["model"]["model_id"], job["items_sha256"], job["dtype"], job["shard_size"])
        plan["token"] = uuid.uuid4().hex
    plan = broadcast_object(ctx, plan)
    if plan["refusal"] is not None:
        raise GceError(plan["refusal"])
    if plan["job"] != (job["model"]["model_id"], job["items_sha256"], job["dtype"], job["shard_size"]):
        raise GceError(
            f"rank {ctx.rank} has another model, list of images, dtype or shard size than rank 0;"
            " every process must run the same command on the same files"
        )
    return manifest, carried, plan


def _write_shard(out: Path, number: int, start: int, stop: int, shard, paths, labels, part: PartWriter) -> None:
    """Shard ``number``'s file, named in the part file before it exists and listed there once whole."""
    emb, ids, bad = shard
    buffer = io.BytesIO()
    np.savez(  # zip entries carry a fixed date: the same embeddings give the same bytes
        buffer,
        ids=ids,
        embeddings=emb,
        paths=np.array([paths[i] for i in ids], dtype=str),
        labels=np.array(["" if labels[i] is None else str(labels[i]) for i in ids], dtype=str),
    )
    final = out / shard_name(number)
    part.begin(final.name)  # recorded before the file exists: a killed run's leftover is ours
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    tmp.write_bytes(buffer.getvalue())
    commit_file(tmp, final)
    part.done(
        {
            "file": final.name,
            "start": start,
            "stop": stop,
            "count": len(ids),
            "skipped": len(bad),
            "bad": [list(b) for b in bad],
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
    )


def _finish(
    out: Path, manifest: dict[str, Any], job: dict[str, Any], ctx: DistContext
) -> tuple[int, list[tuple[str, str]]]:
    """Rank 0, once every process is done: all their shards into the manifest, part files removed."""
    records = {}
    for part in read_parts(out, job, range(ctx.world_size)):
        records.update({s["start"] // job["shard_size"]: s for s in part["shards"]})
    if fold(manifest, records) or not manifest["complete"]:
        write_checked_manifest(out / MANIFEST, manifest)
    if not manifest["complete"]:  # a process ended without its share: never expected, never hidden
        done = manifest["shards"][-1]["stop"] if manifest["shards"] else 0
        raise GceError(f"{out}: {done} of {job['items_total']} images in shards after every process ended; rerun")
    for rank in range(ctx.world_size):
        (out / part_name(rank)).unlink(missing_ok=True)
    bad = [(b[0], b[1]) for s in manifest["shards"] for b in s["bad"]]
    return manifest["skipped"], bad


def _decoded_batches(embedder, paths, labels, ranges, batch_size, workers, skip_bad):
    """Preprocessed batches of the items in ``ranges`` (shards, in order), none straddling a shard's end."""
    batches = [
        list(range(s, min(s + batch_size, stop))) for start, stop in ranges for s in range(start, stop, batch_size)
    ]
    if not batches:  # nothing left for this process: no decoding processes to start
        return iter(())
    dataset = _Images(paths, labels, embedder.transform, embedder.image_size, skip_bad)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers))


def _embed_range(embedder, paths, start, stop, stream, advance, lanes: BatchLanes):
    chunks, ids, bad = [], [], []

    def done(embeddings: np.ndarray, kept: np.ndarray) -> None:
        chunks.append(embeddings)
        ids.append(kept)

    seen = start
    while seen < stop:
        images, positions, errors = next(stream)
        ok = np.array([not e for e in errors], dtype=bool)
        for pos, error in zip(positions.tolist(), errors, strict=True):
            if error:
                bad.append((shown_path(paths[pos]), error))
        if ok.all():  # the usual case: no copy (and no torch thread pool woken beside the runtime's)
            lanes.submit(images, positions.numpy(), done)
        elif ok.any():
            lanes.submit(images[torch.from_numpy(ok)], positions.numpy()[ok], done)
        seen += len(errors)
        advance(len(errors))
    lanes.drain(done)  # the shard is whole before it is written
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.embedding_dim), dtype=np.float32)
    return emb, (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64)), bad
