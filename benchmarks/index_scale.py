"""faiss (flat, IVF, HNSW) against a Milvus server (HNSW, IVF) on one synthetic catalogue.

``--n`` x ``--dim`` clustered embeddings (``--clusters`` centres, gaussian noise, ``--learners``
unit learner slices). For each back end and type: build time (faiss: the whole ``build_index``,
with its sweep of search settings; Milvus: index + load, the insert apart as items/s, HNSW with
gce's sweep, IVF re-indexing the same collection), memory (faiss: this process' resident-memory
growth; Milvus: the server process' resident memory after loading), queries/s at batch 1 and
batch 256 and recall@10 of ``--queries`` held-out queries against exact search (the faiss flat
index), at the search setting the build chose (>= 0.95 on its sample, fastest). The Milvus
server is the pip package's (Milvus 2.3.5) on 127.0.0.1, started and stopped here (one vector
field per collection: Milvus 2.3), in a network namespace whose only interface is loopback (the
server binds all interfaces: tests/helpers/milvus_server.py). Each row is printed when it is done.

    nice -n 10 python benchmarks/index_scale.py --n 1000000
    python benchmarks/index_scale.py --n 20000      # a rehearsal
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def catalogue(n: int, dim: int, learners: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    step = dim // learners
    for start in range(0, n, 100_000):
        part = centres[rng.integers(0, clusters, min(100_000, n - start))]
        part += 0.8 * rng.standard_normal(part.shape).astype(np.float32)
        for k in range(learners):
            block = part[:, k * step : (k + 1) * step]
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start : start + len(part)] = part
    return x


def measure(index, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ones = min(len(queries), 200)
    start = time.perf_counter()
    for q in queries[:ones]:
        index.search_arrays(q[None, :], 10)
    qps1 = ones / (time.perf_counter() - start)
    start = time.perf_counter()
    found = np.vstack([index.search_arrays(queries[i : i + 256], 10)[1] for i in range(0, len(queries), 256)])
    qps256 = len(queries) / (time.perf_counter() - start)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist(), strict=True)])
    return {"qps1": qps1, "qps256": qps256, "recall": float(recall)}


def run_milvus(args, x, paths, meta, queries, truth, root: Path) -> list[dict]:
    """One collection: inserted and HNSW-indexed through gce, then re-indexed as IVF_FLAT."""
    from gce.retrieval.faiss_tuning import choose_setting
    from gce.retrieval.milvus_build import _measure, build_milvus_index
    from gce.retrieval.milvus_schema import index_params
    from helpers.milvus_server import start_server

    rows = []
    server = start_server(root / "milvus")
    try:
        uri = f"http://127.0.0.1:{server.listen_port}"
        index, report = build_milvus_index(
            x, paths, None, root / "m", meta, uri=uri, index_type="hnsw", layout="single", sample=args.sample
        )
        insert = report.chosen.get("insert_seconds", float("nan"))
        rows.append(
            {
                "back end": "milvus hnsw",
                "build s": report.build_seconds - insert,
                "insert/s": args.n / insert,
                "memory MiB": rss_bytes(server.server_proc.pid) / 2**20,
                **measure(index, queries, truth),
                **index.search_params,
            }
        )
        print(rows[-1], flush=True)
        client, name = index._client, index.collection
        client.release_collection(name)
        client.drop_index(name, "vector")
        nlist = max(1, min(round(np.sqrt(args.n)), args.n // 39))
        params, _ = index_params(client, "ivf", ["vector"], {"nlist": nlist})
        start = time.perf_counter()
        client.create_index(name, params)
        client.load_collection(name)
        seconds = time.perf_counter() - start
        index.index_type, index.manifest["params"] = "ivf", {"nlist": nlist}
        sweep, _ = _measure(index, x, index.learner_slices, args.sample, 0)
        index.search_params = {"nprobe": choose_setting(sweep, 0.95)["nprobe"]}
        rows.append(
            {
                "back end": "milvus ivf",
                "build s": seconds,
                "insert/s": float("nan"),
                "memory MiB": rss_bytes(server.server_proc.pid) / 2**20,
                **measure(index, queries, truth),
                **index.search_params,
            }
        )
        print(rows[-1], flush=True)
        client.drop_collection(name)
        index.close()
    finally:
        server.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--learners", type=int, default=4)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sample", type=int, default=200, help="build-time recall sample (the default setting)")
    args = p.parse_args()
    from helpers.milvus_server import LOOPBACK_ONLY_ENV, loopback_only_command

    if os.environ.get(LOOPBACK_ONLY_ENV) != "1":  # re-run in a loopback-only namespace
        command, why_not = loopback_only_command([__file__, *sys.argv[1:]])
        if command is None:
            sys.exit(f"cannot start the Milvus server on loopback only: {why_not}")
        os.execve(command[0], command, {**os.environ, LOOPBACK_ONLY_ENV: "1"})
    # A timeout's SIGTERM unwinds (the finally blocks stop the Milvus server and remove its data).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from gce.retrieval import build_index
    from helpers.retrieval_fixtures import model_meta

    data = catalogue(args.n + args.queries, args.dim, args.learners, args.clusters)
    x, queries = data[: args.n], data[args.n :]
    meta = model_meta(args.dim, args.learners)
    paths = [f"/catalogue/{i:09d}.jpg" for i in range(args.n)]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The exact truth first (faiss flat, no build-time sweep), then Milvus, then the faiss types.
        exact, _ = build_index(x, paths, None, root / "truth", meta, index_type="flat", sample=1)
        truth = exact.search_arrays(queries, 10)[1]
        del exact
        rows += run_milvus(args, x, paths, meta, queries, truth, root)
        for kind in ("flat", "ivf", "hnsw"):
            before = rss_bytes()
            start = time.perf_counter()
            index, _ = build_index(x, paths, None, root / kind, meta, index_type=kind, sample=args.sample)
            seconds = time.perf_counter() - start
            row = {
                "back end": f"faiss {kind}",
                "build s": seconds,
                "insert/s": float("nan"),
                "memory MiB": (rss_bytes() - before) / 2**20,
                **measure(index, queries, truth),
                **index.search_params,
            }
            rows.append(row)
            print(row, flush=True)
            del index
    print(f"\n{args.n:,} x {args.dim}, K={args.learners}, {args.clusters} clusters; {args.queries} held-out queries")
    print("| back end | build s | insert items/s | memory MiB | QPS batch 1 | QPS batch 256 | recall@10 | setting |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        setting = ", ".join(f"{k}={r[k]}" for k in ("nprobe", "ef_search") if k in r) or "exact"
        insert = "" if np.isnan(r["insert/s"]) else f"{r['insert/s']:,.0f}"
        print(
            f"| {r['back end']} | {r['build s']:.1f} | {insert} | {r['memory MiB']:,.0f} | {r['qps1']:,.0f} |"
            f" {r['qps256']:,.0f} | {r['recall']:.3f} | {setting} |"
        )


if __name__ == "__main__":
    main()
