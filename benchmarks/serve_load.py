"""Load test of ``gce serve``: concurrent clients against a large index, on 127.0.0.1 only.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py            # 32 clients, 30 s, 100,000 items
    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py --max-batch 1 32   # without/with batching

Builds (once, under --workdir) a 100,000-item flat index for the emoji model's architecture
(MobileNetV2, 64 px, K=8, D=512; untrained weights unless --checkpoint names a trained model.pt:
speed does not depend on the weights). The first 50 items are real generated images embedded by the
model; the others are random learner-normalised vectors whose paths cycle over those 50 files, so
searches scan a real 100,000 x 512 index and thumbnails are real files. Then it starts
``gce serve`` on 127.0.0.1 and runs the clients, each on its own keep-alive connection, cycling
through: upload search, upload search, search by item id, thumbnail. It prints requests/s and
p50/p99 latency per kind, the errors (any non-200 answer or failed request), and the server's
resident memory averaged over the first and the last 10 s of the measured time (after a warm-up
under the same load, not counted). ``--max-batch 1 32`` measures the server without and with
micro-batching, one after the other.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from gce.data.synthetic import make_pattern_folder

ROOT = Path(__file__).resolve().parents[1]


HOST = "127.0.0.1"  # never anything else: this sends a flood of requests
KINDS = ("upload", "upload", "item", "thumbnail")
WINDOW_S = 10.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0, help="measured time per server setting")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the measured time (not counted)")
    p.add_argument(
        "--max-batch",
        type=int,
        nargs="+",
        default=[32],
        help="server --max-batch settings to measure one after the other (e.g. 1 32)",
    )
    p.add_argument("--checkpoint", type=Path, help="a trained model.pt (default: untrained emoji architecture)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "serve_load")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args()
    if not (
        1 <= args.clients <= 256
        and 1 <= args.seconds <= 600
        and 0 <= args.warmup <= 120
        and 100 <= args.items <= 10_000_000
        and all(1 <= b <= 1024 for b in args.max_batch)
    ):
        p.error("--clients 1..256, --seconds 1..600, --warmup 0..120, --items 100..10,000,000, --max-batch 1..1024")
    return args


# -- set-up ----------------------------------------------------------------------------------------


def untrained_checkpoint(path: Path) -> Path:
    import torch

    from gce.config import ModelConfig, config_from_dict
    from gce.models import build_model
    from gce.training.checkpoint import save_model_only

    if path.exists():
        return path
    torch.manual_seed(0)
    cfg = config_from_dict(
        {
            "data": {"dataset": "folder", "root": str(path.parent), "image_size": 64, "test_resize": 64},
            "model": {
                "backbone": "mobilenet_v2",
                "head": "gce",
                "num_learners": 8,
                "embedding_dim": 512,
                "pretrained": False,
            },
        }
    )
    m = cfg.model
    model = build_model(
        ModelConfig(
            backbone=m.backbone,
            head=m.head,
            num_learners=m.num_learners,
            embedding_dim=m.embedding_dim,
            pretrained=False,
            freeze_bn=m.freeze_bn,
            pooling=m.pooling,
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_only(model.eval(), cfg, path)
    return path


def build_large_index(checkpoint: Path, workdir: Path, items: int) -> tuple[Path, list[Path]]:
    from gce.retrieval import Embedder, SearchIndex, build_index, normalize_learners

    images = sorted((make_pattern_folder(workdir / "images", num_classes=10, per_class=5, size=64)).glob("*/*.png"))
    out = workdir / f"index-{items}"
    embedder = Embedder.from_checkpoint(checkpoint)
    if (out / "manifest.json").exists():
        index = SearchIndex.load(out, verify=False)
        if index.size == items and index.model_id == embedder.model_id:
            return out, images
    real = embedder.embed_paths(images)
    rng = np.random.default_rng(0)
    fake = normalize_learners(
        rng.standard_normal((items - len(real), embedder.embedding_dim)).astype(np.float32), embedder.learner_slices
    )
    paths = [str(p) for p in images] + [str(images[i % len(images)]) for i in range(items - len(real))]
    labels = [p.parent.name for p in images] + [f"random_{i % 1000}" for i in range(items - len(real))]
    build_index(np.concatenate([real, fake]), paths, labels, out, embedder.metadata(), overwrite=True)
    return out, images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(
    index: Path,
    checkpoint: Path,
    port: int,
    threads: int | None,
    max_batch: int,
    log: Path,
    extra: list[str] | None = None,
) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    command = [
        sys.executable,
        "-m",
        "gce",
        "serve",
        "--index",
        str(index),
        "--checkpoint",
        str(checkpoint),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-batch",
        str(max_batch),
    ]
    if threads:
        command += ["--threads", str(threads)]
    command += extra or []
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # bounded: the server has two minutes to come up
        if process.poll() is not None:
            raise SystemExit(f"gce serve exited: {log.read_text()}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("gce serve did not answer /health within 120 s")


# -- the load --------------------------------------------------------------------------------------


def multipart(fields: dict[str, str], image: Path | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    if image is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + image.read_bytes()
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def client(
    number: int,
    port: int,
    images: list[Path],
    items: int,
    start: float,
    stop: float,
    records: list,
    lock: threading.Lock,
) -> None:
    uploads = [multipart({"k": "10"}, path) for path in images]
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    mine = []
    i = 0
    while time.perf_counter() < stop and i < 1_000_000:  # bounded by time and by count
        kind = KINDS[(number + i) % len(KINDS)]
        began = time.perf_counter()
        try:
            if kind == "upload":
                body, content_type = uploads[(number * 7 + i) % len(uploads)]
                connection.request("POST", "/search", body=body, headers={"content-type": content_type})
            elif kind == "item":
                connection.request(
                    "POST",
                    "/search",
                    body=f"id={(number * 7919 + i * 104729) % items}&k=10",
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
            else:
                connection.request("GET", f"/items/{(number + i) % len(images)}/thumbnail")
            response = connection.getresponse()
            data = response.read()
            ok = response.status == 200 and (kind == "thumbnail" or len(json.loads(data)["results"]) == 10)
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
            connection.close()
            connection = http.client.HTTPConnection(HOST, port, timeout=30)
        mine.append((began - start, kind, time.perf_counter() - began, ok))
        i += 1
    connection.close()
    with lock:
        records.extend(mine)


def sample_memory(pid: int, stop: threading.Event, start: float, samples: list) -> None:
    while not stop.wait(0.25):
        try:
            with open(f"/proc/{pid}/status") as fh:
                rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return
        samples.append((time.perf_counter() - start, rss / 1024.0))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(args: argparse.Namespace, index: Path, checkpoint: Path, images: list[Path], max_batch: int) -> dict:
    """One server, ``args.clients`` clients for ``args.seconds`` (after ``args.warmup`` s not counted)."""
    port = free_port()
    server = start_server(index, checkpoint, port, args.threads, max_batch, args.workdir / f"serve-b{max_batch}.log")
    try:
        records: list = []
        memory: list = []
        lock = threading.Lock()
        begin = time.perf_counter()
        start = begin + args.warmup  # records before this are the warm-up
        stop = start + args.seconds
        done = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(server.pid, done, start, memory), daemon=True)
        sampler.start()
        clients = [
            threading.Thread(target=client, args=(n, port, images, args.items, start, stop, records, lock))
            for n in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=args.warmup + args.seconds + 120)
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join(timeout=5)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    measured = [r for r in records if r[0] >= 0]
    rows = []
    for kind in ("upload", "item", "thumbnail", "all"):
        chosen = [r for r in measured if kind in ("all", r[1])]
        latencies = [r[2] * 1000 for r in chosen]
        rows.append(
            {
                "kind": kind,
                "requests": len(chosen),
                "per_s": len(chosen) / elapsed,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "errors": sum(not r[3] for r in chosen),
            }
        )
    first = [mib for t, mib in memory if 0 <= t <= WINDOW_S]
    last = [mib for t, mib in memory if t >= args.seconds - WINDOW_S]
    return {
        "max_batch": max_batch,
        "seconds": elapsed,
        "rows": rows,
        "warmup_errors": sum(not r[3] for r in records if r[0] < 0),
        "memory_first_mib": float(np.mean(first)) if first else float("nan"),
        "memory_last_mib": float(np.mean(last)) if last else float("nan"),
        "memory_timeline_mib": [(round(t, 1), round(mib, 1)) for t, mib in memory[::20]],
        "server_alive": alive,
    }


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or untrained_checkpoint(args.workdir / "emoji-arch-untrained.pt")
    print(f"building/loading the {args.items:,}-item index under {args.workdir} ...", flush=True)
    index, images = build_large_index(checkpoint, args.workdir, args.items)
    results = []
    for max_batch in args.max_batch:
        print(
            f"serving with --max-batch {max_batch}: {args.warmup:.0f} s warm-up, then {args.clients} clients for "
            f"{args.seconds:.0f} s ...",
            flush=True,
        )
        results.append(run_load(args, index, checkpoint, images, max_batch))

    print(
        f"\ngce serve on {HOST}: {args.clients} clients, {args.seconds:.0f} s measured after {args.warmup:.0f} s "
        f"of warm-up, flat index of {args.items:,} x 512 (K=8), {os.cpu_count()} CPU cores on this machine"
    )
    print(f"{'max-batch':>9} {'kind':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for result in results:
        for row in result["rows"]:
            print(
                f"{result['max_batch']:>9} {row['kind']:<10} {row['requests']:>9} {row['per_s']:>8.1f} "
                f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['errors']:>7}"
            )
    print(f"{'max-batch':>9} {'RSS first 10 s':>15} {'RSS last 10 s':>14} {'growth':>10} {'alive':>6}")
    for result in results:
        first, last = result["memory_first_mib"], result["memory_last_mib"]
        print(
            f"{result['max_batch']:>9} {first:>11.1f} MiB {last:>10.1f} MiB {last - first:>+6.1f} MiB "
            f"{result['server_alive']!s:>6}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"clients": args.clients, "items": args.items, "warmup": args.warmup, "runs": results}, indent=2)
        )
    errors = sum(result["rows"][-1]["errors"] + result["warmup_errors"] for result in results)
    if errors or not all(result["server_alive"] for result in results):
        raise SystemExit(f"FAILED: {errors} errors")


if __name__ == "__main__":
    main()
