"""Index build time, peak memory, query speed and recall@10 of gce's index types at a million images.

The gallery is synthetic: ``--n`` x ``--dim`` embeddings of ``--learners`` unit learner slices, with
the eval benchmark's class structure (benchmarks/eval_speed.py: classes of 2..12 images,
``centre + noise * gaussian / sqrt(dim)``). With ``--superclasses S`` the class centres are
themselves drawn around S super-class centres (``--spread``), as real catalogues group classes
(shoes, chairs, ...). Queries are ``--queries`` new draws around existing class centres.

Every index type runs in its own subprocess (peak resident memory is its own; the gallery is read
from one ``.npy`` file) with ``--threads`` faiss/torch threads. ``flat`` is timed through
``SearchIndex`` and, for comparison, as a plain ``faiss.IndexFlatIP``; its results are the exact
ground truth for the recall of the others (the full embedding, and learner 0 alone through
learner weights). Each approximate type is measured at several search settings; the one marked
``*`` is what ``gce index build`` picked as default on its own sample (>= 0.95 recall@10 on gallery
items, fastest).

End to end (``--e2e``): the latency of one query image, from the file on disk to the top-10 list,
with model and index loaded (MobileNetV2 + GCE head, K learners, D dims: random weights, since
weights do not change the time), at 64 and 224 px, against the flat and the ivf index (p50 of 20).

    python benchmarks/search_speed.py                       # 1,000,000 x 512, K=8, 1 thread
    python benchmarks/search_speed.py --n 100000 --types flat ivf --no-e2e
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eval_speed import class_sizes, peak_rss_bytes

TYPES = ("flat", "ivf", "hnsw", "ivfpq")
K = 10


# ------------------------------------------------------------------------------------------ data
def learner_slices(dim: int, learners: int) -> list[slice]:
    step = dim // learners
    return [slice(k * step, (k + 1) * step) for k in range(learners)]


def normalise_learners(x: np.ndarray, slices: list[slice]) -> None:
    for s in slices:
        x[:, s] /= np.linalg.norm(x[:, s], axis=1, keepdims=True)


def class_centres(classes: int, dim: int, superclasses: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    if superclasses:
        supers = rng.standard_normal((superclasses, dim), dtype=np.float32)
        supers /= np.linalg.norm(supers, axis=1, keepdims=True)
        centres *= spread / np.sqrt(dim)
        centres += supers[rng.integers(0, superclasses, classes)]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres


def write_data(folder: Path, args: argparse.Namespace) -> None:
    """gallery.npy (memory-mapped while written, in chunks) and queries.npy."""
    rng = np.random.default_rng(args.seed)
    classes = args.n // 5  # SOP-like: ~5 images per class (sizes 2..12)
    labels = rng.permutation(np.repeat(np.arange(classes), class_sizes(args.n, classes, rng)))
    centres = class_centres(classes, args.dim, args.superclasses, args.spread, rng)
    slices = learner_slices(args.dim, args.learners)
    gallery = np.lib.format.open_memmap(folder / "gallery.npy", mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    for start in range(0, args.n, 50_000):
        stop = min(start + 50_000, args.n)
        chunk = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
        chunk *= args.noise / np.sqrt(args.dim)
        chunk += centres[labels[start:stop]]
        normalise_learners(chunk, slices)
        gallery[start:stop] = chunk
    gallery.flush()
    del gallery
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32) * np.float32(args.noise / np.sqrt(args.dim))
    q += centres[labels[rng.integers(0, args.n, args.queries)]]
    normalise_learners(q, slices)
    np.save(folder / "queries.npy", q)


# ---------------------------------------------------------------------------------------- worker
def qps(search, queries: np.ndarray, batch: int, limit_s: float) -> float:
    """Queries per second at a batch size: whole batches until ``limit_s`` (at least one batch)."""
    done, start = 0, time.perf_counter()
    while done < len(queries):
        search(queries[done : done + batch])
        done += len(queries[done : done + batch])
        if time.perf_counter() - start > limit_s:
            break
    return done / (time.perf_counter() - start)


def side_by_side(plain, gce, plain_queries: np.ndarray, queries: np.ndarray, limit_s: float) -> dict[str, float]:
    """Medians of 3 alternating rounds of the plain faiss index and gce's flat search (a load
    change on a shared machine hits both alike, which separate measurements do not)."""
    rounds: dict[str, list[float]] = {}
    for _ in range(3):
        for batch in (1, 256):
            rounds.setdefault(f"qps{batch}", []).append(qps(plain, plain_queries, batch, limit_s))
            rounds.setdefault(f"gce_qps{batch}", []).append(qps(gce, queries, batch, limit_s))
    return {name: float(np.median(values)) for name, values in rounds.items()}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth, strict=True)]))


def worker(index_type: str, folder: Path, args: argparse.Namespace) -> dict:
    import faiss

    from gce.retrieval import build_index

    faiss.omp_set_num_threads(args.threads)
    gallery = np.load(folder / "gallery.npy")
    queries = np.load(folder / "queries.npy")
    meta = {
        "model_id": "synthetic",
        "embedding_dim": args.dim,
        "num_learners": args.learners,
        "learner_slices": [[s.start, s.stop] for s in learner_slices(args.dim, args.learners)],
    }
    start = time.perf_counter()
    index, report = build_index(
        gallery,
        [""] * len(gallery),
        None,
        folder / f"index-{index_type}",
        meta,
        index_type=index_type,
        sample=args.sample,
        progress=True,
    )
    build_s = time.perf_counter() - start
    result = {
        "type": index_type,
        "build_s": report.build_seconds,
        "build_total_s": build_s,
        "index_mib": report.index_bytes / 2**20,
        "default": report.chosen.get("setting", "-"),
        "rows": [],
    }
    del gallery
    one = [0]
    if index_type == "flat":
        truth = index.search_arrays(queries, K)[1]
        truth_one = index.search_arrays(queries, K, learners=one)[1]
        np.save(folder / "truth.npy", truth)
        np.save(folder / "truth_one.npy", truth_one)
        plain = index.faiss_index  # the same object: a faiss.IndexFlatIP
        from gce.retrieval import query_vectors

        qv = query_vectors(queries, index.learner_slices)
        result["plain_faiss"] = {
            "class": type(plain).__name__,
            **side_by_side(
                lambda q: plain.search(q, K), lambda q: index.search_arrays(q, K), qv, queries, args.time_limit
            ),
        }
        settings = [("exact", {})]
    else:
        truth, truth_one = np.load(folder / "truth.npy"), np.load(folder / "truth_one.npy")
        settings = [(row["setting"], {k: row[k] for k in ("nprobe", "ef_search") if k in row}) for row in report.rows]
    for name, params in settings:
        if params:
            index.set_search_params(**params)
        row = {
            "setting": name,
            "recall": recall(index.search_arrays(queries, K)[1], truth),
            "recall_learner0": recall(index.search_arrays(queries, K, learners=one)[1], truth_one),
            "qps1": qps(lambda q: index.search_arrays(q, K), queries, 1, args.time_limit),
            "qps256": qps(lambda q: index.search_arrays(q, K), queries, 256, args.time_limit),
        }
        result["rows"].append(row)
        print(f"  {index_type} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if index_type not in args.keep_index:
        import shutil

        shutil.rmtree(folder / f"index-{index_type}", ignore_errors=True)
    result["peak_rss_gib"] = peak_rss_bytes() / 2**30
    return result


def e2e_worker(folder: Path, args: argparse.Namespace) -> dict:
    """Latency from an image file to the top-10 list, model and index loaded (p50 of 20)."""
    import faiss
    import torch
    from PIL import Image

    from gce.config import ModelConfig
    from gce.models import build_model
    from gce.retrieval import Embedder, SearchIndex

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out = {}
    indexes = {
        t: SearchIndex.load(folder / f"index-{t}", verify=False)
        for t in args.keep_index
        if (folder / f"index-{t}").is_dir()
    }
    for size in (64, 224):
        image = folder / f"query-{size}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image, quality=90)
        model = build_model(
            ModelConfig(
                backbone="mobilenet_v2",
                head="gce",
                num_learners=args.learners,
                embedding_dim=args.dim,
                pretrained=False,
                freeze_bn=True,
            )
        )
        embedder = Embedder(model, image_size=size, resize_to=size)
        for name, index in indexes.items():
            index.search(embedder.embed_paths([image]), K)  # warm-up
            times = []
            for _ in range(20):
                start = time.perf_counter()
                index.search(embedder.embed_paths([image]), K)
                times.append(time.perf_counter() - start)
            embed_times = []
            for _ in range(20):
                start = time.perf_counter()
                embedder.embed_paths([image])
                embed_times.append(time.perf_counter() - start)
            out[f"{size}px/{name}"] = {
                "p50_ms": 1000 * float(np.median(times)),
                "embed_p50_ms": 1000 * float(np.median(embed_times)),
                "setting": json.dumps(index.search_params),
            }
    return out


# ------------------------------------------------------------------------------------------ main
def run_child(kind: str, folder: Path, argv: list[str]) -> dict:
    # PASSIVE: faiss and torch each bring an OpenMP runtime; spinning threads of one starve the other
    # (a 64 px embedding took 0.75 s instead of 0.07 s on two busy cores).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(ARGS.threads),
        "MKL_NUM_THREADS": str(ARGS.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", kind, "--data", str(folder)],
        stdout=subprocess.PIPE,
        env=env,
        check=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--learners", type=int, default=8)
    ap.add_argument("--noise", type=float, default=2.25, help="within-class spread (eval benchmark: 2.25)")
    ap.add_argument("--superclasses", type=int, default=0, help="group class centres around this many (0: no)")
    ap.add_argument("--spread", type=float, default=1.0, help="class centres' spread around their super-class")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=500, help="gallery items the build-time tuning uses")
    ap.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per QPS measurement")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the gallery file (default: system temp)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.keep_index = [] if args.no_e2e else [t for t in ("flat", "ivf") if t in args.types]
    ARGS = args
    if args.worker == "e2e":
        print(json.dumps(e2e_worker(args.data, args)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args)))
        return
    if "flat" not in args.types:
        raise SystemExit("--types must include flat (the exact ground truth)")
    argv = list(sys.argv[1:])
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="gce-search-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_data(folder, args)
        structure = f"{args.superclasses} super-classes (spread {args.spread}), " if args.superclasses else ""
        print(
            f"{args.n:,} x {args.dim} gallery (K={args.learners} unit learner slices), ~{args.n // 5:,} classes of"
            f" 2..12, {structure}noise {args.noise}, {args.queries} queries; {args.threads} threads;"
            f" data written in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        results = [run_child(t, folder, argv) for t in ["flat", *[t for t in args.types if t != "flat"]]]
        e2e = {} if args.no_e2e else run_child("e2e", folder, argv)
    print_tables(results, e2e)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "e2e": e2e}, indent=2)
        )


def print_tables(results: list[dict], e2e: dict) -> None:
    exact = results[0]["rows"][0]
    print(
        f"\n| index | setting | build s | index MiB | peak RSS GiB | recall@{K} | recall@{K} learner 0 |"
        f" QPS batch 1 | QPS batch 256 | x exact (b256) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for i, row in enumerate(r["rows"]):
            mark = " *" if row["setting"] == r["default"] else ""
            head = f"{r['build_s']:.0f} | {r['index_mib']:,.0f} | {r['peak_rss_gib']:.1f}" if i == 0 else " | | "
            print(
                f"| {r['type'] if i == 0 else ''} | {row['setting']}{mark} | {head} | {row['recall']:.3f} |"
                f" {row['recall_learner0']:.3f} | {row['qps1']:,.1f} | {row['qps256']:,.1f} |"
                f" {row['qps256'] / exact['qps256']:.1f} |"
            )
    plain = results[0].get("plain_faiss")
    if plain:
        print(
            f"\nplain faiss.{plain['class']} on the same vectors: {plain['qps1']:,.1f} QPS at batch 1,"
            f" {plain['qps256']:,.1f} at batch 256; gce flat in the same alternating rounds: "
            f"{plain['gce_qps1']:,.1f} / {plain['gce_qps256']:,.1f} (medians of 3)"
        )
    if e2e:
        print("\n| query image | index | load-to-result p50 ms | of which embedding p50 ms |")
        print("|---|---|---:|---:|")
        for key, value in e2e.items():
            size, name = key.split("/")
            print(f"| {size} | {name} {value['setting']} | {value['p50_ms']:.1f} | {value['embed_p50_ms']:.1f} |")


if __name__ == "__main__":
    main()
