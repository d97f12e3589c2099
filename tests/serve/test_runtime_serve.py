"""gce serve with ONNX Runtime: the same answers as with PyTorch, no padding, no thread hand-off alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gce.data.images import load_rgb
from gce.serve import create_app, load_service
from gce.serve.batching import MicroBatcher
from helpers.numerics import RESNET18_GCE_DEPTH, RESNET18_LONGEST_SUM, reordered
from helpers.serve_fixtures import make_serve_index

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")

EMBED_ATOL = reordered(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)  # the export tests' bound (resnet18)
WAIT_S = 30


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_serve_index(tmp_path_factory.mktemp("serve-rt"))


@pytest.fixture(scope="module")
def services(fixture):
    made = {name: load_service(fixture.index_dir, fixture.checkpoint, runtime=name) for name in ("torch", "onnx")}
    yield made
    for service in made.values():
        service.close()


def test_onnx_service_answers_uploads_like_the_torch_service(fixture, services):
    torch_service, onnx_service = services["torch"], services["onnx"]
    assert onnx_service.embedder.runtime.name == "onnx"
    assert onnx_service.embedder.model_id == torch_service.index.model_id  # the index accepted it
    for path in fixture.paths[:4]:
        data = Path(path).read_bytes()
        a = torch_service.search_upload(data, 5, None, None)["results"]
        b = onnx_service.search_upload(data, 5, None, None)["results"]
        # cosines of unit vectors within EMBED_ATOL per entry: within 2 sqrt(D) EMBED_ATOL (D = 32)
        bound = 2 * np.sqrt(32) * EMBED_ATOL
        assert all(abs(x["score"] - y["score"]) <= bound for x, y in zip(a, b, strict=True))
        assert a[0]["id"] == b[0]["id"]  # the image itself is indexed: score 1, far from the rest


def test_onnx_batches_are_not_padded_and_embed_each_image_alone(fixture, services):
    service = services["onnx"]
    runtime = service.embedder.runtime
    recorder = _Recorder(runtime)
    tensors = [service.embedder.transform(load_rgb(p)) for p in fixture.paths[:5]]
    service.embedder.runtime = recorder
    try:
        batch = service._embed_batch(tensors)
    finally:
        service.embedder.runtime = runtime
    assert recorder.seen == [5]  # not padded to 8 as PyTorch's batches are
    alone = [service._embed_batch([t])[0] for t in tensors]
    assert np.abs(np.stack(batch) - np.stack(alone)).max() <= EMBED_ATOL


class _Recorder:
    """The runtime, recording the batch sizes it is given."""

    def __init__(self, runtime) -> None:
        self.runtime, self.seen = runtime, []
        self.name, self.threads, self.pads_batches = runtime.name, runtime.threads, runtime.pads_batches

    def __call__(self, images):
        self.seen.append(len(images))
        return self.runtime(images)


def test_a_lone_call_runs_on_the_callers_thread_and_queued_calls_share_a_batch():
    threads: list[str] = []
    sizes: list[int] = []
    gate = threading.Event()

    def fn(items):
        threads.append(threading.current_thread().name)
        sizes.append(len(items))
        if items[0] == "first":
            gate.wait(timeout=WAIT_S)
        return [item.upper() for item in items]

    batcher = MicroBatcher(fn, max_batch=8, name="test")
    assert batcher("alone") == "ALONE" and threads == [threading.current_thread().name]  # no hand-off
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(batcher, "first")
        deadline = time.monotonic() + WAIT_S
        while len(sizes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        rest = [pool.submit(batcher, item) for item in ("a", "b", "c")]
        while batcher.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        assert first.result(timeout=WAIT_S) == "FIRST"
        assert [f.result(timeout=WAIT_S) for f in rest] == ["A", "B", "C"]
    assert sizes == [1, 1, 3]  # the three queued calls went in one batch, run by one of their callers
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher("late")


def test_search_json_is_the_documented_shape(fixture, services):
    from fastapi.testclient import TestClient

    with TestClient(create_app(services["onnx"])) as client:
        answer = client.post("/search", data={"id": "1", "k": "3"})
        upload = client.post("/search", files={"image": ("q.png", Path(fixture.paths[0]).read_bytes(), "image/png")})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["query"] == {"type": "item", "id": 1, "thumbnail": "/items/1/thumbnail"} and body["k"] == 3
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3] and 1 not in [h["id"] for h in body["results"]]
    assert set(body["results"][0]) == {"rank", "id", "score", "label", "thumbnail"}
    assert upload.status_code == 200 and upload.json()["query"] == {"type": "upload", "id": None, "thumbnail": None}
    assert upload.json()["results"][0]["id"] == 0


def test_gce_serve_says_its_runtime_and_threads_in_its_start_line(fixture, services):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = str(Path(__file__).parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "gce", "serve", "--index", str(fixture.index_dir)]
    command += ["--checkpoint", str(fixture.checkpoint), "--port", str(port), "--log-level", "warning"]
    command += ["--runtime", "onnx", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    try:
        reader.join(timeout=60)  # bounded; the ONNX file is cached by the services fixture: no export
    finally:
        process.terminate()
        process.wait(timeout=WAIT_S)
    line = lines[0] if lines else "(no line within 60 s)"
    assert line.startswith(f"gce serve: http://127.0.0.1:{port}/"), line
    assert "runtime onnx: onnxruntime" in line and "1 thread(s)" in line
