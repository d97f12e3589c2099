"""An index folder on disk: immutable generation files, one manifest naming them, one writer at a time.

Layout::

    manifest.json        names the current generation's files with their sha256 (gce.retrieval.index_manifest)
    index.<gen>.faiss    the faiss index of generation <gen>: never rewritten once a manifest names it
    items.<gen>.npz      its id -> (path, label) table and the ids of deleted items
    build_report.json    what gce index build measured
    write.lock           held (flock, holding its pid) by the one build or add writing the folder

Writers (``build``, ``add``, ``delete``) hold ``write.lock``; a second writer is refused at once with a one-line
error naming the holder's pid. A writer writes the next generation under new names (a delete, which
changes only the item table, hard-links the unchanged index file under its new name), replaces the
manifest (one atomic rename, fsynced), and only then removes the files the previous manifest named.
Readers take no lock: they read the manifest once, then the files it names; when one of them
vanished because a writer published a newer generation meanwhile, the load starts again from the
new manifest (at most :data:`LOAD_TRIES` times), so a reader sees the old index or the new one,
never a mix and never an error.

The folder's own files are those a manifest named, temporaries ``.<name>.tmp-<pid>`` of writers
that died, and generation files newer than the manifest (written by a writer killed before it could
name them). Nothing else in the folder is ever removed, and a build refuses a non-empty folder
without a manifest, naming what is in it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from gce.errors import DatasetError, GceError
from gce.io import hold_lock, pid_alive, refuse_foreign_dir, sha256_file
from gce.retrieval.faiss_build import load_faiss
from gce.retrieval.files import MANIFEST_CHECKSUM, commit_file, read_manifest
from gce.retrieval.index_manifest import FORMAT, MANIFEST, file_name, read_index_manifest, write_index_manifest
from gce.retrieval.items import ItemTable

__all__ = [
    "LOCK",
    "REPORT",
    "check_build_target",
    "load_generation",
    "manifest_body",
    "previous_manifest",
    "write_generation",
    "writer_lock",
]

LOCK = "write.lock"
REPORT = "build_report.json"
#: A load restarts when a writer published a new generation under it; this many times at most.
LOAD_TRIES = 5
_GENERATION_FILE = re.compile(r"^(?:index\.(\d+)\.faiss|items\.(\d+)\.npz)$")
_TEMPORARY = re.compile(r"^\.(?:index\.\d+\.faiss|items\.\d+\.npz|manifest\.json|build_report\.json)\.tmp-(\d+)$")
#: The faiss class each index type reads back as (an edited manifest cannot relabel an index).
_FAISS_CLASS = {"flat": "IndexFlatIP", "hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ"}


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock (created with the folder); a second writer gets a one-line
    :class:`LockedError` naming the holder's pid, at once (no waiting: the user decides)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_lock(folder / LOCK, f"index {folder}"))
        except OSError as exc:
            raise GceError(f"index {folder}: cannot take its write lock ({exc.strerror or exc})") from None
        yield


def check_build_target(folder: Path, *, overwrite: bool) -> None:
    """Before a build (and again under the lock): the folder is new, empty but for a killed writer's
    lock and temporaries, or (with ``overwrite``) a gce index. One-line errors otherwise."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise GceError(f"{folder} exists and is not a folder")
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise GceError(f"index folder {folder} cannot be listed: {exc.strerror or exc}") from None
    if all(name == LOCK or _TEMPORARY.match(name) for name in entries):
        return
    refuse_foreign_dir(folder, marker=MANIFEST, what="index folder")
    if not overwrite:
        raise GceError(f"{folder} already holds an index; use gce index add, or overwrite it")
    read_manifest(folder / MANIFEST, "gce index", FORMAT)  # another program's manifest.json: refused


def previous_manifest(folder: Path) -> dict[str, Any] | None:
    """Under the lock, before an overwrite: the verified manifest, or None when there is none or it is
    damaged (then none of the old files is removed: the damaged manifest cannot say which are ours)."""
    try:
        return read_index_manifest(folder)
    except DatasetError:
        return None


def manifest_body(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a new generation carries over from a manifest (the rest is written anew)."""
    written = (MANIFEST_CHECKSUM, "format", "generation", "files", "size", "deleted")
    return {k: v for k, v in manifest.items() if k not in written}


def _generation_of(name: str) -> int | None:
    match = _GENERATION_FILE.match(name)
    return None if match is None else int(match.group(1) or match.group(2))


def write_generation(
    folder: Path,
    index,
    items: ItemTable,
    body: dict[str, Any],
    previous: dict[str, Any] | None,
    *,
    same_index: bool = False,
) -> dict[str, Any]:
    """Under the lock: write the next generation, publish it (the manifest), then remove what it
    superseded. Returns the new manifest. A failure before the manifest leaves the previous index.

    ``same_index``: ``index`` is the previous generation's, unchanged (a delete): its file is
    hard-linked under the new name instead of written again (copied where links are refused).
    """
    faiss = load_faiss()
    if previous is not None:
        gen = int(previous["generation"]) + 1  # names above it were never published: safe to reuse
    else:  # no trusted manifest: never reuse a name a reader may hold
        gen = 1 + max((g for name in os.listdir(folder) if (g := _generation_of(name)) is not None), default=-1)
    names = {key: file_name(key, gen) for key in ("index", "items")}
    temps = {key: folder / f".{name}.tmp-{os.getpid()}" for key, name in names.items()}
    try:
        if same_index and previous is not None:
            # An unpublished file of a killed writer may already be a link to the same file under
            # the new name; a rename between two links of one file would do nothing.
            (folder / names["index"]).unlink(missing_ok=True)
            _link_or_copy(folder / previous["files"]["index"]["name"], temps["index"])
        else:
            faiss.write_index(index, str(temps["index"]))
        temps["items"].write_bytes(items.to_bytes())
        for key, name in names.items():
            commit_file(temps[key], folder / name)
    except (OSError, RuntimeError, GceError) as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GceError(f"cannot write the index to {folder}: {detail}; the previous index is kept") from None
    files = {
        key: {"name": name, "sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for key, name in names.items()
    }
    counts = {"size": int(index.ntotal), "deleted": len(items.deleted)}
    manifest = write_index_manifest(folder, {**body, "generation": gen, "files": files, **counts})
    _remove_superseded(folder, previous, gen)
    return manifest


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: the same file (generation files are never rewritten, so
    sharing one is safe), or a copy where the file system has no hard links."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _remove_superseded(folder: Path, previous: dict[str, Any] | None, gen: int) -> None:
    """The previous generation's files, a killed writer's unpublished generations and temporaries."""
    stale = {previous["files"][key]["name"] for key in ("index", "items")} if previous else set()
    for name in os.listdir(folder):
        g = _generation_of(name)
        if previous is not None and g is not None and g > int(previous["generation"]) and g != gen:
            stale.add(name)
        temporary = _TEMPORARY.match(name)
        if temporary and int(temporary.group(1)) != os.getpid() and not pid_alive(int(temporary.group(1))):
            stale.add(name)
    for name in stale - {file_name("index", gen), file_name("items", gen)}:
        with suppress(OSError):  # a leftover is harmless; the new index is already published
            (folder / name).unlink()


def load_generation(folder: Path, *, verify: bool) -> tuple[dict[str, Any], Any, ItemTable]:
    """The manifest, faiss index and item table of the current generation (see the module doc)."""
    last: DatasetError | None = None
    for _ in range(LOAD_TRIES):
        manifest = read_index_manifest(folder)
        try:
            return manifest, *_read_files(folder, manifest, verify)
        except DatasetError as exc:
            try:
                now = read_index_manifest(folder)
            except DatasetError:
                raise exc from None
            if (
                now[MANIFEST_CHECKSUM] == manifest[MANIFEST_CHECKSUM]
            ):  # nothing was published meanwhile: the damage is real
                raise
            last = exc
    raise DatasetError(f"{folder}: {LOAD_TRIES} new versions were published while it was being loaded ({last})")


def _read_files(folder: Path, manifest: dict[str, Any], verify: bool) -> tuple[Any, ItemTable]:
    paths = {key: folder / manifest["files"][key]["name"] for key in ("index", "items")}
    for key, path in paths.items():
        entry = manifest["files"][key]
        try:
            same = sha256_file(path) == entry["sha256"] if verify else path.stat().st_size == entry["bytes"]
        except FileNotFoundError:
            raise DatasetError(f"{path}: missing (listed in the manifest)") from None
        except OSError as exc:
            raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if not same:
            what = "checksum" if verify else "size"
            raise DatasetError(f"{path}: {what} mismatch with the manifest (the file is damaged or was changed)")
    faiss = load_faiss()
    try:
        index = faiss.read_index(str(paths["index"]))
    except RuntimeError as exc:
        raise DatasetError(f"{paths['index']}: cannot be read by faiss ({str(exc).splitlines()[0][:200]})") from None
    items = ItemTable.load(paths["items"])
    size, dim, kind = int(manifest["size"]), int(manifest["model"]["embedding_dim"]), manifest["index_type"]
    if type(index).__name__ != _FAISS_CLASS[kind] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise DatasetError(f"{paths['index']}: a faiss {type(index).__name__}, but the manifest says {kind}")
    if index.ntotal != size or len(items) != size or index.d != dim:
        raise DatasetError(
            f"{folder}: inconsistent index (manifest: {size} x {dim}, faiss: {index.ntotal} x"
            f" {index.d}, item table: {len(items)})"
        )
    if len(items.deleted) != int(manifest.get("deleted", 0)):
        raise DatasetError(
            f"{folder}: inconsistent index (manifest: {manifest.get('deleted', 0)} deleted items, item table:"
            f" {len(items.deleted)})"
        )
    return index, items
