"""The Milvus back end on a real Milvus 2.3 server (started by the session fixture on 127.0.0.1):
the same answers as the faiss flat index, recall of HNSW, ids, deletes, filters, refusals."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gce.errors import GceError
from gce.retrieval import build_index, open_index
from gce.retrieval.filters import parse_filter
from gce.retrieval.milvus_build import build_milvus_index
from gce.retrieval.milvus_schema import connect
from gce.retrieval.vectors import query_vectors, stored_vectors
from helpers.milvus_server import milvus_uri  # noqa: F401  (the session fixture)
from helpers.retrieval_fixtures import clustered_embeddings, model_meta

pytest.importorskip("pymilvus")
N, DIM, K = 1500, 32, 4
# Scores are inner products of unit float32 vectors of DIM entries: each side may round differently
# (Milvus' kernels and faiss' sum in other orders), by at most DIM float32 ulps of a value <= 1.
SCORE_ATOL = 4 * DIM * float(np.finfo(np.float32).eps)
# Odd characters in paths: the prefix filter must treat them literally (quotes, backslash, %, _).
_FOLDERS = ["a%b", "a_b", 'q"t', "b\\s", "ünï"]
PATHS = [f"/img/{_FOLDERS[i % 5]}/{i}.png" for i in range(N)]


@pytest.fixture(scope="module")
def data():
    x, clusters = clustered_embeddings(N, DIM, K, seed=3)
    labels = [None if c % 7 == 0 else f"c{c}" for c in clusters]
    return x, labels


@pytest.fixture(scope="module")
def flat(milvus_uri, data, tmp_path_factory):  # noqa: F811
    x, labels = data
    out = tmp_path_factory.mktemp("m") / "flat"
    index, _ = build_milvus_index(x, PATHS, labels, out, model_meta(DIM, K), uri=milvus_uri, index_type="flat")
    return index


@pytest.fixture(scope="module")
def faiss_flat(data, tmp_path_factory):
    x, labels = data
    return build_index(x, PATHS, labels, tmp_path_factory.mktemp("f") / "idx", model_meta(DIM, K))[0]


def _same(m_scores, m_ids, f_scores, f_ids):
    np.testing.assert_allclose(m_scores, f_scores, atol=SCORE_ATOL)
    # Equal ids, except where two scores tie within rounding (then either order is right).
    close = np.isclose(np.sort(m_scores, 1), np.sort(f_scores, 1), atol=SCORE_ATOL)
    assert (np.sort(m_ids, 1) == np.sort(f_ids, 1))[close].mean() > 0.99


def test_flat_equals_faiss_flat(flat, faiss_flat, data):
    x, _ = data
    assert flat.layout == "single"  # Milvus 2.3 refuses several vector fields: the build fell back
    assert flat.size == N and flat.exact
    for kwargs in ({}, {"learners": [1]}, {"weights": [0.5, 0, 2, 1]}):
        m = flat.search_arrays(x[:40], 10, **kwargs)
        f = faiss_flat.search_arrays(x[:40], 10, **kwargs)
        _same(*m, *f)


@pytest.mark.parametrize(
    "texts",
    [
        ["label in c1,c2,c3"],
        ["label=c5"],
        ["path startswith /img/a%"],
        ['path startswith /img/q"t'],
        ["path startswith /img/b\\s", "label in c2,c4,c6,c8"],
        ["path startswith /img/a_"],
    ],
)
def test_filter_equals_masked_exact_search(flat, data, texts):
    x, labels = data
    item_filter = parse_filter(texts)
    keep = item_filter.mask(PATHS, labels)
    q = query_vectors(x[:20], flat.learner_slices)
    scores = q @ stored_vectors(x, flat.learner_slices).T
    scores[:, ~keep] = -np.inf
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    m_scores, m_ids = flat.search_arrays(x[:20], 10, filter=item_filter)
    assert keep[m_ids[m_ids >= 0]].all()
    np.testing.assert_allclose(m_scores, np.take_along_axis(scores, truth, 1), atol=SCORE_ATOL)


def test_hnsw_recall_and_report(milvus_uri, data, tmp_path):  # noqa: F811
    x, labels = data
    index, report = build_milvus_index(
        x, PATHS, labels, tmp_path / "h", model_meta(DIM, K), uri=milvus_uri, index_type="hnsw", sample=200
    )
    chosen = next(r for r in report.rows if r["setting"] == report.chosen["setting"])
    assert chosen["recall"] >= 0.95
    reopened = open_index(tmp_path / "h")
    assert reopened.search_params == index.search_params
    q = query_vectors(x[:100], index.learner_slices)
    truth = np.argsort(-(q @ stored_vectors(x, index.learner_slices).T), axis=1)[:, :10]
    found = reopened.search_arrays(x[:100], 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.95


def test_add_delete_ids_items(milvus_uri, data, tmp_path):  # noqa: F811
    x, labels = data
    index, _ = build_milvus_index(
        x[:100], PATHS[:100], labels[:100], tmp_path / "i", model_meta(DIM, K), uri=milvus_uri, index_type="flat"
    )
    with pytest.raises(GceError, match="model"):
        index.add(x[:5], PATHS[:5], model_id="other")
    assert index.delete([3, 99]) == 2
    with pytest.raises(GceError, match="unknown id 3"):
        index.delete([4, 3])  # 3 is gone: nothing deleted, 4 stays
    assert index.size == 98 and index.item(4).path == PATHS[4]
    with pytest.raises(KeyError):
        index.item(3)
    ids = open_index(tmp_path / "i").add(x[100:110], PATHS[100:110], labels[100:110], model_id="m" * 64)
    assert ids == range(100, 110)  # after the highest id ever given, never a reused one
    again = open_index(tmp_path / "i")
    assert again.size == 108
    np.testing.assert_allclose(again.embedding(105), x[105], atol=SCORE_ATOL)
    found = again.search_arrays(x[[3, 105]], 1)[1]
    assert found[0, 0] != 3 and found[1, 0] == 105


def test_foreign_or_existing_collection_refused(milvus_uri, data, tmp_path):  # noqa: F811
    x, labels = data
    client = connect(milvus_uri)
    client.create_collection("someone_elses", dimension=DIM)
    with pytest.raises(GceError, match="not made by gce"):
        build_milvus_index(
            x[:50],
            PATHS[:50],
            labels[:50],
            tmp_path / "a",
            model_meta(DIM, K),
            uri=milvus_uri,
            collection="someone_elses",
            index_type="flat",
            overwrite=True,
        )
    assert client.has_collection("someone_elses")  # never dropped
    build_milvus_index(
        x[:50],
        PATHS[:50],
        labels[:50],
        tmp_path / "b",
        model_meta(DIM, K),
        uri=milvus_uri,
        collection="ours",
        index_type="flat",
    )
    with pytest.raises(GceError, match="exists"):
        build_milvus_index(
            x[:50],
            PATHS[:50],
            labels[:50],
            tmp_path / "c",
            model_meta(DIM, K),
            uri=milvus_uri,
            collection="ours",
            index_type="flat",
        )


def test_unreachable_server_is_one_line_error_in_bounded_time(data, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, labels = data
    start = time.monotonic()
    with pytest.raises(GceError, match="cannot connect"):
        build_milvus_index(
            x[:10],
            PATHS[:10],
            labels[:10],
            tmp_path / "u",
            model_meta(DIM, K),
            uri=f"http://127.0.0.1:{port}",
            index_type="flat",
        )
    assert time.monotonic() - start < 60
