"""``gce serve`` under a hostile client: isolation of batched requests, true numbers in errors,
bounded uploads and connections, JSON errors from the server itself, bounded command options.

Servers listen on 127.0.0.1 only, on a port of their own, and are started and stopped here; every
wait is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from test_serve import SCORE_ATOL, UPLOAD_SCORE_ATOL

from gce.retrieval import build_index
from gce.serve import RequestError, SearchService, ServeSettings, create_app, load_service
from gce.serve.batching import MicroBatcher
from gce.serve.uploads import decode_upload
from helpers.malformed import png_bytes
from helpers.serve_fixtures import make_serve_index

WAIT_S = 30.0  # the most any one wait here lasts


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The index and the model, loaded once; each test builds the service (and its threads) it needs."""
    fixture = make_serve_index(tmp_path_factory.mktemp("hardening"))
    service = load_service(fixture.index_dir, fixture.checkpoint, ServeSettings())
    service.close()  # only its index and embedder are used
    return fixture, service.index, service.embedder


def new_service(loaded, **limits) -> SearchService:
    fixture, index, embedder = loaded
    return SearchService(index, embedder, ServeSettings(max_k=20, default_k=5, **limits), index_dir=fixture.index_dir)


def without_time(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "took_ms"}


def same_answer(got: tuple[int, dict], alone: tuple[int, dict], atol: float) -> bool:
    """Same status, ids and fields; scores within ``atol`` (a batched scan may round differently)."""
    if got[0] != alone[0] or "results" not in alone[1] or "results" not in got[1]:
        return without_time(got[1]) == without_time(alone[1]) and got[0] == alone[0]
    a, b = without_time(got[1]), without_time(alone[1])
    ids = [hit["id"] for hit in a["results"]] == [hit["id"] for hit in b["results"]]
    scores = [hit["score"] for hit in a["results"]] == pytest.approx([hit["score"] for hit in b["results"]], abs=atol)
    return ids and scores and {**a, "results": None} == {**b, "results": None}


# -- 1. one request's bad input never reaches another's answer -------------------------------------


def test_micro_batcher_gives_a_failing_item_its_own_error_and_its_batch_mates_their_results():
    gate = threading.Event()
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        gate.wait(timeout=WAIT_S)
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    batcher = MicroBatcher(fn, max_batch=8, name="test")
    try:
        with ThreadPoolExecutor(max_workers=5) as pool:
            first = pool.submit(batcher, "first")
            deadline = time.monotonic() + WAIT_S
            while not sizes and time.monotonic() < deadline:  # the worker holds "first"
                time.sleep(0.01)
            rest = [pool.submit(batcher, item) for item in ("a", "bad", "b", "c")]
            while batcher.pending < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            assert first.result(timeout=WAIT_S) == "FIRST"
            results = [f.exception(timeout=WAIT_S) or f.result() for f in rest]
    finally:
        gate.set()
        batcher.close()
    assert results[0] == "A" and results[2] == "B" and results[3] == "C"
    assert isinstance(results[1], ValueError)
    assert sizes[:2] == [1, 4]  # the four queued items did go in one batch, which failed


BAD_SETTINGS = [
    ([0], [1.0, 1.0, 1.0, 1.0], r"learners or weights, not both"),
    ([7], None, r"7 is not a learner"),
    ([], None, r"at least one learner"),
    ([1, 1], None, r"twice"),
    (None, [float("nan"), 1.0, 1.0, 1.0], r"finite"),
    (None, [0.0, 0.0, 0.0, 0.0], r"not all zero"),
    (None, [1.0, 2.0], r"4 learners, got 2"),
]


def test_bad_query_settings_are_refused_before_the_batch_and_batch_mates_get_their_answers(loaded):
    """Bad learners/weights queued behind a busy worker, with good queries: only the bad ones fail."""
    service = new_service(loaded)
    gate = threading.Event()
    original = service._search._fn
    sizes: list[int] = []

    def held(jobs):
        sizes.append(len(jobs))
        gate.wait(timeout=WAIT_S)
        return original(jobs)

    good = [(None, None), ([1, 3], None), (None, [1.0, 0.0, 2.0, 0.5]), ([0], None)]
    try:
        alone = [service.search_item(n, 3, *s) for n, s in enumerate(good)]
        service._search._fn = held
        with ThreadPoolExecutor(max_workers=len(good) + len(BAD_SETTINGS) + 1) as pool:
            first = pool.submit(service.search_item, 9, 2, None, None)
            deadline = time.monotonic() + WAIT_S
            while not sizes and time.monotonic() < deadline:
                time.sleep(0.01)
            calls = []
            for n in range(max(len(good), len(BAD_SETTINGS))):  # interleaved: good, bad, good, bad...
                if n < len(good):
                    calls.append(pool.submit(service.search_item, n, 3, *good[n]))
                if n < len(BAD_SETTINGS):
                    calls.append(pool.submit(service.search_item, n, 3, *BAD_SETTINGS[n][:2]))
            while service._search.pending < len(good) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # time for a bad query to be queued too, if the service let it through
            gate.set()
            first.result(timeout=WAIT_S)
            outcomes = [f.exception(timeout=WAIT_S) or f.result() for f in calls]
    finally:
        gate.set()
        service._search._fn = original
        service.close()
    got_good = [o for o in outcomes if isinstance(o, dict)]
    got_bad = [o for o in outcomes if not isinstance(o, dict)]
    assert len(got_good) == len(good) and len(got_bad) == len(BAD_SETTINGS), outcomes
    for got, expected in zip(got_good, alone, strict=True):
        assert same_answer((200, got), (200, expected), SCORE_ATOL)
    for error, (_, _, pattern) in zip(got_bad, BAD_SETTINGS, strict=True):
        assert isinstance(error, RequestError) and error.status == 422, error
        assert re.search(pattern, str(error)), str(error)
    assert service._search.fallbacks == 0  # refused before the batch, not sorted out after it


def test_concurrent_bad_and_good_requests_over_http_good_ones_get_their_own_answers(loaded):
    """Threads mixing bad and good requests; the index scan is slowed so that they share batches."""
    fixture, _, _ = loaded
    service = new_service(loaded)
    original = service._search._fn

    def slow(jobs):
        time.sleep(0.05)  # requests pile up behind each scan: batches of several
        return original(jobs)

    image = Path(fixture.paths[4]).read_bytes()

    def request(client: TestClient, n: int) -> tuple[int, dict]:
        kind = n % 6
        if kind == 0:
            response = client.post("/search", data={"id": str(n % 30), "k": "3"})
        elif kind == 1:
            response = client.post("/search", data={"id": str(n % 30), "k": "4", "learners": "0,2"})
        elif kind == 2:
            response = client.post("/search", data={"id": "5", "learners": "1", "weights": "1,1,1,1"})  # bad
        elif kind == 3:
            response = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"k": "3"})
        elif kind == 4:  # bad: both, on an upload
            files = {"image": ("q.png", image, "image/png")}
            response = client.post("/search", files=files, data={"learners": "0", "weights": "1,0,0,0"})
        else:  # bad: a weight that is not a number
            response = client.post("/search", data={"id": "6", "weights": "nan,1,1,1"})
        return response.status_code, response.json()

    with TestClient(create_app(service)) as client:
        alone = [request(client, n) for n in range(36)]
        service._search._fn = slow
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                together = list(pool.map(lambda n: request(client, n), range(36)))
        finally:
            service._search._fn = original
    assert service._search.batches < service._search.items  # some batches did hold several queries
    for n in range(36):
        expected_status = 422 if n % 6 in (2, 4, 5) else 200
        assert alone[n][0] == expected_status, (n, alone[n])
        assert same_answer(together[n], alone[n], UPLOAD_SCORE_ATOL), (n, together[n], alone[n])


def test_a_query_the_scan_would_refuse_is_refused_alone_before_the_batch(loaded):
    """E.g. a non-finite embedding (a stored zero vector, a broken model): the scan would fail the batch."""
    service = new_service(loaded)
    try:
        with pytest.raises(RequestError, match="NaN or infinite") as info:
            service._find(np.full(32, np.nan, dtype=np.float32), 3, None, None)
        assert info.value.status == 422 and service._search.items == 0  # it never reached the scan
    finally:
        service.close()


def test_an_item_query_on_a_one_item_index_says_so(loaded, tmp_path):
    fixture, _, embedder = loaded
    one = tmp_path / "one.index"
    first = fixture.paths[:1]
    build_index(embedder.embed_paths(first), first, fixture.labels[:1], one, embedder.metadata())
    service = load_service(one, None)
    try:
        for k in (None, 1):
            with pytest.raises(RequestError, match=r"^the index has 1 item\(s\): no other item") as info:
                service.search_item(0, k, None, None)
            assert info.value.status == 422 and "between 1 and 0" not in str(info.value)
    finally:
        service.close()


# -- 2. error messages state true numbers -----------------------------------------------------------


def test_an_upload_over_the_limit_states_its_own_size_and_the_limit(loaded):
    service = new_service(loaded, max_upload_bytes=50_000)
    data = np.random.default_rng(0).integers(0, 256, 102_564, dtype=np.uint8).tobytes()
    with TestClient(create_app(service)) as client:
        response = client.post("/search", files={"image": ("big.png", data, "image/png")})
    assert response.status_code == 413
    assert response.json() == {"error": "upload of 102564 bytes is over the limit of 50000 bytes"}


def test_pillows_own_pixel_guard_states_the_limit_that_fired():
    bomb = png_bytes(20_000, 10_000, b"\0" * 100)  # 200 M pixels: over Pillow's 178,956,970
    with pytest.raises(RequestError) as info:
        decode_upload(bomb, max_bytes=10**6, max_pixels=500_000_000)
    assert info.value.status == 413
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert str(info.value) == f"image of 200000000 pixels is over the limit of {limit} pixels"


def test_settings_refuse_a_pixel_limit_pillow_would_never_let_be_reached():
    with pytest.raises(ValueError, match="max_pixels"):
        ServeSettings(max_pixels=2 * Image.MAX_IMAGE_PIXELS + 1)
    assert ServeSettings(max_pixels=2 * Image.MAX_IMAGE_PIXELS).max_pixels == 178_956_970


# -- 3. uploads, connections and time are bounded (a real server) -----------------------------------


@contextmanager
def running(app, settings: ServeSettings) -> Iterator[tuple[int, object]]:
    """``app`` served on 127.0.0.1 (a free port) in a thread, as ``gce serve`` serves it."""
    try:
        from gce.serve.server import make_server

        server = make_server(app, settings, log_level="critical")
    except ImportError:  # the code before the limits: plain uvicorn, so that the tests say what fails
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "the server did not start"
        yield listener.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_S)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=WAIT_S)
        listener.close()


def limited(**limits) -> ServeSettings:
    """Settings with these limits; where the code has no such setting (the code before the limits),
    the defaults, so that the test shows what a client then sees instead of failing on a keyword."""
    try:
        return ServeSettings(**limits)
    except ValueError as exc:
        if "extra_forbidden" not in str(exc):
            raise
        return ServeSettings()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer: status, headers (lower-case names), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    answer = json.loads(body)
    assert list(answer) == ["error"] and answer["error"].strip() and "\n" not in answer["error"], answer
    return answer["error"]


STALLED_UPLOAD = (
    b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    b"Content-Length: 100000\r\n\r\n--x\r\n"
)
SMALL_SEARCH = (
    b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 8\r\nConnection: close\r\n\r\nid=1&k=2"
)


def body_guard(app):
    layer = app.middleware_stack
    for _ in range(20):
        if type(layer).__name__ == "BodyGuard":
            return layer
        layer = getattr(layer, "app", None)
    return None


def wait_for(condition, seconds: float = WAIT_S) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_stalled_upload_is_cut_after_the_timeout_with_a_json_408(loaded):
    settings = limited(upload_timeout_s=1.0)
    service = SearchService(loaded[1], loaded[2], settings)
    with running(create_app(service), settings) as (port, _), connect(port) as sock:
        started = time.monotonic()
        sock.sendall(STALLED_UPLOAD)  # 5 of 100,000 bytes, then nothing
        status, headers, body = read_answer(sock)
        took = time.monotonic() - started
        assert status == 408 and took >= settings.upload_timeout_s
        assert json_error(status, headers, body) == "request body not received in time: 5 of 100000 bytes in 1 s"
        assert closed_by_server(sock)  # the half-sent body is not read as the next request


def test_uploads_over_the_cap_get_a_json_503_at_once_and_slots_come_back(loaded):
    settings = limited(max_uploads=2, upload_timeout_s=20.0)
    service = SearchService(loaded[1], loaded[2], settings)
    app = create_app(service)
    with running(app, settings) as (port, _):
        stalled = [connect(port) for _ in range(2)]
        try:
            for sock in stalled:
                sock.sendall(STALLED_UPLOAD)
            guard = body_guard(app)
            wait_for(lambda: guard is not None and guard.open == 2, 10)
            with connect(port) as sock:
                started = time.monotonic()
                sock.sendall(SMALL_SEARCH)
                status, headers, body = read_answer(sock)
                took = time.monotonic() - started
            assert status == 503 and headers.get("retry-after") == "1", (status, body)
            assert "2 requests with a body are in progress" in json_error(status, headers, body)
            assert took < settings.upload_timeout_s / 2  # it did not wait for a slot to come free
        finally:
            for sock in stalled:
                sock.close()
        assert wait_for(lambda: guard.open == 0, 10)  # a client that left gives its slot back
        with connect(port) as sock:
            sock.sendall(SMALL_SEARCH)
            status, _, body = read_answer(sock)
        assert status == 200 and len(json.loads(body)["results"]) == 2


def test_connections_that_send_no_complete_request_are_closed_after_the_timeout(loaded):
    settings = limited(upload_timeout_s=1.0)
    service = SearchService(loaded[1], loaded[2], settings)
    with running(create_app(service), settings) as (port, _), connect(port) as half, connect(port) as silent:
        half.sendall(b"GET /hea")  # half a request line, then nothing
        status, headers, body = read_answer(half)
        assert status == 408
        assert json_error(status, headers, body) == "request line and headers not received within 1 s"
        assert closed_by_server(half)
        assert closed_by_server(silent)  # one that sends nothing is closed too, without an answer


def test_connections_over_the_cap_get_a_json_503(loaded):
    settings = limited(max_connections=2)
    service = SearchService(loaded[1], loaded[2], settings)
    with running(create_app(service), settings) as (port, server), connect(port) as first, connect(port) as second:
        wait_for(lambda: len(server.server_state.connections) >= 2, 10)
        with connect(port) as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = read_answer(third)
            assert status == 503 and "2 connections are open" in json_error(status, headers, body)
        for sock in (first, second):  # the two within the cap are served
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_answer(sock)[0] == 200


# -- 4. every error is JSON, HEAD works where GET does ----------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
    ids=["not http", "bad length", "two lengths"],
)
def test_malformed_http_gets_a_json_400_from_the_server(loaded, request_bytes):
    settings = ServeSettings()
    service = SearchService(loaded[1], loaded[2], settings)
    with running(create_app(service), settings) as (port, _), connect(port) as sock:
        sock.sendall(request_bytes)
        status, headers, body = read_answer(sock)
    assert status == 400 and json_error(status, headers, body).startswith("malformed HTTP request")


def test_a_websocket_upgrade_is_answered_as_plain_http(loaded):
    settings = ServeSettings()
    service = SearchService(loaded[1], loaded[2], settings)
    upgrade = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with running(create_app(service), settings) as (port, _), connect(port) as sock:
        sock.sendall(upgrade)
        status, _, body = read_answer(sock)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_head_is_answered_wherever_get_is(loaded):
    service = new_service(loaded)
    with TestClient(create_app(service)) as client:
        for path in ("/health", "/info", "/", "/items/3/thumbnail", "/static/app.js", "/openapi.json"):
            got, head = client.get(path), client.head(path)
            assert got.status_code == 200 and head.status_code == 200, (path, head.status_code, head.text)
            assert head.content == b""
            assert head.headers["content-type"] == got.headers["content-type"]
            assert head.headers["content-length"] == str(len(got.content))
        head = client.head("/items/999/thumbnail")
        assert head.status_code == 404 and head.content == b""


def test_a_wrong_method_gets_a_json_405_naming_the_allowed_ones(loaded):
    service = new_service(loaded)
    with TestClient(create_app(service)) as client:
        response = client.delete("/health")
        assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
        assert response.json() == {"error": "method DELETE is not allowed on /health (allowed: GET, HEAD)"}
        response = client.get("/search")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.json() == {"error": "method GET is not allowed on /search (allowed: POST)"}


# -- 5. the command's numeric options are bounded before any work ----------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-upload-mb", "nan", "must be a finite number above 0, got nan"),
        ("--max-upload-mb", "inf", "must be a finite number above 0, got inf"),
        ("--max-upload-mb", "-1", "must be a finite number above 0, got -1"),
        ("--max-upload-mb", "0.0000001", "must be at least 0.001"),
        ("--max-upload-mb", "5000", "must be at most 1024"),
        ("--max-upload-mb", "ten", "must be a number, got 'ten'"),
        ("--threads", "-1", "must be at least 1, got -1"),
        ("--threads", "0", "must be at least 1, got 0"),
        ("--threads", "100000", "must be at most"),
        ("--port", "0", "must be at least 1, got 0"),
        ("--port", "65536", "must be at most 65535, got 65536"),
        ("--max-pixels", "0", "must be at least 1"),
        ("--max-pixels", "500000000", "must be at most 178956970"),
        ("--max-k", "0", "must be at least 1"),
        ("--max-k", "100000000", "must be at most 10000"),
        ("--max-batch", "0", "must be at least 1"),
        ("--max-batch", "1000000", "must be at most 1024"),
        ("--max-uploads", "0", "must be at least 1"),
        ("--upload-timeout", "nan", "must be a finite number above 0, got nan"),
        ("--upload-timeout", "0", "must be a finite number above 0, got 0"),
        ("--upload-timeout", "1e9", "must be at most 3600"),
        ("--max-connections", "0", "must be at least 1"),
    ],
)
def test_every_numeric_option_of_gce_serve_is_range_checked(option, value, message, capsys):
    from gce.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--index", "i", "--checkpoint", "m.pt", option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"gce serve: error: argument {option}: {message}"), err


def test_the_commands_ceilings_are_the_settings_ones():
    from gce.commands import serve as command
    from gce.serve import settings

    assert command.MAX_UPLOAD_CEILING == settings.MAX_UPLOAD_CEILING
    assert command.PILLOW_PIXEL_CEILING == settings.PILLOW_PIXEL_CEILING == 2 * Image.MAX_IMAGE_PIXELS
    assert command.MAX_TIMEOUT_S == settings.MAX_TIMEOUT_S
    from gce.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "i", "--checkpoint", "m.pt", "--max-upload-mb", "1024"])
    assert isinstance(args, argparse.Namespace) and int(args.max_upload_mb * command.MIB) == settings.MAX_UPLOAD_CEILING


def test_settings_refuse_non_finite_timeouts():
    assert ServeSettings(upload_timeout_s=0.5).upload_timeout_s == 0.5
    for value in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="upload_timeout_s"):
            ServeSettings(upload_timeout_s=value)
