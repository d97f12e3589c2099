"""The retrieval Python API: embedder, index (exact, approximate, learner subsets), item table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gce.data import load_folder
from gce.data.images import load_rgb
from gce.errors import BadImageError, GceError
from gce.retrieval import (
    Embedder,
    SearchHit,
    SearchIndex,
    build_index,
    build_index_from_images,
)
from helpers.numerics import MOBILENET_V2_GCE_DEPTH, MOBILENET_V2_LONGEST_SUM, reordered
from helpers.retrieval_fixtures import clustered_embeddings, make_checkpoint, model_meta

faiss = pytest.importorskip("faiss")
# Embeddings of mobilenet_v2 + GCE head (K=2): unit vectors per learner, so an entry moves by at most
# the chain's reordering bound (54 layers, sums of <= 5760 terms: 4.9e-4) between two code paths.
EMBED_ATOL = reordered(MOBILENET_V2_LONGEST_SUM, MOBILENET_V2_GCE_DEPTH)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def records(shape_folder):
    return load_folder(shape_folder, test_fraction=0.5).test


def brute_force(queries, gallery, slices, weights, k):
    """Weighted mean of per-learner cosines, ranked by a plain loop."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out = []
    for q in queries:
        scores = []
        for j, g in enumerate(gallery):
            s = 0.0
            for wk, sl in zip(w, slices, strict=False):
                a, b = q[sl], g[sl]
                s += wk * float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            scores.append((s, j))
        scores.sort(key=lambda t: (-t[0], t[1]))
        out.append(scores[:k])
    return out


# ------------------------------------------------------------------------------------ embedder
def test_embedder_normalises_each_learner_and_matches_paths(checkpoint, records):
    emb = Embedder.from_checkpoint(checkpoint)
    assert (emb.num_learners, emb.embedding_dim, emb.image_size) == (2, 16, 32)
    assert emb.learner_slices == [slice(0, 8), slice(8, 16)]
    x = emb.embed_paths(records.paths[:5])
    assert x.dtype == np.float32 and x.shape == (5, 16)
    for s in emb.learner_slices:
        np.testing.assert_allclose(np.linalg.norm(x[:, s], axis=1), 1.0, atol=1e-5)
    images = [load_rgb(p) for p in records.paths[:5]]
    np.testing.assert_array_equal(emb.embed_images(images), x)  # the same batch of 5: the same computation
    # an RGBA image goes through the same white compositing as a file would
    rgba = images[0].convert("RGBA")
    # A batch of 1, not 5: kernels may block the batch otherwise, so rounding may differ (unit vectors).
    np.testing.assert_allclose(emb.embed_images([rgba])[0], x[0], atol=EMBED_ATOL)
    assert not np.allclose(x[0], x[4])  # random weights still tell images apart


def test_model_id_names_the_weights_not_the_file(checkpoint, tmp_path):
    a = Embedder.from_checkpoint(checkpoint)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    # A model file is loaded only with its checksum (docs/reliability.md, "Verified files").
    Path(f"{copy}.sha256").write_bytes(Path(f"{checkpoint}.sha256").read_bytes())
    assert Embedder.from_checkpoint(copy).model_id == a.model_id
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    assert Embedder.from_checkpoint(other).model_id != a.model_id
    assert len(a.model_id) == 64


def test_embed_paths_names_a_bad_file(checkpoint, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        Embedder.from_checkpoint(checkpoint).embed_paths([bad])


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(GceError, match="no checkpoint") as err:
        Embedder.from_checkpoint(tmp_path / "nope.pt")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ exact index
def test_flat_search_equals_brute_force_for_learner_subsets_and_weights(tmp_path):
    meta = model_meta(dim=32, num_learners=4)
    x, _ = clustered_embeddings(300, dim=32, num_learners=4)
    paths = [f"img{i}.png" for i in range(300)]
    index, report = build_index(x, paths, [str(i % 7) for i in range(300)], tmp_path / "idx", meta)
    assert report.rows == [] and index.exact
    slices = index.learner_slices
    q, _ = clustered_embeddings(5, dim=32, num_learners=4, seed=9)
    for learners, weights in ((None, None), ([1], None), ([0, 3], None), (None, [0.5, 0.0, 2.0, 1.0])):
        hits = index.search(q, k=6, learners=learners, weights=weights)
        w = (
            weights
            if weights is not None
            else ([1.0] * 4 if learners is None else [1.0 if k in learners else 0.0 for k in range(4)])
        )
        expected = brute_force(q, x, slices, w, 6)
        for got, want in zip(hits, expected, strict=False):
            # faiss' float32 products of the same vectors against float64 loops: <= 32 * 2**-24 per
            # cosine's terms, times the weights' sum (<= 3.5): < 1e-5.
            np.testing.assert_allclose([h.score for h in got], [s for s, _ in want], atol=1e-5)
            assert [h.id for h in got] == [j for _, j in want]
            assert all(h.path == paths[h.id] for h in got)
    assert isinstance(hits[0][0], SearchHit) and hits[0][0].label == str(hits[0][0].id % 7)


def test_flat_is_a_plain_faiss_inner_product_index(tmp_path):
    meta = model_meta()
    x, _ = clustered_embeddings(200)
    index, _ = build_index(x, [str(i) for i in range(200)], None, tmp_path / "idx", meta)
    plain = faiss.IndexFlatIP(32)
    plain.add(x / 2.0)  # K = 4 unit slices: divided by sqrt(4) the rows are unit vectors
    q = x[:7]
    want_scores, want_ids = plain.search(q / 2.0, 5)
    scores, ids = index.search_arrays(q, 5)
    assert type(index.faiss_index).__name__ == "IndexFlatIP"
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)  # x / 2 is exact; faiss both: sqrt(32) * 2**-24


def test_item_embedding_and_reload(tmp_path):
    meta = model_meta()
    x, _ = clustered_embeddings(50)
    build_index(x, [f"p{i}" for i in range(50)], ["a"] * 25 + [None] * 25, tmp_path / "idx", meta)
    index = SearchIndex.load(tmp_path / "idx")
    assert (index.size, index.dim, index.num_learners, index.index_type) == (50, 32, 4, "flat")
    assert index.model_id == meta["model_id"]
    assert index.item(3) == SearchHit(3, 0.0, "p3", "a")
    assert index.item(30).label is None
    with pytest.raises(KeyError):
        index.item(50)
    with pytest.raises(KeyError):
        index.embedding(-1)
    np.testing.assert_allclose(index.embedding(7), x[7], atol=1e-6)  # stored and read back, scaled by 2: ~exact
    top = index.search(index.embedding(7), k=1)[0][0]  # search from a result finds it first
    assert top.id == 7 and top.score == pytest.approx(1.0, abs=1e-5)  # |x|^2 of a unit vector: <= 32 * 2**-24 off 1
    # k above the size returns what exists
    assert len(index.search(x[:1], k=80)[0]) == 50


@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_item_embedding_is_numpy_after_faiss_torch_utils_is_imported(tmp_path, index_type, recwarn):
    """pytorch-metric-learning's inference utilities import faiss.contrib.torch_utils, which makes
    faiss' reconstruct() return torch tensors by default, for every index of the process."""
    import faiss.contrib.torch_utils  # noqa: F401

    x, _ = clustered_embeddings(300)
    build_index(x, [f"p{i}" for i in range(300)], None, tmp_path / "idx", model_meta(), index_type=index_type)
    vector = SearchIndex.load(tmp_path / "idx").embedding(7)
    assert type(vector) is np.ndarray and vector.dtype == np.float32 and vector.shape == (32,)
    if index_type == "flat":
        np.testing.assert_allclose(vector, x[7], atol=1e-6)
    assert not [w for w in recwarn if "__array__" in str(w.message)]


def test_bad_queries_and_weights_are_one_line_errors(tmp_path):
    index, _ = build_index(
        *clustered_embeddings(20)[:1], [str(i) for i in range(20)], None, tmp_path / "i", model_meta()
    )
    for kwargs, message in (
        ({"learners": [4]}, "not a learner"),
        ({"weights": [1, 2]}, "has 4 learners, got 2 weights"),
        ({"weights": [0, 0, 0, 0]}, "not all zero"),
        ({"learners": [0], "weights": [1] * 4}, "not both"),
    ):
        with pytest.raises(GceError, match=message):
            index.search(np.ones((1, 32), dtype=np.float32), 3, **kwargs)
    with pytest.raises(GceError, match=r"\(N, 32\)"):
        index.search(np.ones((1, 16), dtype=np.float32), 3)
    with pytest.raises(GceError, match="at least 1"):
        index.search(np.ones((1, 32), dtype=np.float32), 0)


# ------------------------------------------------------------------------------------ approximate
@pytest.mark.parametrize("index_type", ["ivf", "hnsw", "ivfpq"])
def test_approximate_build_reports_recall_that_is_true(tmp_path, index_type):
    x, _ = clustered_embeddings(3000, dim=32, num_learners=4, clusters=60, noise=0.5)
    _index, report = build_index(
        x, [str(i) for i in range(3000)], None, tmp_path / "idx", model_meta(), index_type=index_type, sample=200
    )
    assert report.rows and report.sample == 200 and report.index_bytes > 0
    chosen = next(r for r in report.rows if r["setting"] == report.chosen["setting"])
    if index_type != "ivfpq":  # PQ codes lose information; flat vectors reach the target
        assert chosen["recall"] >= 0.95
    # the recall printed for the default setting is the recall the loaded index gives
    loaded = SearchIndex.load(tmp_path / "idx")
    rng = np.random.default_rng(0)
    own = np.sort(rng.choice(3000, size=200, replace=False))
    exact = faiss.IndexFlatIP(32)
    exact.add(x / 2)
    _, truth = exact.search(x[own] / 2, 11)
    _, found = loaded.search_arrays(x[own], 11)
    hits = sum(len(set(t[t != o][:10]) & set(f[f != o][:10])) for t, f, o in zip(truth, found, own, strict=False))
    assert hits / 2000 == pytest.approx(chosen["recall"], abs=0.01)
    assert "recall@10" in report.format_table()


def test_add_appends_and_refuses_another_model(tmp_path):
    meta = model_meta()
    x, _ = clustered_embeddings(100)
    index, _ = build_index(x[:60], [f"a{i}" for i in range(60)], None, tmp_path / "idx", meta)
    ids = index.add(x[60:], [f"b{i}" for i in range(40)], ["new"] * 40, model_id=meta["model_id"])
    assert list(ids) == list(range(60, 100))
    again = SearchIndex.load(tmp_path / "idx")
    assert again.size == 100 and again.item(99) == SearchHit(99, 0.0, "b39", "new")
    assert again.search(x[80:81], k=1)[0][0].id == 80
    with pytest.raises(GceError, match="built with model"):
        again.add(x[:1], ["c"], model_id="x" * 64)
    with pytest.raises(GceError, match="dimension"):
        again.add(np.ones((1, 16), dtype=np.float32), ["c"], model_id=meta["model_id"])
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "build_report.json",
        "index.1.faiss",
        "items.1.npz",
        "manifest.json",
    ]


def test_build_index_from_images_end_to_end(checkpoint, records, tmp_path):
    index, _ = build_index_from_images(checkpoint, records, tmp_path / "idx")
    emb = Embedder.from_checkpoint(checkpoint)
    assert index.model_id == emb.model_id and index.size == len(records)
    hits = index.search(emb.embed_paths(records.paths[:3]), k=2)
    for i, row in enumerate(hits):
        assert row[0].id == i and row[0].score == pytest.approx(1.0, abs=1e-5)  # each image finds itself
        assert row[0].label == records.class_names[records.labels[i]]
    plain, _ = build_index_from_images(emb, records.paths[:4], tmp_path / "p")  # paths alone: no labels
    assert plain.item(0).label is None
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"]["model_id"] == emb.model_id


def test_build_time_exact_truth_is_evaluations_knn_chunk_by_chunk():
    # The ground truth of the build-time recall: evaluation's exact kNN (ties by id, own id left
    # out), merged over gallery chunks; equal to a brute-force sort whatever the chunk size.
    from gce.retrieval.faiss_tuning import exact_topk
    from gce.retrieval.vectors import query_vectors, stored_vectors

    rng = np.random.default_rng(0)
    slices = [slice(0, 4), slice(4, 8)]
    embeddings = rng.normal(size=(37, 8)).astype(np.float32)
    embeddings[5] = embeddings[3]  # an exact tie, split across chunks of 4
    own = np.array([3, 5, 30, 0])
    queries = query_vectors(embeddings[own], slices)
    scores = queries @ stored_vectors(embeddings, slices).T
    scores[np.arange(len(own)), own] = -np.inf
    expected = np.lexsort((np.broadcast_to(np.arange(37), scores.shape), -scores), axis=1)[:, :6]
    for chunk in (4, 7, 100):
        np.testing.assert_array_equal(exact_topk(queries, embeddings, slices, 6, own, chunk=chunk), expected)
