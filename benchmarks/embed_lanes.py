"""gce embed with and without batch lanes, alternating in one process: images/s and whether the
stores are equal (the A/B behind docs/retrieval.md's "Batches on lanes").

    PYTHONPATH=src python benchmarks/embed_lanes.py --checkpoint runs/base-demo/emoji-gce/model.pt

Each pair embeds the same generated 64 px catalogue into a fresh store twice: once with one ONNX
Runtime session on ``--threads`` threads (batches one after the other), once on the lanes
(``src/gce/retrieval/batch_lanes.py``). Prints every pair and the medians.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import gce.retrieval.store as store
from gce.data.synthetic import make_pattern_folder
from gce.retrieval import Embedder, embed_to_store, read_store
from gce.retrieval.batch_lanes import BatchLanes
from gce.retrieval.runtimes import set_threads


class OneSession(BatchLanes):
    """The batches one after the other on the embedder's own (multi-threaded) session."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__(embedder)
        self.close()
        self.runtime, self.lanes = embedder.runtime, 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gce-embed-lanes")
    args = p.parse_args()
    set_threads(args.threads)
    embedder = Embedder.from_checkpoint(args.checkpoint, runtime="onnx")
    folder = make_pattern_folder(
        args.workdir / "catalogue", num_classes=20, per_class=max(1, args.images // 20), size=64
    )
    paths = sorted(str(path) for path in folder.glob("*/*"))[: args.images]
    speeds: dict[str, list[float]] = {"one session": [], "lanes": []}
    stores: dict[str, np.ndarray] = {}
    out = args.workdir / "store"
    for pair in range(args.pairs):
        for name, lanes in (("one session", OneSession), ("lanes", BatchLanes)):
            store.BatchLanes = lanes  # type: ignore[misc]
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            embed_to_store(embedder, paths, None, out, workers=args.workers, progress=False)
            speeds[name].append(len(paths) / (time.perf_counter() - start))
            stores[name] = read_store(out).embeddings.copy()
        print(f"pair {pair}: one session {speeds['one session'][-1]:,.0f}, lanes {speeds['lanes'][-1]:,.0f} images/s")
    store.BatchLanes = BatchLanes  # type: ignore[misc]
    for name, values in speeds.items():
        print(f"{name}: median {np.median(values):,.0f} images/s")
    same = np.array_equal(stores["one session"], stores["lanes"])
    print(f"stores equal: {same} (largest difference {np.abs(stores['one session'] - stores['lanes']).max():.1e})")


if __name__ == "__main__":
    main()
