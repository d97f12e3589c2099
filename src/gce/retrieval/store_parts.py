"""The shards each process of an embedding job has written, until rank 0 lists them in the manifest.

``embeddings.json`` lists a contiguous run of shards from the first (readers and the format need
no more) and is written by one process only, rank 0. The shards an N-process job writes out of
that order are recorded by their writer in its own part file ``embeddings.part-<rank>.json``
(checksummed like the manifest, replaced atomically): the shard it is writing, then each shard it
finished, with the manifest's record of it. Rank 0 folds the records into the manifest as they
become contiguous (:func:`fold`): its own after each shard, everyone's at the end, when it removes
the part files. A finished store is thus the same files, byte for byte, whatever N wrote it.

A rerun (any N) starts with :func:`consolidate` on rank 0, before any process writes: every part
file is read and checked against the job, its finished shards verified by checksum and kept, the
shard each process was writing removed (a half-written shard is never trusted), and what is left
moved into rank 0's new part file; the others are removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gce.errors import DatasetError
from gce.io import remove_stale_temporaries
from gce.retrieval.files import check_checksum, read_manifest, write_checked_manifest
from gce.retrieval.store_manifest import MANIFEST, check_shard_record, damaged_as_error, shard_name

__all__ = [
    "PART_FORMAT",
    "PartWriter",
    "consolidate",
    "files_in_parts",
    "fold",
    "part_name",
    "read_parts",
    "shard_count",
]

PART_FORMAT = "gce-embeddings-part-1"
_PART = re.compile(r"embeddings\.part-(\d+)\.json")


def part_name(rank: int) -> str:
    return f"embeddings.part-{rank}.json"


def shard_count(job: dict[str, Any]) -> int:
    return -(-job["items_total"] // job["shard_size"])


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    """What ties a part file to its job (a part of another job is never merged)."""
    return {
        "model_id": job["model"]["model_id"],
        "items_sha256": job["items_sha256"],
        "items_total": job["items_total"],
        "dtype": job["dtype"],
        "shard_size": job["shard_size"],
    }


def _read_part(path: Path, job: dict[str, Any]) -> dict[str, Any]:
    part = read_manifest(path, "gce embedding part", PART_FORMAT, checksummed=True)
    with damaged_as_error(path):
        if {k: part.get(k) for k in _identity(job)} != _identity(job):
            raise DatasetError(f"{path}: a part of another embedding job (model, images, dtype or shard size)")
        shards, size, total = part.get("shards"), job["shard_size"], job["items_total"]
        if not isinstance(shards, list):
            raise DatasetError(f"{path}: damaged part (shards must be a list)")
        for shard in shards:
            start = shard.get("start") if isinstance(shard, dict) else None
            if not isinstance(start, int) or start % size or not 0 <= start < total:
                raise DatasetError(f"{path}: damaged part (a shard starts at {start!r})")
            check_shard_record(start // size, shard, start, min(start + size, total))
        names = {shard_name(n) for n in range(shard_count(job))}
        if part.get("writing") is not None and part.get("writing") not in names:
            raise DatasetError(f"{path}: damaged part (writing names {part.get('writing')!r})")
    return part


def _part_paths(out: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), out / m.group(0)) for p in out.iterdir() if (m := _PART.fullmatch(p.name)))


def read_parts(out: Path, job: dict[str, Any], ranks: range | None = None) -> list[dict[str, Any]]:
    """The part files in ``out`` (those of ``ranks`` only, when given), checked against ``job``."""
    return [_read_part(path, job) for rank, path in _part_paths(out) if ranks is None or rank in ranks]


def files_in_parts(out: Path) -> Callable[[dict[str, Any]], list[str]]:
    """For :func:`~gce.retrieval.store_manifest.open_store`: the files the part files of a manifest's
    job record (their shards, finished or being written) and the part files themselves."""

    def names(manifest: dict[str, Any]) -> list[str]:
        found = []
        for _rank, path in _part_paths(out):
            part = _read_part(path, manifest)
            found += [path.name, *(s["file"] for s in part["shards"]), *([part["writing"]] * bool(part["writing"]))]
        return found

    return names


def fold(manifest: dict[str, Any], records: dict[int, dict[str, Any]]) -> bool:
    """Append to the manifest's shards the records that continue them; True when any did."""
    shards = manifest["shards"]
    before = len(shards)
    while len(shards) in records:
        shards.append(records[len(shards)])
    if len(shards) == before:
        return False
    manifest["writing"] = None
    done = shards[-1]["stop"]
    skipped = sum(s["skipped"] for s in shards)
    manifest["complete"] = done >= manifest["items_total"]
    manifest["embedded"] = done - skipped
    manifest["skipped"] = skipped
    return True


def consolidate(out: Path, manifest: dict[str, Any], job: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Rank 0, before any process writes: the finished shards beyond the manifest's (verified),
    folded into it where they continue it, the rest kept in rank 0's part file; the shards that
    killed processes were writing, their temporaries and the other part files removed."""
    parts = read_parts(out, job)
    listed = len(manifest["shards"])
    records: dict[int, dict[str, Any]] = {}
    for part in parts:
        for shard in part["shards"]:
            number = shard["start"] // job["shard_size"]
            if number >= listed and number not in records:
                check_checksum(out / shard["file"], shard["sha256"])  # trusted only when intact
                records[number] = shard
    finished = {shard_name(n) for n in range(listed)} | {r["file"] for r in records.values()}
    for part in parts:
        for name in [s["file"] for s in part["shards"]] + [part["writing"]] * bool(part["writing"]):
            remove_stale_temporaries(out / name)
            if name not in finished:  # a half-written shard: redone
                (out / name).unlink(missing_ok=True)
    if fold(manifest, records):
        write_checked_manifest(out / MANIFEST, manifest)
    records = {n: r for n, r in records.items() if n >= len(manifest["shards"])}
    if records:  # first kept in the part of rank 0 of this run, then the old parts go
        PartWriter(out, 0, job, list(records.values())).save()
    for _rank, path in _part_paths(out):
        if not (records and path.name == part_name(0)):
            path.unlink(missing_ok=True)
    return records


class PartWriter:
    """One process's part file: the shard it is writing, then those it finished (atomic rewrites)."""

    def __init__(self, out: Path, rank: int, job: dict[str, Any], carried: list[dict[str, Any]] | None = None) -> None:
        self.path = out / part_name(rank)
        self.values: dict[str, Any] = {"format": PART_FORMAT, **_identity(job), "shards": list(carried or [])}
        self.values["writing"] = None

    def save(self) -> None:
        write_checked_manifest(self.path, self.values)

    def begin(self, name: str) -> None:
        """Recorded before the shard's file exists: a killed writer's leftover is known as ours."""
        self.values["writing"] = name
        self.save()

    def done(self, record: dict[str, Any]) -> None:
        self.values["shards"].append(record)
        self.values["writing"] = None
        self.save()

    @property
    def records(self) -> dict[int, dict[str, Any]]:
        size = self.values["shard_size"]
        return {s["start"] // size: s for s in self.values["shards"]}
