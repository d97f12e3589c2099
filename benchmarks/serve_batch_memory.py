"""Why ``gce serve`` pads model batches to powers of two: resident memory after many batch sizes.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_batch_memory.py

Embeds 400 batches of random sizes 1..32 with the emoji model's architecture (MobileNetV2, 64 px,
K=8, D=512, untrained), once with the sizes as they come and once rounded up to a power of two,
each in a fresh process, and prints the resident memory after every 50 batches. The CPU backend
keeps compiled kernels per input shape, so the first grows until all 32 shapes have been seen.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = 400


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def child(mode: str, checkpoint: str) -> None:
    import numpy as np
    import torch

    from gce.retrieval import Embedder

    torch.set_num_threads(1)
    embedder = Embedder.from_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    x = torch.randn(32, 3, 64, 64)
    started = time.perf_counter()
    samples = []
    for step in range(BATCHES):
        n = int(rng.integers(1, 33))
        if mode == "padded":
            n = 1 << (n - 1).bit_length()
        embedder.embed_tensors(x[:n])
        if step % 50 == 49:
            samples.append(f"{rss_mib():.0f}")
    print(f"{mode:<8} {' '.join(samples)}   ({time.perf_counter() - started:.1f} s)", flush=True)


def main() -> None:
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
        return
    from serve_load import untrained_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = untrained_checkpoint(Path(tmp) / "model.pt")
        print(f"resident MiB after every 50 of {BATCHES} batches (random sizes 1..32):")
        for mode in ("random", "padded"):
            subprocess.run([sys.executable, __file__, mode, str(checkpoint)], check=True)


if __name__ == "__main__":
    main()
