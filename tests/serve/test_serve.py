"""``gce serve``: every endpoint, every bad input, concurrency, the page's files, the command itself.

Search results are checked against a brute-force loop over the model's own embeddings of the
indexed images; every refused request must be a 4xx answer of exactly ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from gce.data.images import load_rgb
from gce.errors import GceError
from gce.retrieval import SearchIndex
from gce.serve import SearchService, ServeSettings, create_app, load_service
from gce.serve.batching import MicroBatcher
from helpers.malformed import make_malformed_cases, png_bytes
from helpers.numerics import RESNET18_GCE_DEPTH, RESNET18_LONGEST_SUM, reordered
from helpers.retrieval_fixtures import make_checkpoint
from helpers.serve_fixtures import make_serve_index

MAX_UPLOAD = 2_000_000
MAX_PIXELS = 1_000_000
SETTINGS = ServeSettings(max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_k=20, default_k=5)
# Scores are weighted means of per-learner cosines (8 dims each, resnet18 + GCE head, 4 learners).
# Of the same float32 vectors, faiss' float32 products against float64 loops: <= 32 * 2**-24 per
# product's terms (2e-6), times the weights' sum (<= 3.5): 1e-5.
SCORE_ATOL = 1e-5
# Of an embedding computed in another batch (the service's padded batches, a batch of 1): each entry
# within the chain's reordering bound (numerics.reordered, 1.8e-4), a cosine over 8 dims within sqrt(8)
# of that, and the index's own products on top.
EMBED_ATOL = reordered(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)
UPLOAD_SCORE_ATOL = 8**0.5 * EMBED_ATOL + SCORE_ATOL


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    fixture = make_serve_index(tmp_path_factory.mktemp("serve"))
    service = load_service(fixture.index_dir, fixture.checkpoint, SETTINGS)
    with TestClient(create_app(service)) as client:
        yield fixture, service, client


@pytest.fixture(scope="module")
def reference(served):
    """The model's own learner-normalised embeddings of the indexed images, in id order."""
    fixture, service, _ = served
    return service.embedder.embed_paths(fixture.paths)


def brute_force(query: np.ndarray, gallery: np.ndarray, slices, learners=None, weights=None) -> list[tuple[int, float]]:
    """Every item scored by the (weighted) mean of per-learner cosines, best first, by plain loops."""
    chosen = range(len(slices)) if learners is None else learners
    w = {k: (1.0 if weights is None else weights[k]) for k in chosen}
    total = sum(w.values())
    scored = []
    for item, row in enumerate(gallery):
        score = 0.0
        for k in chosen:
            a, b = query[slices[k]], row[slices[k]]
            score += w[k] * float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        scored.append((item, score / total))
    return sorted(scored, key=lambda pair: -pair[1])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def upload(client: TestClient, data: bytes, content_type: str = "image/png", **fields):
    return client.post(
        "/search",
        files={"image": ("query.png", data, content_type)},
        data={key: str(value) for key, value in fields.items()},
    )


def assert_error(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert "\n" not in body["error"] and body["error"].strip()
    assert re.search(pattern, body["error"]), body["error"]


# -- endpoints -------------------------------------------------------------------------------------


def test_health_and_info(served):
    fixture, service, client = served
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    index = SearchIndex.load(fixture.index_dir)
    assert info["model_id"] == index.model_id == service.embedder.model_id
    assert info["num_learners"] == 4 and info["embedding_dim"] == 32
    assert info["learner_slices"] == [[0, 8], [8, 16], [16, 24], [24, 32]]
    assert info["index_type"] == "flat" and info["index_size"] == len(fixture.paths) == 30
    assert info["image_size"] == 32 and info["uploads"] is True
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "max_k": 20, "default_k": 5}


def test_upload_search_matches_brute_force(served, reference):
    fixture, service, client = served
    slices = service.index.learner_slices
    path = fixture.paths[7]
    response = upload(client, Path(path).read_bytes(), k=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"type": "upload", "id": None, "thumbnail": None}
    assert body["k"] == 10 and body["learners"] == [0, 1, 2, 3] and body["weights"] is None
    query = service.embedder.embed_images([load_rgb(path)])[0]
    expected = brute_force(query, reference, slices)[:10]
    assert [hit["id"] for hit in body["results"]] == [item for item, _ in expected]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([s for _, s in expected], abs=UPLOAD_SCORE_ATOL)
    assert body["results"][0]["id"] == 7 and body["results"][0]["score"] == pytest.approx(1.0, abs=UPLOAD_SCORE_ATOL)
    assert [hit["rank"] for hit in body["results"]] == list(range(1, 11))
    for hit in body["results"]:
        assert hit["label"] == fixture.labels[hit["id"]]
        assert hit["thumbnail"] == f"/items/{hit['id']}/thumbnail"


def test_default_k_and_an_image_that_is_not_indexed(served, reference):
    _fixture, service, client = served
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    body = upload(client, png(image)).json()
    assert len(body["results"]) == 5
    query = service.embedder.embed_images([image])[0]
    expected = brute_force(query, reference, service.index.learner_slices)[:5]
    assert [hit["id"] for hit in body["results"]] == [item for item, _ in expected]


@pytest.mark.parametrize("learners, weights", [("2", None), ("0,3", None), ("3,1", None), (None, "1,0,0.5,2")])
def test_learner_subsets_and_weights_match_brute_force(served, reference, learners, weights):
    fixture, service, client = served
    slices = service.index.learner_slices
    fields = {"k": 8, **({"learners": learners} if learners else {}), **({"weights": weights} if weights else {})}
    body = upload(client, Path(fixture.paths[12]).read_bytes(), **fields).json()
    subset = sorted(int(n) for n in learners.split(",")) if learners else None
    weight_list = [float(w) for w in weights.split(",")] if weights else None
    assert body["learners"] == (subset or [0, 1, 2, 3]) and body["weights"] == weight_list
    query = service.embedder.embed_images([load_rgb(fixture.paths[12])])[0]
    expected = brute_force(query, reference, slices, subset, weight_list)[:8]
    assert [hit["id"] for hit in body["results"]] == [item for item, _ in expected]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([s for _, s in expected], abs=UPLOAD_SCORE_ATOL)


def test_a_learner_subset_changes_the_answer(served):
    fixture, _, client = served
    data = Path(fixture.paths[3]).read_bytes()
    scores = {
        subset: [hit["score"] for hit in upload(client, data, k=10, learners=subset).json()["results"]]
        for subset in ("0", "1", "0,1,2,3")
    }
    assert scores["0"] != scores["1"] != scores["0,1,2,3"]


def test_search_by_item_id_leaves_the_item_out(served, reference):
    _fixture, service, client = served
    response = client.post("/search", data={"id": "4", "k": "6", "learners": "1,2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"type": "item", "id": 4, "thumbnail": "/items/4/thumbnail"}
    expected = [
        (i, s) for i, s in brute_force(reference[4], reference, service.index.learner_slices, [1, 2]) if i != 4
    ][:6]
    assert [hit["id"] for hit in body["results"]] == [item for item, _ in expected]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([s for _, s in expected], abs=SCORE_ATOL)
    # The largest k for an item query is the index size less the item itself.
    assert len(client.post("/search", data={"id": "0", "k": "20"}).json()["results"]) == 20
    # multipart works for id queries too
    assert (
        client.post("/search", files={"id": (None, "4"), "k": (None, "6"), "learners": (None, "1,2")}).json()["results"]
        == body["results"]
    )


def test_thumbnail_is_the_indexed_image(served):
    fixture, _service, client = served
    response = client.get("/items/9/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(load_rgb(fixture.paths[9])))  # 32 px: kept
    assert client.get("/items/9/thumbnail").content == response.content  # from the cache, the same bytes


def test_large_images_get_a_bounded_thumbnail(tmp_path, served):
    _fixture, service, _ = served
    big = tmp_path / "big.png"
    Image.fromarray(np.full((300, 500, 3), 90, dtype=np.uint8)).save(big)

    class OneItem:  # the real index, but item 0 points at a large file
        def __getattr__(self, name):
            return getattr(service.index, name)

        def item(self, id):
            hit = service.index.item(id)
            return type(hit)(hit.id, hit.score, str(big), hit.label) if id == 0 else hit

    small = SearchService(OneItem(), None, ServeSettings(thumbnail_size=64, thumbnail_cache=0))
    image = Image.open(io.BytesIO(TestClient(create_app(small)).get("/items/0/thumbnail").content))
    assert image.size == (64, 38)


@pytest.mark.parametrize(
    "url, status",
    [
        ("/items/30/thumbnail", 404),
        ("/items/-1/thumbnail", 404),
        ("/items/999999999999/thumbnail", 404),
        ("/items/abc/thumbnail", 422),
        ("/items/1.5/thumbnail", 422),
        ("/items/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", 404),
        ("/items/%2Fetc%2Fpasswd/thumbnail", 404),
        ("/items/%2e%2e/thumbnail", 422),
        ("/items/..%5C..%5Cwindows/thumbnail", 422),
        ("/static/..%2F..%2F__init__.py", 404),
        ("/static/%2e%2e/app.py", 404),
        ("/nothing-here", 404),
    ],
)
def test_thumbnails_refuse_unknown_ids_and_paths(served, url, status):
    _, _, client = served
    response = client.get(url)
    assert_error(response, status, r"\S")
    assert b"root:" not in response.content and b"import" not in response.content


def test_thumbnail_of_a_missing_file_is_a_404(tmp_path):
    fixture = make_serve_index(tmp_path, num_classes=2, per_class=2, num_learners=2)
    service = load_service(fixture.index_dir, None)
    os.remove(fixture.paths[1])
    client = TestClient(create_app(service))
    assert_error(client.get("/items/1/thumbnail"), 404, r"item 1: image unavailable \(file not found\)")
    assert client.get("/items/0/thumbnail").status_code == 200
    # Without a checkpoint: searches by id work, uploads are refused.
    assert client.get("/info").json()["uploads"] is False
    assert client.post("/search", data={"id": "0", "k": "2"}).status_code == 200
    assert_error(upload(client, Path(fixture.paths[0]).read_bytes()), 409, "started without a checkpoint")


def test_openapi_docs_and_the_page(served):
    _, _, client = served
    schema = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}/thumbnail", "/health", "/info"} <= set(schema["paths"])
    form = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:href|src)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/app.js", "static/style.css"]  # relative: works under a path prefix
    texts = [page.text]
    for asset in assets:
        response = client.get("/" + asset)
        assert response.status_code == 200 and len(response.content) > 500
        texts.append(response.text)
    for text in texts:  # works offline: nothing is fetched from another host
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), "external resource"
        assert "import(" not in text and "@import" not in text
        assert not re.search(r"fetch\(\s*[\"'`]/", text), "root-absolute URL in the page's requests"


# -- bad input -------------------------------------------------------------------------------------

TRUNCATED_PNG = noise_png(40, 40)[:-300]


@pytest.mark.parametrize(
    "name, data, content_type, fields, status, pattern",
    [
        ("non-image", b"hello, this is text, not pixels" * 20, "image/png", {}, 400, r"^not an image file"),
        ("truncated", TRUNCATED_PNG, "image/png", {}, 400, r"^truncated or corrupt image"),
        ("zero bytes", b"", "image/png", {}, 400, r"empty \(0 bytes\)"),
        (
            "bomb header",
            png_bytes(100_000, 100_000, b"\0" * 100),
            "image/png",
            {},
            413,
            r"image of 10000000000 pixels is over the limit of 1000000 pixels",
        ),
        ("real bomb", png(Image.new("L", (1200, 1000))), "image/png", {}, 413, r"1200x1000 = 1200000 pixels"),
        ("over the upload limit", noise_png(820, 820), "image/png", {}, 413, r"over the limit of 2000000 bytes"),
        ("text part", noise_png(8, 8), "text/plain", {}, 415, r"unsupported content type 'text/plain'"),
        ("html part", noise_png(8, 8), "text/html; charset=utf-8", {}, 415, r"'text/html'"),
        (
            "eps is never decoded",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "application/postscript",
            {},
            415,
            r"'application/postscript'",
        ),
        (
            "eps as octet-stream",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "application/octet-stream",
            {},
            400,
            r"^not an image file",
        ),
        ("k zero", noise_png(8, 8), "image/png", {"k": 0}, 422, r"k must be between 1 and 20, got 0"),
        ("k too large", noise_png(8, 8), "image/png", {"k": 21}, 422, r"k must be between 1 and 20, got 21"),
        ("k negative", noise_png(8, 8), "image/png", {"k": -3}, 422, r"got -3"),
        ("k not a number", noise_png(8, 8), "image/png", {"k": "ten"}, 422, r"^k: .*integer.*'ten'"),
        ("unknown learner", noise_png(8, 8), "image/png", {"learners": "4"}, 422, r"learners: 4 is not a learner"),
        ("learner list", noise_png(8, 8), "image/png", {"learners": "0;1"}, 422, r"comma-separated"),
        ("learner twice", noise_png(8, 8), "image/png", {"learners": "1,1"}, 422, r"twice"),
        ("weights short", noise_png(8, 8), "image/png", {"weights": "1,1"}, 422, r"4 learners, got 2 weights"),
        ("weights zero", noise_png(8, 8), "image/png", {"weights": "0,0,0,0"}, 422, r"not all zero"),
        ("weights nan", noise_png(8, 8), "image/png", {"weights": "1,nan,1,1"}, 422, r"finite"),
        (
            "learners and weights",
            noise_png(8, 8),
            "image/png",
            {"learners": "0", "weights": "1,1,1,1"},
            422,
            r"learners or weights, not both",
        ),
        ("image and id", noise_png(8, 8), "image/png", {"id": 3}, 400, r"exactly one of"),
    ],
)
def test_bad_uploads_are_one_line_4xx(served, name, data, content_type, fields, status, pattern):
    _, _, client = served
    assert_error(upload(client, data, content_type, **fields), status, pattern)


@pytest.mark.parametrize(
    "request_kwargs, status, pattern",
    [
        ({"data": {"id": "30"}}, 404, r"unknown item id 30 \(the index has 30 items\)"),
        ({"data": {"id": "-2"}}, 404, r"unknown item id -2"),
        ({"data": {"id": "../../etc/passwd"}}, 422, r"^id: .*integer"),
        ({"data": {"id": "2", "k": "30"}}, 422, r"k must be between 1 and 20, got 30"),
        ({"data": {"k": "3"}}, 400, r"exactly one of the form fields 'image'"),
        ({"json": {"id": 3}}, 415, r"multipart/form-data.*not application/json"),
        ({"content": b"id=3", "headers": {"content-type": "text/plain"}}, 415, r"not text/plain"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, r"\S"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, r"\S"),
        ({"files": {"image": ("q.png", b"not a file part")}, "data": {}}, 400, r"not an image file"),
    ],
)
def test_bad_requests_are_one_line_4xx(served, request_kwargs, status, pattern):
    _, _, client = served
    assert_error(client.post("/search", **request_kwargs), status, pattern)


def test_bodies_over_the_limit_are_refused_before_parsing(served):
    _, _, client = served
    big = b"\0" * (MAX_UPLOAD + 200_000)
    response = upload(client, big)
    sent = int(response.request.headers["content-length"])  # the size said is the declared one
    assert_error(response, 413, rf"^request body of {sent} bytes is over the limit of {MAX_UPLOAD + 65536} bytes")

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b"\0" * 65536

    response = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(response, 413, rf"^request body is over the limit of {MAX_UPLOAD + 65536} bytes")
    assert client.get("/health").status_code == 200


def test_every_malformed_image_is_refused_or_answered(served, tmp_path):
    """The reliability suite's malformed and odd-but-valid images, uploaded: valid ones are answered."""
    _, _, client = served
    cases = [
        c for c in make_malformed_cases(tmp_path) if c.kind == "image" and c.path.is_file() and not c.path.is_symlink()
    ]
    assert len(cases) > 30
    wrong = []
    for case in cases:
        response = upload(client, case.path.read_bytes(), "application/octet-stream", k=3)
        body = response.json()
        if case.expected is None:
            ok = response.status_code == 200 and len(body["results"]) == 3
        else:
            ok = response.status_code in (400, 413) and list(body) == ["error"] and "\n" not in body["error"]
        if not ok:
            wrong.append((case.name, response.status_code, body))
    assert wrong == []


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_temporary_files_or_descriptors_leak(served, tmp_path, monkeypatch):
    _, _, client = served
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where a spooled upload would go
    large_ok = noise_png(700, 650, seed=3)  # ~1.4 MB: over Starlette's 1 MB in-memory spool
    assert 1_100_000 < len(large_ok) < MAX_UPLOAD
    requests = [
        (large_ok, 200),
        (TRUNCATED_PNG, 400),
        (b"", 400),
        (noise_png(820, 820), 413),
        (png(Image.new("L", (1200, 1000))), 413),
        (b"GIF89a" + b"\0" * 1_200_000, 400),
    ]
    for data, status in requests:  # warm-up: lazily opened libraries, caches
        assert upload(client, data, k=2).status_code == status
    before = _open_files()
    for _ in range(5):
        for data, status in requests:
            assert upload(client, data, k=2).status_code == status
    assert _open_files() <= before
    assert list(spool.iterdir()) == []


def test_concurrent_requests_get_the_sequential_answers(served):
    fixture, _, client = served
    paths = fixture.paths

    def call(n: int):
        kind = n % 4
        if kind == 0:
            response = upload(client, Path(paths[n % len(paths)]).read_bytes(), k=4, learners="0,2")
        elif kind == 1:
            response = client.post("/search", data={"id": str(n % len(paths)), "k": "3"})
        elif kind == 2:
            response = client.get(f"/items/{n % len(paths)}/thumbnail")
            return response.status_code, response.content
        else:
            response = upload(client, TRUNCATED_PNG)
        body = response.json()
        body.pop("took_ms", None)
        return response.status_code, body

    def same(a, b) -> bool:  # batched model calls may differ from single ones in the last float bits
        if a[0] != b[0] or not isinstance(a[1], dict) or "results" not in a[1]:
            return a == b
        ids = lambda body: [hit["id"] for hit in body["results"]]  # noqa: E731
        scores = lambda body: [hit["score"] for hit in body["results"]]  # noqa: E731
        rest = lambda body: {key: value for key, value in body.items() if key != "results"}  # noqa: E731
        close = scores(a[1]) == pytest.approx(scores(b[1]), abs=UPLOAD_SCORE_ATOL)  # uploads in other batches
        return ids(a[1]) == ids(b[1]) and rest(a[1]) == rest(b[1]) and close

    expected = [call(n) for n in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(call, range(48)))
    assert [n for n in range(48) if not same(got[n], expected[n])] == []
    assert {status for status, _ in got} == {200, 400}


def test_queued_queries_share_one_model_call_and_one_scan(served, reference):
    """Requests that arrive while the worker is busy are answered together, each with its own answer."""
    _fixture, service, _ = served
    gate = threading.Event()
    original = service._search._fn
    sizes = []

    def slow_first(jobs):
        sizes.append(len(jobs))
        gate.wait(timeout=30)
        return original(jobs)

    service._search._fn = slow_first
    try:
        settings = [(None, None), ([1], None), ([1], None), (None, [1.0, 0.0, 2.0, 0.5]), (None, None)]
        with ThreadPoolExecutor(max_workers=len(settings) + 1) as pool:
            first = pool.submit(service.search_item, 0, 3, None, None)
            while not sizes:  # the worker is now busy with the first query
                time.sleep(0.01)
            rest = [pool.submit(service.search_item, n + 1, n + 2, *s) for n, s in enumerate(settings)]
            deadline = time.monotonic() + 30
            while service._search.pending < len(settings) and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            answers = [first.result(timeout=30)] + [f.result(timeout=30) for f in rest]
    finally:
        service._search._fn = original
    assert sizes == [1, 5]  # the five queued queries went in one batch (three index scans)
    for n, (learners, weights) in enumerate([(None, None), *settings]):
        item, k = (0, 3) if n == 0 else (n, n + 1)
        truth = [
            i
            for i, _ in brute_force(reference[item], reference, service.index.learner_slices, learners, weights)
            if i != item
        ][:k]
        assert [hit["id"] for hit in answers[n]["results"]] == truth


def test_padded_embedding_batches_give_each_image_its_own_embedding(served, reference):
    fixture, service, _ = served
    tensors = [service.embedder.transform(load_rgb(path)) for path in fixture.paths[:5]]  # padded to 8
    embedded = service._embed_batch(tensors)
    assert len(embedded) == 5
    # A padded batch of 8 against batches of 64: rounding-level differences of unit vectors (resnet18).
    assert np.allclose(np.stack(embedded), reference[:5], atol=EMBED_ATOL)


def test_micro_batcher_hands_errors_to_every_caller_and_keeps_running():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    batcher = MicroBatcher(fn, max_batch=4, name="test")
    assert batcher("a") == "A"
    with pytest.raises(ValueError, match="bad item"):
        batcher("bad")
    assert batcher("b") == "B"
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher("c")
    assert calls == [["a"], ["bad"], ["b"]]


# -- starting it -----------------------------------------------------------------------------------


def test_index_and_checkpoint_of_different_models_are_refused(served, tmp_path):
    fixture, _, _ = served
    other = make_checkpoint(tmp_path / "other.pt", num_learners=4, embedding_dim=32, image_size=32, seed=1)
    with pytest.raises(GceError, match=r"the index was built with model \w+, but the checkpoint is model \w+"):
        load_service(fixture.index_dir, other)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gce_serve_command_binds_to_localhost(served):
    fixture, _, _ = served
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gce",
            "serve",
            "--index",
            str(fixture.index_dir),
            "--checkpoint",
            str(fixture.checkpoint),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"gce serve: http://127.0.0.1:{port}/ (localhost only;"), line
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    assert json.load(answer) == {"status": "ok"}
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/search",
            data=b"id=1&k=2",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert len(json.load(answer)["results"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_internal_error_is_a_one_line_500_and_the_service_goes_on(served, monkeypatch):
    _, service, _ = served

    def broken():
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(service, "info", broken)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    response = client.get("/info")
    assert response.status_code == 500 and response.json() == {"error": "internal error (RuntimeError)"}
    assert client.get("/health").json() == {"status": "ok"}


def test_a_port_in_use_is_a_one_line_error(served, capsys):
    fixture, _, _ = served
    from gce.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--index", str(fixture.index_dir), "--checkpoint", str(fixture.checkpoint), "--port", str(port)]
        )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"gce: error: cannot listen on 127\.0\.0\.1:{port} \(.*in use.*\)", err), err


def test_gce_serve_command_errors_are_one_line(tmp_path, capsys):
    from gce.cli import main

    assert main(["serve", "--index", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "missing" in err and "\n" not in err
    for option, value, message in (("--port", "0", "must be at least 1"), ("--max-k", "0", "must be at least 1")):
        with pytest.raises(SystemExit) as info:  # a usage error, before any work
            main(["serve", "--index", str(tmp_path), "--checkpoint", "m.pt", option, value])
        assert info.value.code == 2
        assert f"gce serve: error: argument {option}: {message}" in capsys.readouterr().err
