"""The embedding store's manifest (``embeddings.json``): read back verified, its content checked.

The manifest carries its own checksum (:func:`gce.retrieval.files.write_checked_manifest`), so an
edited or damaged one is refused; its content is checked too (each refusal one line naming the
file), since every later score depends on it: the learner slices, the shard ranges and counts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gce.errors import DatasetError, GceError
from gce.io import remove_stale_temporaries
from gce.retrieval.embedder import learner_slices_problem
from gce.retrieval.files import check_checksum, read_manifest, write_checked_manifest

__all__ = [
    "DTYPES",
    "FORMAT",
    "MANIFEST",
    "check_shard_record",
    "damaged_as_error",
    "open_store",
    "read_store_manifest",
    "shard_name",
]

MANIFEST = "embeddings.json"
FORMAT = "gce-embeddings-1"
DTYPES = ("float32", "float16")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


class _Damaged(Exception):
    pass


@contextmanager
def damaged_as_error(path: Path) -> Iterator[None]:
    """A failed content check of the file ``path`` as one line naming it."""
    try:
        yield
    except _Damaged as exc:
        raise DatasetError(f"{path}: damaged ({exc})") from None


def read_store_manifest(path: Path, what: str = "gce embeddings folder") -> dict[str, Any]:
    """``embeddings.json`` checked against its checksum and for consistent content (one-line errors)."""
    manifest = read_manifest(path, what, FORMAT, checksummed=True)
    try:
        _check(manifest)
    except _Damaged as exc:
        raise DatasetError(f"{path}: damaged manifest ({exc})") from None
    return manifest


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise _Damaged(problem)


def _check(m: dict[str, Any]) -> None:
    model: Any = m.get("model")  # untrusted JSON: checked step by step
    _need(isinstance(model, dict), "no model section")
    _need(isinstance(model.get("model_id"), str) and bool(model["model_id"]), "no model_id")
    problem = learner_slices_problem(model.get("learner_slices"), model.get("embedding_dim"), model.get("num_learners"))
    _need(problem is None, str(problem))
    total: Any = m.get("items_total")
    size: Any = m.get("shard_size")
    _need(_is_int(total, 1), f"items_total must be a positive integer, got {total!r}")
    _need(_is_int(size, 1), f"shard_size must be a positive integer, got {size!r}")
    _need(isinstance(m.get("items_sha256"), str) and bool(_SHA256.fullmatch(m["items_sha256"])), "bad items_sha256")
    _need(m.get("dtype") in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {m.get('dtype')!r}")
    for key in ("labels_known", "complete"):
        _need(isinstance(m.get(key), bool), f"{key} must be true or false")
    shards: Any = m.get("shards")
    _need(isinstance(shards, list), "shards must be a list")
    done = skipped = 0
    for number, shard in enumerate(shards):
        check_shard_record(number, shard, done, min(done + size, total))
        done, skipped = shard["stop"], skipped + shard["skipped"]
        if done == total:
            _need(number == len(shards) - 1, f"shards after the last item (shard {number + 1})")
    _need(m["complete"] == (done == total), f"complete is {m['complete']} but {done} of {total} items are in shards")
    _need(m.get("embedded") == done - skipped, f"embedded is {m.get('embedded')!r}, the shards hold {done - skipped}")
    _need(m.get("skipped") == skipped, f"skipped is {m.get('skipped')!r}, the shards list {skipped}")
    writing = m.get("writing")
    _need(writing in (None, shard_name(len(shards))), f"writing names {writing!r}, not the next shard")


def check_shard_record(number: int, shard: Any, start: int, stop: int) -> None:
    """Shard ``number``'s record (its file, range, counts, skipped images, checksum) is consistent."""
    where = f"shard {number}"
    _need(isinstance(shard, dict), f"{where} is not an object")
    _need(shard.get("file") == shard_name(number), f"{where} must be the file {shard_name(number)}")
    _need(
        shard.get("start") == start and shard.get("stop") == stop,
        f"{where} covers {shard.get('start')!r}..{shard.get('stop')!r}, expected {start}..{stop}",
    )
    count, skipped, bad = shard.get("count"), shard.get("skipped"), shard.get("bad")
    _need(_is_int(count) and _is_int(skipped) and count + skipped == stop - start, f"{where}: bad count or skipped")
    _need(
        isinstance(bad, list)
        and len(bad) == skipped
        and all(isinstance(b, list) and len(b) == 2 and all(isinstance(x, str) for x in b) for b in bad),
        f"{where}: bad must list the {skipped} skipped images as [path, reason]",
    )
    _need(isinstance(shard.get("sha256"), str) and bool(_SHA256.fullmatch(shard["sha256"])), f"{where}: bad sha256")


def _own_files(manifest: dict[str, Any]) -> list[str]:
    """The shard files a store's manifest records: those listed and the one being written."""
    names = [s["file"] for s in manifest["shards"]]
    return names + ([manifest["writing"]] if manifest.get("writing") else [])


def _remove_leftovers(out: Path, manifest: dict[str, Any], keep_listed: bool) -> None:
    """Remove what a killed run of this store left: the shard it was writing and its temporaries
    (those of live processes are kept); with ``keep_listed`` false, the listed shards too."""
    listed = {s["file"] for s in manifest["shards"]}
    for name in _own_files(manifest):
        remove_stale_temporaries(out / name)
        if not (keep_listed and name in listed):
            (out / name).unlink(missing_ok=True)
    manifest["writing"] = None


def open_store(
    out: Path,
    job: dict[str, Any],
    overwrite: bool,
    in_parts: Callable[[dict[str, Any]], list[str]] | None = None,
) -> dict[str, Any]:
    """The manifest to continue: the store's own when it resumes the same ``job``, else a new one
    (``overwrite``: after removing the files the old manifest records, and nothing else).
    ``in_parts(manifest)``: the files the part files of that manifest's job record (their shards
    and themselves, :mod:`.store_parts`): the store's own too."""
    in_parts = in_parts or (lambda manifest: [])
    path = out / MANIFEST
    if path.exists():
        try:
            old = read_store_manifest(path, "gce embedding store")
        except DatasetError as exc:
            raise DatasetError(
                f"{exc}; gce removes only files a readable manifest records, so delete {out} yourself"
                " or choose another --out"
            ) from None
        if not overwrite:
            _check_same_job(out, old, job)
            for shard in old["shards"]:  # a resumed run trusts only complete, intact shards
                check_checksum(out / shard["file"], shard["sha256"])
            _remove_leftovers(out, old, keep_listed=True)
            _refuse_strangers(out, old, job, set(in_parts(old)))
            return old
        for name in in_parts(old):
            remove_stale_temporaries(out / name)
            (out / name).unlink(missing_ok=True)
        _remove_leftovers(out, old, keep_listed=False)
    manifest = {
        "format": FORMAT,
        **job,
        "shards": [],
        "writing": None,
        "complete": False,
        "embedded": 0,
        "skipped": 0,
    }
    _refuse_strangers(out, manifest, job, set())
    write_checked_manifest(path, manifest)
    return manifest


def _check_same_job(out: Path, old: dict[str, Any], job: dict[str, Any]) -> None:
    for key, what in (
        ("model", "model"),
        ("items_sha256", "list of images"),
        ("dtype", "dtype"),
        ("shard_size", "shard size"),
    ):
        mine = job[key]["model_id"] if key == "model" else job[key]
        theirs = old[key]["model_id"] if key == "model" else old[key]
        if mine != theirs:
            raise GceError(
                f"{out} holds embeddings of another {what} ({str(theirs)[:12]} there,"
                f" {str(mine)[:12]} now); use another --out, or --overwrite to start over"
            )


def _refuse_strangers(out: Path, manifest: dict[str, Any], job: dict[str, Any], own: set[str]) -> None:
    """Refuse a file this store did not write at a name it is about to write (never replaced)."""
    first = len(manifest["shards"])
    last = -(-job["items_total"] // job["shard_size"])
    for number in range(first, last):
        name = shard_name(number)
        if name not in own and os.path.lexists(out / name):
            raise GceError(
                f"{out / name} was not written by this store (its manifest does not list it);"
                " it is not replaced: move it away or choose another --out"
            )
