"""Speed and peak memory of retrieval evaluation on SOP-sized synthetic embeddings.

Compares gce's evaluator (Recall@{1,10,100,1000} + MAP@R + R-Precision, no clustering) with
pytorch-metric-learning's ``AccuracyCalculator`` (precision_at_1, MAP@R, R-Precision,
``k="max_bin_count"``) on the same embeddings, and checks that the shared metrics agree.

Each method runs in a fresh subprocess so that its peak resident memory (``VmHWM``) is its own; the
"baseline" row is a process that only imports the libraries and loads the embeddings.

    python benchmarks/eval_speed.py                      # 60,000 x 512, 11,318 classes (SOP test size)
    python benchmarks/eval_speed.py --n 5000 --classes 900 --skip-pml
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECALL_KS = (1, 10, 100, 1000)
METHODS = ("baseline", "gce", "gce-faiss", "pml")


# ------------------------------------------------------------------------------------------ data
def class_sizes(n: int, classes: int, rng: np.random.Generator, lo: int = 2, hi: int = 12) -> np.ndarray:
    """Random class sizes in [lo, hi] summing to n (SOP's test split: ~5.3 images per class)."""
    if not lo * classes <= n <= hi * classes:
        raise SystemExit(f"--n {n} cannot be split into {classes} classes of {lo}..{hi} images")
    sizes = np.full(classes, lo, dtype=np.int64)
    while (missing := n - int(sizes.sum())) > 0:  # hand out the rest at random, capped at hi
        sizes = np.minimum(sizes + np.bincount(rng.integers(0, classes, missing), minlength=classes), hi)
    return sizes


def make_embeddings(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised ``centre[label] + noise * gaussian / sqrt(dim)``: same-class cosine ~ 1/(1+noise^2),
    other-class ~ 0 +- 1/sqrt(dim), so retrieval is neither trivial nor hopeless."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), class_sizes(n, classes, rng)))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise / np.sqrt(dim)
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


# ---------------------------------------------------------------------------------------- worker
def peak_rss_bytes() -> int:
    """This process' peak resident set size (VmHWM; ru_maxrss where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_method(method: str, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import torch

    if method == "baseline":
        return {}
    if method in ("gce", "gce-faiss"):
        from gce.evaluation import evaluate_embeddings

        res = evaluate_embeddings(
            x, labels, recall_ks=RECALL_KS, clustering=False, backend="faiss" if method == "gce-faiss" else "torch"
        )
        return {**{f"R@{k}": v for k, v in res.recall.items()}, "MAP@R": res.map_at_r, "RP": res.r_precision}
    if method == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        acc = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
        return {"R@1": acc["precision_at_1"], "MAP@R": acc["mean_average_precision_at_r"], "RP": acc["r_precision"]}
    raise SystemExit(f"unknown method {method!r}")


def worker(method: str, data: Path, repeats: int) -> None:
    import torch  # noqa: F401  (every row pays for importing torch: ~0.6 GB with a CUDA build)

    x, labels = np.load(data / "x.npy"), np.load(data / "labels.npy")
    times, values = [], {}
    for _ in range(repeats if method != "baseline" else 1):
        start = time.perf_counter()
        values = run_method(method, x, labels)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "method": method,
                "seconds": min(times),
                "all_seconds": times,
                "peak_rss": peak_rss_bytes(),
                "values": values,
            }
        )
    )


# ---------------------------------------------------------------------------------------- parent
def run_worker(method: str, data: Path, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--data", str(data), "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000, help="number of embeddings (SOP test: 60,502)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=11318, help="number of classes (sizes 2..12 at random)")
    ap.add_argument("--noise", type=float, default=2.25, help="within-class spread (higher = harder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method (the fastest is shown)")
    ap.add_argument("--skip-pml", action="store_true", help="do not run pytorch-metric-learning")
    ap.add_argument("--faiss", action="store_true", help="also time gce with backend='faiss'")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.repeats)
        return

    methods = ["baseline", "gce"] + (["gce-faiss"] if args.faiss else []) + ([] if args.skip_pml else ["pml"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        x, labels = make_embeddings(args.n, args.dim, args.classes, args.noise, args.seed)
        np.save(data / "x.npy", x)
        np.save(data / "labels.npy", labels)
        del x
        print(
            f"{args.n} x {args.dim} embeddings, {args.classes} classes, noise {args.noise}, seed {args.seed}",
            file=sys.stderr,
        )
        rows = []
        for method in methods:
            print(f"running {method} ...", file=sys.stderr, flush=True)
            rows.append(run_worker(method, data, args.repeats))

    print("| method | seconds | peak RSS (GB) | R@1 | R@10 | R@100 | R@1000 | MAP@R | R-Precision |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        v = row["values"]
        print(
            f"| {row['method']} | {row['seconds']:.1f} | {row['peak_rss'] / 1e9:.2f} | "
            + " | ".join(fmt(v.get(key)) for key in ("R@1", "R@10", "R@100", "R@1000", "MAP@R", "RP"))
            + " |"
        )
    check_agreement(rows)


def check_agreement(rows: list[dict], tol: float = 1e-4) -> None:
    """Metrics shared by several methods must agree (up to float32 near-ties between backends)."""
    by = {r["method"]: r["values"] for r in rows if r["values"]}
    ref = by.get("gce")
    for name, values in by.items():
        if name == "gce" or ref is None:
            continue
        diffs = {k: abs(values[k] - ref[k]) for k in values if k in ref}
        worst = max(diffs.values(), default=0.0)
        verdict = "agree" if worst <= tol else "DISAGREE"
        print(f"\n{name} vs gce: {verdict} (largest difference {worst:.2e} over {', '.join(diffs)})")
        if worst > tol:
            sys.exit(1)


if __name__ == "__main__":
    main()
