"""Filtered search: recall@10 against exact search over the passing items, and ms per query, for
each index type and a filter passing about 100%, 50%, 5% and 0.5% of the items.

The gallery is synthetic (tests/helpers/retrieval_fixtures.clustered_embeddings: ``--clusters``
tight clusters, learner-normalised); labels are drawn at random among 1,000 names, independent of
the clusters, so a label filter keeps a random share of every cluster. Each setting is timed three
times on one batch of ``--queries`` queries (after one search that builds the filter's mask) and
the fastest is shown. Each index's search setting is what ``gce index build`` chose on its own
sample, so it varies with the machine's load.

    python benchmarks/filter_speed.py                  # 20,000 x 128, K=4
    python benchmarks/filter_speed.py --n 100000 --types hnsw
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gce.retrieval import build_index, parse_filter
from gce.retrieval.vectors import query_vectors, stored_vectors
from helpers.retrieval_fixtures import clustered_embeddings, model_meta

NAMES = 1000
SHARES = {"none": None, "50%": 500, "5%": 50, "0.5%": 5}  # how many of the 1,000 names pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--learners", type=int, default=4)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"])
    args = parser.parse_args()
    n, d, k = args.n, args.dim, args.learners
    x, _ = clustered_embeddings(n + args.queries, dim=d, num_learners=k, clusters=args.clusters, seed=0)
    gallery, queries = x[:n], x[n:]
    labels = [f"c{v}" for v in np.random.default_rng(1).integers(0, NAMES, n)]
    paths = [f"/catalogue/{i}.png" for i in range(n)]
    slices = [slice(i * d // k, (i + 1) * d // k) for i in range(k)]
    scores = query_vectors(queries, slices) @ stored_vectors(gallery, slices).T
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            index, _ = build_index(gallery, paths, labels, Path(tmp) / kind, model_meta(d, k), index_type=kind)
            for name, names in SHARES.items():
                texts = None if names is None else "label in " + ",".join(f"c{i}" for i in range(names))
                item_filter = parse_filter(texts)
                keep = np.ones(n, bool) if item_filter is None else item_filter.mask(paths, labels)
                truth = np.argsort(-np.where(keep, scores, -np.inf), axis=1)[:, :10]
                index.search_arrays(queries[:5], 10, filter=item_filter)
                best = np.inf
                for _ in range(3):
                    start = time.perf_counter()
                    _, ids = index.search_arrays(queries, 10, filter=item_filter)
                    best = min(best, time.perf_counter() - start)
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
                print(
                    f"{kind:5} {index.search_params!s:20} filter {name:5} passing {int(keep.sum()):7,}"
                    f"  recall@10 {recall:.3f}  {1000 * best / len(queries):.3f} ms/query",
                    flush=True,
                )


if __name__ == "__main__":
    main()
