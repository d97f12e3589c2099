"""The per-learner vector layout on milvus-lite (several vector fields per collection): learner
subsets searched on their own fields and merged by weight, the CLI over a milvus-lite file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gce.cli import main
from gce.errors import GceError
from gce.retrieval import open_index
from gce.retrieval.filters import parse_filter
from gce.retrieval.milvus_build import build_milvus_index
from gce.retrieval.vectors import query_vectors, stored_vectors
from helpers.faiss_state import faiss_without_torch_utils
from helpers.retrieval_fixtures import clustered_embeddings, model_meta

pytest.importorskip("milvus_lite")


@pytest.fixture(autouse=True, scope="module")
def _faiss_as_milvus_lite_expects():
    """milvus-lite runs faiss in this process: undo faiss.contrib.torch_utils if an earlier test imported it."""
    with faiss_without_torch_utils():
        yield


N, DIM, K = 1200, 32, 4
SCORE_ATOL = 4 * DIM * float(np.finfo(np.float32).eps)  # as in test_milvus_index


@pytest.fixture(scope="module")
def data():
    x, clusters = clustered_embeddings(N, DIM, K, seed=5)
    return x, [f"c{c}" for c in clusters], [f"/img/{c % 3}/{i}.png" for i, c in enumerate(clusters)]


def _exact(x, queries, slices, k, **kwargs):
    scores = query_vectors(queries, slices, **kwargs) @ stored_vectors(x, slices).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def _recall(found, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist(), strict=True)])


@pytest.fixture(scope="module")
def hnsw(data, tmp_path_factory):
    x, labels, paths = data
    folder = tmp_path_factory.mktemp("lite")
    index, report = build_milvus_index(
        x, paths, labels, folder / "idx", model_meta(DIM, K), uri=str(folder / "lite.db"), index_type="hnsw", sample=200
    )
    return index, report


def test_learner_fields_and_merge_by_weight(hnsw, data):
    index, report = hnsw
    x, _, _ = data
    assert index.layout == "learners"  # milvus-lite accepts a vector field per learner
    assert all(r["recall_learner0"] >= 0.95 for r in report.rows if r["ef_search"] >= 64)
    for kwargs in ({"learners": [0]}, {"learners": [1, 3]}, {"weights": [2, 0, 1, 0]}):
        scores, ids = index.search_arrays(x[:60], 10, **kwargs)
        _, t_ids = _exact(x, x[:60], index.learner_slices, 10, **kwargs)
        assert _recall(ids, t_ids) >= 0.95
        # every score is the exact weighted mean of the learners' cosines of the item it names
        exact = np.take_along_axis(
            query_vectors(x[:60], index.learner_slices, **kwargs) @ stored_vectors(x, index.learner_slices).T, ids, 1
        )
        np.testing.assert_allclose(scores, exact, atol=SCORE_ATOL)


def test_filter_on_learner_fields(hnsw, data):
    index, _ = hnsw
    x, labels, paths = data
    item_filter = parse_filter(["label in c1,c2,c3,c4,c5,c6,c7,c8", "path startswith /img/1/"])
    ids = index.search_arrays(x[:30], 10, learners=[2], filter=item_filter)[1]
    keep = item_filter.mask(paths, labels)
    assert (ids >= 0).any() and keep[ids[ids >= 0]].all()


def _embed(checkpoint, root, out, split):
    args = ["embed", "--checkpoint", str(checkpoint), "--dataset", "folder", "--root", str(root), "--split", split]
    assert main([*args, "--out", str(out), "--workers", "0", "--quiet"]) == 0


def test_cli_build_add_info_search_on_a_lite_file(shape_folder, tmp_path, capsys):
    """The commands take the index folder whatever the back end; search answers like the faiss flat index."""
    from helpers.retrieval_fixtures import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "model.pt")
    _embed(checkpoint, shape_folder, tmp_path / "train", "train")
    _embed(checkpoint, shape_folder, tmp_path / "test", "test")
    common = ["--type", "flat", "--quiet"]
    assert (
        main(
            [
                "index",
                "build",
                str(tmp_path / "train"),
                "--out",
                str(tmp_path / "m"),
                "--backend",
                "milvus",
                "--uri",
                str(tmp_path / "c.db"),
                *common,
            ]
        )
        == 0
    )
    assert "learners layout" in capsys.readouterr().out
    assert main(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "f"), *common]) == 0
    for index in ("m", "f"):
        assert main(["index", "add", str(tmp_path / index), str(tmp_path / "test")]) == 0
    assert main(["index", "info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "collection 'm'" in out and "48 items" in out
    query = sorted(str(p) for p in shape_folder.glob("class_00/img_1.png"))
    answers = []
    for index in ("m", "f"):
        args = ["search", "--index", str(tmp_path / index), "--checkpoint", str(checkpoint), *query, "--json"]
        assert main([*args, "--learners", "1", "--k", "5"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    milvus, faiss = (a["results"] for a in answers)
    assert [r["path"] for r in milvus] == [r["path"] for r in faiss]
    np.testing.assert_allclose([r["score"] for r in milvus], [r["score"] for r in faiss], atol=1e-5)


def test_service_searches_a_milvus_index_by_item(hnsw, data):
    """gce serve opens the folder through open_index: search by item id, unknown ids are a 404."""
    pytest.importorskip("fastapi")
    from gce.serve import RequestError, load_service

    index, _ = hnsw
    x, _, _ = data
    service = load_service(index.path, None)
    try:
        answer = service.search_item(7, 5, [2], None)
        ids = [hit["id"] for hit in answer["results"]]
        assert 7 not in ids and len(ids) == 5
        truth = np.argsort(
            -(query_vectors(x[7], index.learner_slices, [2]) @ stored_vectors(x, index.learner_slices).T)[0]
        )
        assert len(set(ids) & set(truth[1:6].tolist())) >= 4  # approximate (hnsw): at most one miss
        with pytest.raises(RequestError):
            service.search_item(N + 5, 5, None, None)
    finally:
        service.close()


def test_delete_by_paths_counts_and_refuses_unknown_paths(data, tmp_path):
    x, labels, paths = data
    index, _ = build_milvus_index(
        x[:40],
        paths[:40],
        labels[:40],
        tmp_path / "idx",
        model_meta(DIM, K),
        uri=str(tmp_path / "d.db"),
        index_type="flat",
    )
    with pytest.raises(GceError, match="1 path\\(s\\) are not live items"):
        index.ids_of_paths([paths[3], "/img/nowhere.png"])
    ids = index.ids_of_paths([paths[3], paths[7], paths[3]])
    assert ids == [3, 7]
    assert index.delete(ids) == 2
    assert (index.size, index.deleted) == (38, 2)
    reopened = open_index(tmp_path / "idx")
    assert (reopened.size, reopened.deleted) == (38, 2)
    with pytest.raises(GceError, match="not live items"):
        reopened.ids_of_paths([paths[3]])
