"""Embedding folders and index folders under faults: resume, half-written files, damage, mismatch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gce.data import load_folder
from gce.errors import BadImageError, DatasetError, GceError
from gce.retrieval import (
    Embedder,
    SearchIndex,
    add_store_to_index,
    build_index,
    build_index_from_store,
    embed_to_store,
    read_store,
)
from gce.retrieval.files import commit_file
from helpers.retrieval_fixtures import clustered_embeddings, make_checkpoint, model_meta

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return Embedder.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt"))


@pytest.fixture(scope="module")
def catalogue(shape_folder):
    records = load_folder(shape_folder, test_fraction=0.5).test
    return list(records.paths), [records.class_names[c] for c in records.labels]


class Killed(Exception):
    pass


class DiesAfter:
    """Wraps an embedder; raises after ``batches`` calls, as a killed process would stop."""

    def __init__(self, inner, batches: int) -> None:
        self.inner, self.left = inner, batches

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_tensors(self, batch):
        if self.left == 0:
            raise Killed
        self.left -= 1
        return self.inner.embed_tensors(batch)


def test_store_roundtrip_float16_and_ids(embedder, catalogue, tmp_path):
    paths, labels = catalogue
    info = embed_to_store(embedder, paths, labels, tmp_path / "e", shard_size=5, dtype="float16", progress=False)
    assert (info.total, info.embedded, info.skipped) == (len(paths), len(paths), 0)
    data = read_store(tmp_path / "e")
    assert data.paths == paths and data.labels == labels and list(data.ids) == list(range(len(paths)))
    assert data.model["model_id"] == embedder.model_id
    # float16 storage (<= 2**-11 of a unit vector's entry: 4.9e-4) of embeddings from batches of 5 vs 64
    # (mobilenet_v2 + GCE head, numerics.reordered: 4.9e-4): < 2e-3.
    np.testing.assert_allclose(data.embeddings, embedder.embed_paths(paths), atol=2e-3)
    manifest = json.loads((tmp_path / "e" / "embeddings.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == -(-len(paths) // 5)


def test_killed_embed_resumes_and_never_reads_a_partial_shard(embedder, catalogue, tmp_path, monkeypatch):
    import gce.retrieval.store as store_module

    paths, labels = catalogue
    out = tmp_path / "e"
    with pytest.raises(Killed):  # 2 batches of 3 per shard of 6: dies inside the third shard
        embed_to_store(DiesAfter(embedder, 5), paths, labels, out, shard_size=6, batch_size=3, progress=False)
    commits = []

    def commit_then_die(tmp, final):  # killed between the shard's rename and the manifest listing it
        commit_file(tmp, final)
        commits.append(final)
        raise Killed

    monkeypatch.setattr(store_module, "commit_file", commit_then_die)
    with pytest.raises(Killed):
        embed_to_store(embedder, paths, labels, out, shard_size=6, batch_size=3, progress=False)
    monkeypatch.undo()
    assert [f.name for f in commits] == ["shard-00002.npz"] and commits[0].exists()
    with pytest.raises(DatasetError, match=r"incomplete \(12 of 24"):
        read_store(out)
    with pytest.raises(DatasetError, match="incomplete"):
        build_index_from_store(out, tmp_path / "idx")
    counting = DiesAfter(embedder, 10**6)
    info = embed_to_store(counting, paths, labels, out, shard_size=6, batch_size=3, progress=False)
    assert info.resumed_from == 12 and 10**6 - counting.left == 4  # only the two missing shards ran
    full = embed_to_store(embedder, paths, labels, tmp_path / "fresh", shard_size=6, progress=False)
    assert full.resumed_from == 0
    np.testing.assert_array_equal(read_store(out).embeddings, read_store(tmp_path / "fresh").embeddings)


def test_resume_refuses_another_model_or_input(embedder, catalogue, tmp_path):
    paths, labels = catalogue
    embed_to_store(embedder, paths[:6], labels[:6], tmp_path / "e", shard_size=4, progress=False)
    other = Embedder.from_checkpoint(make_checkpoint(tmp_path / "other.pt", seed=3))
    with pytest.raises(GceError, match="another model"):
        embed_to_store(other, paths[:6], labels[:6], tmp_path / "e", shard_size=4, progress=False)
    with pytest.raises(GceError, match="another list of images"):
        embed_to_store(embedder, paths[:7], labels[:7], tmp_path / "e", shard_size=4, progress=False)
    info = embed_to_store(other, paths[:6], labels[:6], tmp_path / "e", shard_size=4, progress=False, overwrite=True)
    assert info.resumed_from == 0 and read_store(tmp_path / "e").model["model_id"] == other.model_id


def test_bad_images_fail_naming_the_file_or_are_skipped_and_counted(embedder, catalogue, tmp_path):
    paths, _labels = catalogue
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    mixed = [*paths[:4], str(bad), *paths[4:8]]
    with pytest.raises(BadImageError, match=r"not-an-image\.png: not an image file"):
        embed_to_store(embedder, mixed, None, tmp_path / "e1", progress=False)
    info = embed_to_store(embedder, mixed, None, tmp_path / "e2", skip_bad=True, shard_size=3, progress=False)
    assert (info.embedded, info.skipped, info.bad) == (8, 1, [(str(bad), "not an image file")])
    data = read_store(tmp_path / "e2")
    assert len(data.embeddings) == 8 and str(bad) not in data.paths and 4 not in data.ids.tolist()
    assert data.labels == [None] * 8


def test_damaged_shard_is_refused(embedder, catalogue, tmp_path):
    paths, labels = catalogue
    embed_to_store(embedder, paths[:6], labels[:6], tmp_path / "e", shard_size=3, progress=False)
    shard = tmp_path / "e" / "shard-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"shard-00001\.npz: checksum mismatch"):
        read_store(tmp_path / "e")


def test_index_from_store_and_add_check_model_and_dimension(embedder, catalogue, tmp_path):
    paths, labels = catalogue
    embed_to_store(embedder, paths[:10], labels[:10], tmp_path / "a", progress=False)
    embed_to_store(embedder, paths[10:], labels[10:], tmp_path / "b", progress=False)
    index, _ = build_index_from_store(tmp_path / "a", tmp_path / "idx")
    index, ids = add_store_to_index(tmp_path / "idx", tmp_path / "b")
    assert list(ids) == list(range(10, len(paths))) and index.item(12).path == paths[12]
    other = Embedder.from_checkpoint(make_checkpoint(tmp_path / "o.pt", seed=5))
    embed_to_store(other, paths[:3], None, tmp_path / "c", progress=False)
    with pytest.raises(GceError, match="built with model"):
        add_store_to_index(tmp_path / "idx", tmp_path / "c")
    wide = Embedder.from_checkpoint(make_checkpoint(tmp_path / "w.pt", embedding_dim=32))
    embed_to_store(wide, paths[:3], None, tmp_path / "d", progress=False)
    with pytest.raises(GceError, match=r"dimension 32, the index .* holds 16"):
        add_store_to_index(tmp_path / "idx", tmp_path / "d")
    with pytest.raises(GceError, match="already holds an index"):
        build_index_from_store(tmp_path / "a", tmp_path / "idx")


# ------------------------------------------------------------------------------------ damaged indexes
@pytest.fixture
def index_dir(tmp_path):
    x, _ = clustered_embeddings(40)
    build_index(x, [str(i) for i in range(40)], None, tmp_path / "idx", model_meta())
    return tmp_path / "idx"


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_damaged_or_missing_index_files_are_refused_in_one_line(index_dir):
    faiss_file = next(index_dir.glob("index.*.faiss"))
    raw = bytearray(faiss_file.read_bytes())
    raw[-5] ^= 0xFF
    faiss_file.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        SearchIndex.load(index_dir)
    assert faiss_file.name in _one_line(err)
    faiss_file.unlink()
    with pytest.raises(DatasetError, match="missing") as err:
        SearchIndex.load(index_dir)
    _one_line(err)


def test_truncated_faiss_file_without_verification_is_a_clear_error(index_dir):
    faiss_file = next(index_dir.glob("index.*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"cannot be read by faiss|size mismatch with the manifest") as err:
        SearchIndex.load(index_dir, verify=False)
    _one_line(err)


def test_not_an_index_or_garbage_manifest(index_dir, tmp_path):
    with pytest.raises(DatasetError, match="no such index folder"):
        SearchIndex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a gce index"):
        SearchIndex.load(tmp_path / "empty")
    (index_dir / "manifest.json").write_text("{ half")
    with pytest.raises(DatasetError, match="damaged manifest") as err:
        SearchIndex.load(index_dir)
    _one_line(err)
    (index_dir / "manifest.json").write_text(json.dumps({"format": "gce-embeddings-1"}))
    with pytest.raises(DatasetError, match="not a gce index manifest"):
        SearchIndex.load(index_dir)


def test_embeddings_folder_passed_as_index_and_back(index_dir, embedder, catalogue, tmp_path):
    paths, labels = catalogue
    embed_to_store(embedder, paths[:3], labels[:3], tmp_path / "e", progress=False)
    with pytest.raises(DatasetError, match="not a gce index"):
        SearchIndex.load(tmp_path / "e")
    with pytest.raises(DatasetError, match="not a gce embeddings folder"):
        read_store(index_dir)


def test_a_killed_add_leaves_the_previous_index(index_dir, tmp_path, monkeypatch):
    import gce.retrieval.index_manifest as index_module

    before = SearchIndex.load(index_dir)
    backup = tmp_path / "backup"
    shutil.copytree(index_dir, backup)

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(index_module, "write_checked_manifest", die)  # new files written, manifest not swapped
    with pytest.raises(Killed):
        before.add(clustered_embeddings(5, seed=4)[0], list("abcde"), model_id=model_meta()["model_id"])
    monkeypatch.undo()
    after = SearchIndex.load(index_dir)
    assert after.size == 40 and after.manifest["generation"] == 0
    # the next write removes the stray files of the killed one
    after.add(clustered_embeddings(5, seed=4)[0], list("abcde"), model_id=model_meta()["model_id"])
    assert sorted(p.name for p in index_dir.iterdir()) == [
        "build_report.json",
        "index.1.faiss",
        "items.1.npz",
        "manifest.json",
    ]
