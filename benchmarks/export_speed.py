"""CPU images/s of an exported model (onnxruntime, TorchScript) against PyTorch eager, same inputs.

Also prints the largest absolute difference of their embeddings from PyTorch's. Each runtime
gets ``--threads`` threads; the time is the median of ``--repeats`` runs over ``--batches``
batches of ``--batch`` preprocessed random images (preprocessing is not timed: it is the same
for all three).

    python benchmarks/export_speed.py --checkpoint runs/emoji-k8/model.pt
    python benchmarks/export_speed.py --checkpoint runs/emoji-k8/model.pt --onnx runs/emoji-k8/model.onnx
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gce.retrieval import Embedder
from gce.retrieval.export import export_model, load_exported


def images_per_second(run, batches: list[np.ndarray], repeats: int) -> float:
    run(batches[0])  # warm-up (graph optimisation, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        times.append(time.perf_counter() - start)
    return sum(len(b) for b in batches) / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--onnx", type=Path, help="an ONNX file exported from --checkpoint (default: export one now)")
    ap.add_argument("--torchscript", type=Path, help="a TorchScript file exported from --checkpoint (default: export)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    embedder = Embedder.from_checkpoint(args.checkpoint)
    size = embedder.image_size
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((args.batch, 3, size, size), dtype=np.float32) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = args.onnx or Path(tmp) / "model.onnx"
        ts_file = args.torchscript or Path(tmp) / "model.ts"
        if args.onnx is None:
            export_model(embedder, onnx_file, "onnx")
        if args.torchscript is None:
            export_model(embedder, ts_file, "torchscript")
        runtimes = {
            "PyTorch eager": lambda x: embedder.embed_tensors(torch.from_numpy(x)),
            "onnxruntime": load_exported(onnx_file, threads=args.threads),
            "TorchScript": load_exported(ts_file),
        }
        reference = np.concatenate([runtimes["PyTorch eager"](b) for b in batches])
        print(
            f"{args.checkpoint}: {embedder.model_config.get('backbone')} K={embedder.num_learners}"
            f" D={embedder.embedding_dim}, {size} px, batches of {args.batch}, {args.threads} thread(s)"
        )
        print("| runtime | images/s | x PyTorch | max abs diff |")
        print("|---|---:|---:|---:|")
        base = None
        for name, run in runtimes.items():
            speed = images_per_second(run, batches, args.repeats)
            base = base or speed
            diff = float(np.abs(np.concatenate([run(b) for b in batches]) - reference).max())
            print(f"| {name} | {speed:,.0f} | {speed / base:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
