"""Inference throughput against its floors, in one run: gce embed, and gce serve with 1 and 32 clients.

    PYTHONPATH=src .venv/bin/python benchmarks/inference_floor.py --checkpoint runs/base-demo/emoji-gce/model.pt

1. ``embed``: ``embed_to_store`` (decode + resize + model + shard write, ``--workers`` decoding
   processes as ``gce embed`` defaults to) on ``--images`` generated 64 px PNGs, in images/s, against
   the same runtime's images/s on the same images already preprocessed (``Embedder.embed_tensors``,
   same batch size; the faster of one session and gce embed's lanes). Target: >= 0.8 of it.
2. ``serve, 1 client``: p50 latency of search by item id against one bare faiss search of one
   query on the same index (``SearchIndex.search``), and of search by upload against bare decode +
   preprocess + model + search of the same bytes, in this process with the server's thread count.
   Target: within 5 ms of each.
3. ``serve, 32 clients``: requests/s of a mix (upload, upload, item id) against the floor computed
   here: the same requests' decodes, model calls in batches of ``--max-batch`` and batched faiss
   searches, without HTTP. Target: within 1.5x of it, zero errors, RSS flat (first vs last 10 s).

The index is ``benchmarks/serve_load.py``'s: 100,000 items (50 real embedded images, the rest random
learner-normalised vectors), built once under ``--workdir``. The server is ``gce serve`` on
127.0.0.1 in a subprocess with ``--runtime`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load
from gce.data.synthetic import make_pattern_folder
from gce.retrieval import Embedder, SearchIndex, embed_to_store
from gce.retrieval.batch_lanes import BatchLanes
from gce.retrieval.runtimes import set_threads
from gce.serve.uploads import decode_upload

HOST = serve_load.HOST
KINDS = ("upload", "upload", "item")
LIMIT = 1 << 24  # upload bytes and pixels: the generated images are far below


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--images", type=int, default=8000, help="catalogue size of the embed measurement")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (gce embed's default)")
    p.add_argument("--batch-size", type=int, default=64, help="gce embed's default")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=200, help="requests of each kind with 1 client")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gce-inference-floor")
    p.add_argument("--skip", nargs="*", default=[], choices=["embed", "serve1", "serve32"])
    p.add_argument(
        "--device-table",
        metavar="DEVICE",
        help="only: images/s of each runtime on DEVICE (cuda: torch, ONNX Runtime CUDA and TensorRT), as"
        " tab-separated rows for benchmarks/gpu_check.sh; --checkpoint may then be 'untrained'",
    )
    return p.parse_args()


def device_table(args: argparse.Namespace) -> None:
    """Bare images/s on preprocessed random batches of 64 for each runtime the device has."""
    from gce.retrieval.export import export_model
    from gce.retrieval.runtimes import OnnxRuntime, RuntimeUnavailable

    checkpoint = args.checkpoint
    if str(checkpoint) == "untrained":
        checkpoint = serve_load.untrained_checkpoint(args.workdir / "emoji-arch-untrained.pt")
    device = torch.device(args.device_table)
    from gce.runtime import flush_denormals

    flush_denormals(device)  # untrained weights: subnormal features would slow torch's CPU kernels ~50x
    embedder = Embedder.from_checkpoint(checkpoint, device=str(device), runtime="torch")
    x = torch.randn(64, 3, embedder.image_size, embedder.image_size, generator=torch.Generator().manual_seed(0))
    onnx_file = args.workdir / "device-table.onnx"
    export_model(embedder, onnx_file, "onnx")
    reference = embedder.embed_tensors(x)
    label = f"embedding, {embedder.model_config.get('backbone')} {embedder.image_size} px, batch 64"
    candidates = {"torch": None}
    if device.type == "cuda":
        candidates["onnxruntime CUDA"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        candidates["onnxruntime TensorRT"] = [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
    else:
        candidates["onnxruntime CPU"] = ["CPUExecutionProvider"]
    for name, providers in candidates.items():
        try:
            run = embedder.runtime if providers is None else OnnxRuntime(onnx_file, device, providers)
        except RuntimeUnavailable as exc:
            print(f"{label}, {name}\tskipped ({exc})", flush=True)
            continue

        def embed(run=run) -> np.ndarray:
            out = run(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        seconds = timed(embed, 5)
        difference = float(np.abs(normalized(embed(), embedder) - reference).max())
        print(f"{label}, {name}\t{64 / seconds:,.0f} images/s, max diff from torch {difference:.1e}", flush=True)


def normalized(raw: np.ndarray, embedder: Embedder) -> np.ndarray:
    from gce.retrieval.embedder import normalize_learners

    return normalize_learners(raw, embedder.learner_slices)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best.append(time.perf_counter() - start)
    return float(np.median(best))


# -- 1. gce embed ----------------------------------------------------------------------------------


def measure_embed(args: argparse.Namespace, embedder: Embedder) -> dict:
    folder = args.workdir / "catalogue"
    per_class = max(1, args.images // 20)
    made = make_pattern_folder(folder, num_classes=20, per_class=per_class, size=64)
    paths = sorted(str(p) for p in made.glob("*/*"))
    paths = paths[: args.images]
    tensors = torch.stack([embedder.transform(serve_load_image(p)) for p in paths])
    batches = list(torch.split(tensors, args.batch_size))

    def bare() -> None:
        for batch in batches:
            embedder.embed_tensors(batch)

    def bare_lanes() -> None:  # the batches on gce embed's lanes (batch_lanes.py), no decoding
        with BatchLanes(embedder) as lanes:
            for batch in batches:
                lanes.submit(batch, np.zeros(0), lambda *_: None)
            lanes.drain(lambda *_: None)

    bare_s = min(timed(bare, 3), timed(bare_lanes, 3))  # the faster of the two is the floor
    runs = []
    for attempt in range(3):
        out = args.workdir / f"store-{attempt}"
        start = time.perf_counter()
        embed_to_store(
            embedder, paths, None, out, batch_size=args.batch_size, workers=args.workers, progress=False, overwrite=True
        )
        runs.append(time.perf_counter() - start)
        for file in out.iterdir():
            file.unlink()
        out.rmdir()
    e2e_s = float(np.median(runs))
    return {"images": len(paths), "bare_per_s": len(paths) / bare_s, "e2e_per_s": len(paths) / e2e_s}


def serve_load_image(path: str):
    from gce.data.images import load_rgb

    return load_rgb(path)


# -- 2. and 3. gce serve ---------------------------------------------------------------------------


def request(connection: http.client.HTTPConnection, kind: str, upload: tuple[bytes, str], item: int) -> bool:
    if kind == "upload":
        body, content_type = upload
        connection.request("POST", "/search", body=body, headers={"content-type": content_type})
    else:
        connection.request(
            "POST", "/search", body=f"id={item}&k=10", headers={"content-type": "application/x-www-form-urlencoded"}
        )
    response = connection.getresponse()
    data = response.read()
    return response.status == 200 and len(json.loads(data)["results"]) == 10


def one_client(port: int, uploads: list, items: int, count: int) -> dict[str, list[float]]:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    latencies: dict[str, list[float]] = {"upload": [], "item": []}
    for i in range(count * 2 + 10):  # the first 10 are a warm-up
        kind = "upload" if i % 2 else "item"
        began = time.perf_counter()
        if not request(connection, kind, uploads[i % len(uploads)], (i * 104729) % items):
            raise SystemExit(f"request {i} ({kind}) failed")
        if i >= 10:
            latencies[kind].append((time.perf_counter() - began) * 1000)
    connection.close()
    return latencies


def bare_single(index: SearchIndex, embedder: Embedder, upload_bytes: list[bytes], count: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    item_ms, upload_ms = [], []
    for i in range(count + 5):
        query = index.embedding(int(rng.integers(index.size)))
        began = time.perf_counter()
        index.search(query[None, :], 11)
        item_ms.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        image = decode_upload(upload_bytes[i % len(upload_bytes)], max_bytes=LIMIT, max_pixels=LIMIT)
        vector = embedder.embed_tensors(embedder.transform(image)[None])
        index.search(vector, 10)
        upload_ms.append((time.perf_counter() - began) * 1000)
    return {"item": float(np.median(item_ms[5:])), "upload": float(np.median(upload_ms[5:]))}


def many_clients(args: argparse.Namespace, port: int, uploads: list, pid: int) -> dict:
    records: list = []
    memory: list = []
    lock = threading.Lock()
    start = time.perf_counter() + args.warmup
    stop = start + args.seconds

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        mine, i = [], 0
        while time.perf_counter() < stop and i < 1_000_000:  # bounded by time and count
            kind = KINDS[(number + i) % len(KINDS)]
            began = time.perf_counter()
            try:
                upload = uploads[(number * 7 + i) % len(uploads)]
                ok = request(connection, kind, upload, (number * 7919 + i) % args.items)
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection(HOST, port, timeout=60)
            mine.append((began - start, kind, ok))
            i += 1
        connection.close()
        with lock:
            records.extend(mine)

    done = threading.Event()
    sampler = threading.Thread(target=serve_load.sample_memory, args=(pid, done, start, memory), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.warmup + args.seconds + 120)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join(timeout=5)
    measured = [r for r in records if r[0] >= 0]
    first = [mib for t, mib in memory if 0 <= t <= 10]
    last = [mib for t, mib in memory if t >= args.seconds - 10]
    return {
        "requests": len(measured),
        "per_s": len(measured) / elapsed,
        "uploads": sum(r[1] == "upload" for r in measured),
        "errors": sum(not r[2] for r in records),
        "rss_first": float(np.mean(first)) if first else float("nan"),
        "rss_last": float(np.mean(last)) if last else float("nan"),
    }


def floor_per_s(index: SearchIndex, embedder: Embedder, upload_bytes: list[bytes], requests: int, batch: int) -> float:
    """Requests/s of the same mix without HTTP: decode, batched model calls, batched faiss searches."""
    kinds = [KINDS[i % len(KINDS)] for i in range(requests)]
    rng = np.random.default_rng(1)
    item_queries = np.stack([index.embedding(int(i)) for i in rng.integers(index.size, size=requests)])

    def run() -> None:
        tensors = [
            embedder.transform(decode_upload(upload_bytes[i % len(upload_bytes)], max_bytes=LIMIT, max_pixels=LIMIT))
            for i, kind in enumerate(kinds)
            if kind == "upload"
        ]
        vectors = [embedder.embed_tensors(torch.stack(tensors[s : s + batch])) for s in range(0, len(tensors), batch)]
        queries = np.concatenate([*vectors, item_queries[: requests - len(tensors)]])
        for s in range(0, len(queries), batch):
            index.search(queries[s : s + batch], 11)

    return requests / timed(run, 2)


def measure_serve(args: argparse.Namespace, checkpoint: Path, embedder: Embedder, threads: int) -> dict:
    index_dir, images = serve_load.build_large_index(checkpoint, args.workdir, args.items)
    index = SearchIndex.load(index_dir, verify=False)
    upload_bytes = [p.read_bytes() for p in images]
    uploads = [serve_load.multipart({"k": "10"}, p) for p in images]
    result: dict = {"bare": bare_single(index, embedder, upload_bytes, args.requests)}
    port = serve_load.free_port()
    log = args.workdir / "serve.log"
    server = serve_load.start_server(
        index_dir, checkpoint, port, threads, args.max_batch, log, extra=["--runtime", embedder.runtime.name]
    )
    try:
        if "serve1" not in args.skip:
            result["one"] = one_client(port, uploads, args.items, args.requests)
        if "serve32" not in args.skip:
            result["many"] = many_clients(args, port, uploads, server.pid)
            result["floor_per_s"] = floor_per_s(index, embedder, upload_bytes, 32 * 12, args.max_batch)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result["start_line"] = log.read_text().splitlines()[:1]
    return result


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    threads = set_threads(args.threads)
    if args.device_table:
        device_table(args)
        return
    embedder = Embedder.from_checkpoint(args.checkpoint, runtime=args.runtime)
    print(f"{args.checkpoint}: {embedder!r}; runtime {embedder.runtime.describe()}", flush=True)
    rows = []
    if "embed" not in args.skip:
        e = measure_embed(args, embedder)
        ratio = e["e2e_per_s"] / e["bare_per_s"]
        rows.append(
            (
                f"gce embed, {e['images']} images, {args.workers} workers, batch {args.batch_size} (images/s)",
                f"{e['e2e_per_s']:,.0f}",
                f"{e['bare_per_s']:,.0f} bare",
                f"{ratio:.2f} (>= 0.8: {'yes' if ratio >= 0.8 else 'NO'})",
            )
        )
    if not {"serve1", "serve32"} <= set(args.skip):
        s = measure_serve(args, args.checkpoint, embedder, threads)
        print(f"server: {s['start_line']}", flush=True)
        if "one" in s:
            for kind, what in (("item", "faiss search"), ("upload", "decode + model + search")):
                served = float(np.median(s["one"][kind]))
                gap = served - s["bare"][kind]
                rows.append(
                    (
                        f"serve, 1 client, search by {kind}: p50 ms",
                        f"{served:.1f}",
                        f"{s['bare'][kind]:.1f} bare {what}",
                        f"{gap:+.1f} ms (<= 5: {'yes' if gap <= 5 else 'NO'})",
                    )
                )
        if "many" in s:
            m = s["many"]
            ratio = s["floor_per_s"] / m["per_s"]
            rows.append(
                (
                    f"serve, {args.clients} clients, upload/upload/item: requests/s",
                    f"{m['per_s']:.1f}",
                    f"{s['floor_per_s']:.1f} floor",
                    f"floor / served {ratio:.2f} (<= 1.5: {'yes' if ratio <= 1.5 else 'NO'})",
                )
            )
            growth = m["rss_last"] - m["rss_first"]
            rows.append(
                (
                    f"serve, {args.clients} clients: errors; RSS first/last 10 s",
                    f"{m['errors']} errors",
                    f"{m['rss_first']:.0f} / {m['rss_last']:.0f} MiB",
                    f"{growth:+.0f} MiB",
                )
            )
    print("\n| measurement | measured | floor | against the floor |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
