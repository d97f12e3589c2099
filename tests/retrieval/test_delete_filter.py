"""Filtered search and deletes on every faiss index type: flat against numpy's exact answer on the
passing items, the approximate types against their own stored vectors; stable ids, killed deletes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gce.cli import main
from gce.errors import DatasetError, GceError
from gce.retrieval import Embedder, FilterError, ItemFilter, ItemTable, SearchIndex, build_index, parse_filter
from gce.retrieval.index_manifest import read_index_manifest, write_index_manifest
from gce.retrieval.vectors import query_vectors, stored_vectors
from helpers.retrieval_fixtures import clustered_embeddings, make_checkpoint, model_meta

faiss = pytest.importorskip("faiss")

N, NQ, DIM, K, CLUSTERS = 600, 24, 32, 4, 12
# A float32 inner product of D terms is within D * eps32 * |q| * |g| of the float64 one; stored
# vectors are unit, queries at most sqrt(K) long (all weight on one learner): a factor 2 of margin.
SCORE_ATOL = 2 * DIM * float(np.finfo(np.float32).eps) * math.sqrt(K)


def _path(i: int) -> str:
    return f"/cat/{'a' if i % 3 == 0 else 'b'}/{i:04d}.png"


@pytest.fixture(scope="module")
def data():
    x, clusters = clustered_embeddings(N + NQ, dim=DIM, num_learners=K, clusters=CLUSTERS, seed=3)
    paths = [_path(i) for i in range(N)]
    labels = [f"c{c}" for c in clusters[:N]]
    labels[5] = None  # an unlabelled item never passes a label condition
    return x[:N], paths, labels, x[N:]


def _build(folder: Path, data, index_type: str = "flat") -> SearchIndex:
    x, paths, labels, _ = data
    index, _ = build_index(x, paths, labels, folder, model_meta(DIM, K), index_type=index_type, sample=60)
    return index


@pytest.fixture(scope="module")
def approximate(data, tmp_path_factory):
    """One index of each approximate type (built once, only searched)."""
    return {t: _build(tmp_path_factory.mktemp(t) / "idx", data, t) for t in ("ivf", "hnsw", "ivfpq")}


def _truth(queries, stored, keep, learners=None, weights=None) -> np.ndarray:
    """float64 scores of every query against ``stored`` (the index's vectors), -inf where not kept."""
    q = query_vectors(queries, [slice(i * DIM // K, (i + 1) * DIM // K) for i in range(K)], learners, weights)
    scores = q.astype(np.float64) @ stored.astype(np.float64).T
    return np.where(keep[None, :], scores, -np.inf)


def _assert_exact(scores, ids, truth, k):
    """``ids`` is a top-k of ``truth`` (ties within the tolerance in any order), with its scores."""
    expected = min(k, int(np.isfinite(truth[0]).sum()))
    assert ids.shape == scores.shape == (len(truth), expected)
    for row, (s, i, t) in enumerate(zip(scores, ids, truth, strict=True)):
        assert (i >= 0).all() and len(set(i.tolist())) == expected, row
        assert np.isfinite(t[i]).all(), f"row {row}: an item that does not pass came back"
        np.testing.assert_allclose(s, t[i], rtol=0, atol=SCORE_ATOL)
        best = np.sort(t)[::-1][:expected]
        np.testing.assert_allclose(np.sort(t[i])[::-1], best, rtol=0, atol=SCORE_ATOL)


def _keep(data, item_filter: ItemFilter | None, deleted=()) -> np.ndarray:
    _, paths, labels, _ = data
    keep = np.ones(N, dtype=bool) if item_filter is None else item_filter.mask(paths, labels)
    keep[list(deleted)] = False
    return keep


FILTERS = [
    ["label=c3"],
    ["label in c1,c2,c7"],
    ["path startswith /cat/a/"],
    ["label in c1,c2,c7", "path startswith /cat/a/"],
    ["label=c4", "path startswith /cat/a/00"],  # a handful of items: fewer than k
]


@pytest.mark.parametrize("texts", FILTERS, ids=lambda t: " & ".join(t))
@pytest.mark.parametrize("learners, weights", [(None, None), ([1], None), ([0, 2], None), (None, [1.0, 0.0, 0.5, 2.0])])
def test_flat_filtered_search_is_exact_on_the_passing_items(data, tmp_path_factory, texts, learners, weights):
    x, _, _, queries = data
    folder = tmp_path_factory.getbasetemp() / "flat-shared"
    index = SearchIndex.load(folder) if folder.exists() else _build(folder, data)
    item_filter = parse_filter(texts)
    keep = _keep(data, item_filter)
    assert 0 < keep.sum() < N
    truth = _truth(queries, stored_vectors(x, index.learner_slices), keep, learners, weights)
    for k in (1, 10, 1000):  # 1000: more than pass, every passing item in order
        scores, ids = index.search_arrays(queries, k, learners, weights, filter=item_filter)
        _assert_exact(scores, ids, truth, k)
    hits = index.search(queries[:2], 5, learners, weights, filter=item_filter)
    assert all(item_filter.matches(h.path, h.label) for row in hits for h in row)


def test_unlabelled_items_never_pass_a_label_filter(data, tmp_path):
    index = _build(tmp_path / "idx", data)
    x = data[0]
    (hits,) = index.search(x[5:6], N, filter=parse_filter("label in " + ",".join(f"c{c}" for c in range(CLUSTERS))))
    assert 5 not in {h.id for h in hits} and len(hits) == N - 1


@pytest.mark.parametrize("index_type", ["ivf", "hnsw", "ivfpq"])
def test_approximate_types_return_only_passing_items_and_full_k(data, approximate, index_type):
    index = approximate[index_type]
    queries = data[3]
    stored = index.faiss_index.reconstruct_n(0, N, np.empty((N, DIM), dtype=np.float32))  # decoded (ivfpq)
    recalls = []
    for texts in FILTERS:
        item_filter = parse_filter(texts)
        keep = _keep(data, item_filter)
        passing = int(keep.sum())
        scores, ids = index.search_arrays(queries, 10, filter=item_filter)
        assert ids.shape == (len(queries), min(10, passing))
        assert (ids >= 0).all(), f"{texts}: fewer than min(k, passing) hits"
        assert keep[ids].all(), f"{texts}: an item that does not pass came back"
        truth = _truth(queries, stored, keep)
        np.testing.assert_allclose(scores, np.take_along_axis(truth, ids, 1), rtol=0, atol=SCORE_ATOL)
        top = np.argsort(-truth, axis=1, kind="stable")[:, : ids.shape[1]]
        recalls.append(
            np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids.tolist(), top.tolist(), strict=True)])
        )
    # The build chose the setting for recall@10 >= 0.95 unfiltered; a filter widens the budget in
    # proportion, so filtered recall (against exact search on the same stored vectors) stays high.
    assert min(recalls) >= 0.8, recalls


def test_hnsw_scans_its_storage_when_a_walk_would_cost_more(data, approximate, monkeypatch):
    """A filter passing 3 of 600 items: the widened walk (efSearch x 200) would compute more distances
    than there are items, so the flat storage answers, exactly; a broad filter (2 in 3) still walks."""
    from gce.retrieval import index_select

    index, queries = approximate["hnsw"], data[3]
    stored = index.faiss_index.reconstruct_n(0, N, np.empty((N, DIM), dtype=np.float32))
    walked = []
    real = index_select._params
    monkeypatch.setattr(index_select, "_params", lambda *a: walked.append(a[-1]) or real(*a))
    index.set_search_params(ef_search=4)  # 600 items: at the default, every walk costs more than a scan
    try:
        for texts, walks in [(["label=c4", "path startswith /cat/a/00"], False), (["path startswith /cat/b/"], True)]:
            walked.clear()
            item_filter = parse_filter(texts)
            scores, ids = index.search_arrays(queries, 10, filter=item_filter)
            assert bool(walked) == walks, texts
            if not walks:
                _assert_exact(scores, ids, _truth(queries, stored, _keep(data, item_filter)), 10)
    finally:
        index.set_search_params(ef_search=int(index.manifest["search_params"]["ef_search"]))


@pytest.mark.parametrize("index_type", ["ivf", "hnsw", "ivfpq"])
def test_short_answers_are_searched_again_at_full_width(data, approximate, index_type, monkeypatch):
    from gce.retrieval import index_select

    budgets = []

    def starved(value: int, widen: float, most: int) -> int:  # the first pass visits 1 cell / node
        budgets.append(widen)
        return most if math.isinf(widen) else 1

    monkeypatch.setattr(index_select, "_scaled", starved)
    item_filter = parse_filter(["label in c1,c4", "path startswith /cat/a/"])
    keep = _keep(data, item_filter)
    _, ids = approximate[index_type].search_arrays(data[3], 10, filter=item_filter)
    assert ids.shape == (NQ, 10) and (ids >= 0).all() and keep[ids].all()
    assert math.isinf(budgets[-1]), "no query came back short: the retry was not tested"


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_filters_work_after_faiss_torch_utils_is_imported(data, approximate, tmp_path, index_type):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search with a
    wrapper that takes no search parameters (a filtered search once failed with a TypeError)."""
    pytest.importorskip("faiss.contrib.torch_utils")
    index = _build(tmp_path / "idx", data) if index_type == "flat" else approximate[index_type]
    item_filter = parse_filter("label in c1,c2")
    keep = _keep(data, item_filter)
    _, ids = index.search_arrays(data[3], 5, filter=item_filter)
    assert ids.shape == (NQ, 5) and (ids >= 0).all() and keep[ids].all()


def test_a_filter_is_an_item_filter(data, tmp_path):
    index = _build(tmp_path / "idx", data)
    with pytest.raises(GceError, match="filter must be an ItemFilter"):
        index.search_arrays(data[3], 3, filter="label=c1")  # type: ignore[arg-type]
    with pytest.raises(FilterError, match="cannot read filter"):
        parse_filter("colour=red")


# ------------------------------------------------------------------------------------ delete
def _files(folder: Path) -> set[str]:
    return set(os.listdir(folder)) - {"write.lock"}  # (the lock file may stay or go)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_deleted_items_never_come_back(data, tmp_path, index_type):
    x, paths, _, queries = data
    index = _build(tmp_path / "idx", data, index_type)
    before = index.manifest
    # the nearest items of the first queries: what a search would otherwise return first
    gone = sorted({int(i) for i in index.search_arrays(queries[:4], 3)[1].ravel()} | {0, N - 1})
    assert index.delete(gone) == len(gone)
    assert (index.size, index.deleted, len(index.items)) == (N - len(gone), len(gone), N)
    after = read_index_manifest(tmp_path / "idx")
    assert after["deleted"] == len(gone) and after["generation"] == before["generation"] + 1
    # a delete changes the item table only: the index file is the same bytes under the new name
    assert after["files"]["index"]["sha256"] == before["files"]["index"]["sha256"]
    assert _files(tmp_path / "idx") == {
        "manifest.json",
        "build_report.json",
        after["files"]["index"]["name"],
        after["files"]["items"]["name"],
    }
    for loaded in (index, SearchIndex.load(tmp_path / "idx")):
        assert loaded.size == N - len(gone) and loaded.deleted == len(gone)
        for i in gone:
            with pytest.raises(KeyError):
                loaded.item(i)
            with pytest.raises(KeyError):
                loaded.embedding(i)
        assert loaded.item(1).path == paths[1]
        _, ids = loaded.search_arrays(queries, N)
        assert ids.shape == (NQ, N - len(gone)) and not np.isin(ids, gone).any()
        _, ids = loaded.search_arrays(queries, 10, filter=parse_filter("path startswith /cat/"))
        assert ids.shape == (NQ, 10) and not np.isin(ids, gone).any()
    if index_type == "flat":  # still exact: over the live items
        truth = _truth(queries, stored_vectors(x, index.learner_slices), _keep(data, None, gone), [0, 3])
        _assert_exact(*index.search_arrays(queries, 10, [0, 3]), truth, 10)
        item_filter = parse_filter("label in c1,c2,c3")
        truth = _truth(queries, stored_vectors(x, index.learner_slices), _keep(data, item_filter, gone))
        _assert_exact(*index.search_arrays(queries, 10, filter=item_filter), truth, 10)


def test_bad_ids_are_one_line_errors_and_nothing_is_written(data, tmp_path):
    index = _build(tmp_path / "idx", data)
    index.delete([7])
    manifest = read_index_manifest(tmp_path / "idx")
    for ids, pattern in [
        ([N, 3], rf"unknown id\(s\) {N} \(ids are 0..{N - 1}\); nothing was deleted"),
        ([-1], r"unknown id\(s\) -1"),
        ([3, 7], r"already deleted: 7; nothing was deleted"),
        ([], "no ids given"),
        ([True], "ids must be integers"),
        (["3"], "ids must be integers"),
    ]:
        with pytest.raises(GceError, match=pattern) as caught:
            index.delete(ids)
        assert "\n" not in str(caught.value)
    assert read_index_manifest(tmp_path / "idx") == manifest and index.deleted == 1 and index.item(3)
    assert index.delete([3, 3, 4]) == 2  # repeats count once


def test_ids_are_stable_and_never_reused(data, tmp_path):
    _, paths, _, queries = data
    index = _build(tmp_path / "idx", data)
    index.delete([N - 1, N - 2, 10])
    new = index.add(queries[:3], ["/new/0.png", "/new/1.png", "/new/2.png"], ["n", "n", None], model_id="m" * 64)
    assert new == range(N, N + 3)  # after the highest id ever given, not after the live count
    loaded = SearchIndex.load(tmp_path / "idx")
    assert (loaded.size, loaded.deleted) == (N - 3 + 3, 3)
    assert [loaded.item(i).path for i in (9, 11, N, N + 2)] == [paths[9], paths[11], "/new/0.png", "/new/2.png"]
    with pytest.raises(KeyError):
        loaded.item(N - 1)
    (hits,) = loaded.search(queries[1:2], 1)
    assert hits[0].id == N + 1 and hits[0].path == "/new/1.png"
    assert {h.id for h in loaded.search(queries[:3], 5, filter=parse_filter("label=n"))[0]} == {N, N + 1}
    assert loaded.delete([N]) == 1
    assert loaded.add(queries[3:4], ["/new/3.png"], model_id="m" * 64) == range(N + 3, N + 4)


def test_delete_by_path_and_everything(data, tmp_path):
    x, paths, labels, queries = data
    index = _build(tmp_path / "idx", data)
    index.add(x[:1], [paths[0]], [labels[0]], model_id="m" * 64)  # the same path twice: both go
    assert index.ids_of_paths([paths[0], paths[3]]) == [0, 3, N]
    with pytest.raises(GceError, match=r"2 path\(s\) are not live items of .*: '/x', '/y'"):
        index.ids_of_paths([paths[1], "/x", "/y"])
    index.delete(index.ids_of_paths([paths[0]]))
    with pytest.raises(GceError, match="2 path"):
        index.ids_of_paths([paths[0], "/x"])
    assert index.delete([i for i in range(N) if index.items.is_live(i)]) == N - 1
    assert index.size == 0 and SearchIndex.load(tmp_path / "idx").size == 0
    scores, ids = index.search_arrays(queries, 5)
    assert scores.shape == ids.shape == (NQ, 0) and index.search(queries[:1], 5) == [[]]


def test_a_second_writer_deletes_from_what_is_on_disk(data, tmp_path):
    a = _build(tmp_path / "idx", data)
    b = SearchIndex.load(tmp_path / "idx")
    a.delete([1])
    a.add(data[3][:1], ["/new.png"], model_id="m" * 64)
    assert b.delete([2]) == 1  # b adopts a's version first: its delete and its add are kept
    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.items.deleted == {1, 2} and loaded.item(N).path == "/new.png"
    with pytest.raises(GceError, match="already deleted: 1"):
        SearchIndex.load(tmp_path / "idx").delete([1])


def _fail_on_second_commit(monkeypatch):
    from gce.retrieval import index_files

    real, calls = index_files.commit_file, []

    def failing(tmp, final):
        calls.append(final)
        if len(calls) == 2:  # the index file is in place under its new name; the item table is not
            raise OSError(28, "No space left on device")
        real(tmp, final)

    monkeypatch.setattr(index_files, "commit_file", failing)
    return calls


def test_a_failed_delete_leaves_the_old_index(data, tmp_path, monkeypatch):
    queries = data[3]
    index = _build(tmp_path / "idx", data)
    expected = index.search_arrays(queries, 10)
    files = _files(tmp_path / "idx")
    calls = _fail_on_second_commit(monkeypatch)
    with pytest.raises(GceError, match=r"cannot write the index .* the previous index is kept") as caught:
        index.delete([int(expected[1][0, 0]), 4])
    assert len(calls) == 2 and "\n" not in str(caught.value)
    monkeypatch.undo()
    for loaded in (index, SearchIndex.load(tmp_path / "idx")):  # the object and the folder: as before
        assert loaded.deleted == 0 and loaded.size == N and loaded.item(4)
        np.testing.assert_array_equal(loaded.search_arrays(queries, 10)[1], expected[1])
    assert index.delete([4]) == 1  # the next writer removes what the failed one left
    manifest = read_index_manifest(tmp_path / "idx")
    assert _files(tmp_path / "idx") == files - {"index.0.faiss", "items.0.npz"} | {"index.1.faiss", "items.1.npz"}
    assert manifest["generation"] == 1


def test_a_killed_delete_leaves_the_old_index(data, tmp_path):
    """SIGKILL after the new generation's files are written, before the manifest names them."""
    queries = data[3]
    index = _build(tmp_path / "idx", data)
    expected = index.search_arrays(queries, 10)
    script = textwrap.dedent(
        f"""
        import os, signal
        from gce.retrieval import SearchIndex, index_files
        def killed(folder, body):
            os.kill(os.getpid(), signal.SIGKILL)
        index_files.write_index_manifest = killed
        SearchIndex.load({str(tmp_path / "idx")!r}).delete([1, 2, 3])
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), *sys.path])}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert {"index.1.faiss", "items.1.npz"} <= _files(tmp_path / "idx")  # written, never named
    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.deleted == 0 and loaded.item(2) and loaded.manifest["generation"] == 0
    np.testing.assert_array_equal(loaded.search_arrays(queries, 10)[1], expected[1])
    assert loaded.delete([2]) == 1 and SearchIndex.load(tmp_path / "idx").items.deleted == {2}


def test_item_tables_of_older_indexes_load_and_a_wrong_count_is_refused(data, tmp_path):
    table = tmp_path / "old.npz"
    np.savez(
        table,
        path_blob=np.frombuffer(b"ab", dtype=np.uint8),
        path_offsets=np.array([0, 1, 2]),
        name_blob=np.zeros(0, dtype=np.uint8),
        name_offsets=np.array([0]),
        label_codes=np.array([-1, -1]),
    )
    assert ItemTable.load(table) == ItemTable(["a", "b"], [None, None])
    index = _build(tmp_path / "idx", data)
    index.delete([1, 2])
    manifest = read_index_manifest(tmp_path / "idx")
    write_index_manifest(
        tmp_path / "idx", {k: v for k, v in manifest.items() if k != "manifest_sha256"} | {"deleted": 1}
    )
    with pytest.raises(DatasetError, match="manifest: 1 deleted items, item table: 2"):
        SearchIndex.load(tmp_path / "idx")


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def image_index(shape_folder, tmp_path_factory):
    """A flat index of the shape images (8 classes) by a tiny model, and the model."""
    root = tmp_path_factory.mktemp("cli-filter")
    checkpoint = make_checkpoint(root / "model.pt")
    paths = sorted(str(p) for p in Path(shape_folder).glob("*/*.png"))
    labels = [Path(p).parent.name for p in paths]
    embedder = Embedder.from_checkpoint(checkpoint)
    build_index(embedder.embed_paths(paths), paths, labels, root / "idx", embedder.metadata())
    return root / "idx", checkpoint, paths, labels


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "\n" not in err, err
    return err


def test_cli_delete_by_ids_and_paths_and_info(image_index, tmp_path, capsys):
    source, _, paths, _ = image_index
    folder = tmp_path / "idx"
    shutil.copytree(source, folder)
    assert main(["index", "delete", str(folder), "--ids", "3", "5", "9"]) == 0
    assert f"deleted 3 items from {folder}; it now holds {len(paths) - 3} (3 deleted)" in capsys.readouterr().out
    listed = tmp_path / "gone.txt"
    listed.write_text(f"{paths[0]}\n\n{paths[1]}\r\n")
    assert main(["index", "delete", str(folder), "--paths", str(listed)]) == 0
    assert f"holds {len(paths) - 5} (5 deleted)" in capsys.readouterr().out
    assert main(["index", "info", str(folder)]) == 0
    assert f"items: {len(paths) - 5} live, 5 deleted (their space is reclaimed by a rebuild); next id {len(paths)}" in (
        capsys.readouterr().out
    )
    assert SearchIndex.load(folder).items.deleted == {0, 1, 3, 5, 9}
    for argv, pattern in [
        (["--ids", "3"], r"already deleted: 3; nothing was deleted"),
        (["--ids", "2", "999"], r"unknown id\(s\) 999"),
        (["--paths", str(listed)], r"2 path\(s\) are not live items"),
        (["--paths", str(tmp_path / "none.txt")], "cannot be read"),
    ]:
        assert main(["index", "delete", str(folder), *argv]) != 0
        assert re.search(pattern, _error(capsys))
    assert SearchIndex.load(folder).deleted == 5  # nothing of the refused deletes was written
    with pytest.raises(SystemExit):
        main(["index", "delete", str(folder)])  # --ids or --paths is required


def test_cli_search_filter(image_index, capsys):
    folder, checkpoint, paths, labels = image_index
    query = paths[0]
    base = ["search", "--index", str(folder), "--checkpoint", str(checkpoint), query, "--k", "50", "--json"]
    capsys.readouterr()
    assert (
        main(
            [
                *base,
                "--filter",
                "label in class_01,class_02",
                "--filter",
                f"path startswith {Path(paths[0]).parents[1]}",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)["results"]
    assert {r["label"] for r in results} == {"class_01", "class_02"}
    assert len(results) == sum(label in ("class_01", "class_02") for label in labels)
    assert main([*base[:-1], "--filter", "label=class_03"]) == 0
    assert "filter label=class_03" in capsys.readouterr().out
    assert main([*base, "--filter", "colour=red"]) != 0
    assert "cannot read filter 'colour=red'" in _error(capsys)
