"""``gce serve`` with filters and deleted items: the ``filter`` field (form and URL query, repeated:
AND), a bad filter as a one-line 400, deleted items never answered, ``/info``'s live and deleted counts.

Answers are checked against :meth:`SearchIndex.search` on the same index with the same filter (a
flat index: exact search over the passing live items, tests/retrieval/test_delete_filter.py).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from gce.retrieval import SearchIndex, parse_filter
from gce.serve import ServeSettings, create_app, load_service
from helpers.serve_fixtures import make_serve_index

SETTINGS = ServeSettings(max_k=30, default_k=5)
DELETED = [2, 7, 13]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    fixture = make_serve_index(tmp_path_factory.mktemp("serve-filter"))
    assert SearchIndex.load(fixture.index_dir).delete(DELETED) == len(DELETED)
    service = load_service(fixture.index_dir, fixture.checkpoint, SETTINGS)
    with TestClient(create_app(service)) as client:
        yield fixture, service, client


def assert_error(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"]
    assert re.search(pattern, body["error"]), body["error"]


def expected_ids(service, item: int, k: int, texts: list[str], learners=None) -> list[int]:
    """The index's own answer for an item query (the item left out), through the Python API."""
    query = service.index.embedding(item)[None, :]
    (hits,) = service.index.search(query, k + 1, learners=learners, filter=parse_filter(texts))
    return [h.id for h in hits if h.id != item][:k]


def test_info_counts_live_and_deleted_items(served):
    fixture, _, client = served
    info = client.get("/info").json()
    assert (info["index_size"], info["index_deleted"]) == (len(fixture.paths) - len(DELETED), len(DELETED))


def test_filtered_item_search_matches_the_index(served):
    fixture, service, client = served
    texts = ["label in class_01,class_03"]
    body = client.post("/search", data={"id": "0", "k": "8", "filter": texts[0]}).json()
    ids = [hit["id"] for hit in body["results"]]
    assert ids == expected_ids(service, 0, 8, texts) and len(ids) == 8
    assert {hit["label"] for hit in body["results"]} == {"class_01", "class_03"}
    assert body["filter"] == "label in class_01,class_03"
    # fewer pass than k: every passing live item, no more (class_01 has 5 images, 7 is deleted)
    body = client.post("/search", data={"id": "0", "k": "20", "filter": "label=class_01"}).json()
    assert sorted(hit["id"] for hit in body["results"]) == sorted(
        i for i, label in enumerate(fixture.labels) if label == "class_01" and i not in DELETED
    )


def test_repeated_filters_are_anded_in_form_and_query(served):
    fixture, service, client = served
    prefix = f"path startswith {Path(fixture.paths[0]).parent.parent / 'class_04'}"
    texts = ["label in class_02,class_04", prefix]
    form = client.post("/search", data={"id": "1", "k": "6", "filter": texts}).json()  # the field twice
    multipart = client.post(
        "/search", files=[("id", (None, "1")), ("k", (None, "6")), *[("filter", (None, t)) for t in texts]]
    ).json()
    query = client.post("/search", params={"filter": texts[1]}, data={"id": "1", "k": "6", "filter": texts[0]}).json()
    for body in (form, multipart, query):
        assert [hit["id"] for hit in body["results"]] == expected_ids(service, 1, 6, texts)
        assert {hit["label"] for hit in body["results"]} == {"class_04"}


def test_filtered_upload_search(served):
    fixture, _, client = served
    data = Path(fixture.paths[20]).read_bytes()
    body = client.post(
        "/search",
        files={"image": ("q.png", data, "image/png")},
        data={"k": "4", "learners": "0,2", "filter": "label=class_00"},
    ).json()
    assert [hit["label"] for hit in body["results"]] == ["class_00"] * 4
    assert not {hit["id"] for hit in body["results"]} & set(DELETED)
    assert body["learners"] == [0, 2] and body["filter"] == "label=class_00"


@pytest.mark.parametrize(
    "texts, pattern",
    [
        (["colour=red"], r"cannot read filter 'colour=red'; use 'label=NAME'"),
        (["label="], "empty label name"),
        (["label=a", "label=b"], "the label filters exclude every item"),
        (["path startswith /a", "path startswith /b"], "exclude every item"),
    ],
)
def test_a_bad_filter_is_a_one_line_400(served, texts, pattern):
    fixture, _, client = served
    assert_error(client.post("/search", data={"id": "0", "filter": texts}), 400, pattern)
    upload = {"image": ("q.png", Path(fixture.paths[0]).read_bytes(), "image/png")}
    assert_error(client.post("/search", files=upload, data={"filter": texts}), 400, pattern)


def test_deleted_items_are_never_answered(served):
    _, _, client = served
    for item in DELETED:
        said = rf"unknown item id {item} \(the index has 27 items, 3 deleted\)"
        assert_error(client.post("/search", data={"id": str(item)}), 404, said)
        assert_error(client.get(f"/items/{item}/thumbnail"), 404, said)
    body = client.post("/search", data={"id": "3", "k": "26"}).json()  # every other live item
    ids = {hit["id"] for hit in body["results"]}
    assert len(ids) == 30 - len(DELETED) - 1 and not ids & set(DELETED)


def test_a_batch_of_mixed_filters_gets_each_its_own_answer(served):
    _, service, _ = served
    filters = [None, parse_filter("label=class_05"), parse_filter("label in class_00,class_05"), None]
    jobs = [
        replace(service.check_query(service.index.embedding(i), None, None, f), k=4)
        for i, f in zip((0, 4, 9, 11), filters, strict=True)
    ]
    answers = service._search_batch(jobs)  # what the batcher's worker does with queued requests
    for job, answer in zip(jobs, answers, strict=True):
        (alone,) = service.index.search(job.query[None, :], 4, filter=job.filter)
        assert [h.id for h in answer] == [h.id for h in alone]
        np.testing.assert_array_equal([h.score for h in answer], [h.score for h in alone])
