"""The ``gce eval`` pipeline at SOP size, stage by stage: embed N generated images on a device with
the evaluation code path (:func:`gce.evaluation.extract_embeddings`, loader workers, pinned memory
and non-blocking copies on CUDA, bf16 autocast there), then the retrieval metrics (Recall@1/10/100/1000,
MAP@R, R-Precision) and the clustering metrics (k-means NMI, pairwise F1) on the CPU.

Images are generated on the fly in the loader workers (60,000 at 224 px would be 36 GB as one
tensor): each class of 5 images is a random 16 x 16 colour pattern scaled up, each image a shifted
copy of it. The model has random weights (no ImageNet weights offline), so the metrics' values
mean little; the times and memory are the measurement. Each stage prints its time as it ends, and
a stack dump of every thread is printed if a stage runs past ``--dump-after`` seconds.

    python benchmarks/eval_pipeline.py --device cuda                       # 60,000 x 512, ResNet-50 224 px
    python benchmarks/eval_pipeline.py --backbone resnet18 --size 64 --n 2000 --dim 64   # CPU-sized
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gce.config import ModelConfig
from gce.evaluation import evaluate_embeddings, extract_embeddings
from gce.evaluation import metrics as M
from gce.models import build_model


class ShiftedPatterns(Dataset):
    """``n`` images of ``size`` px in classes of ``per_class``: a class's seeded 16 x 16 pattern, shifted."""

    def __init__(self, n: int, size: int, per_class: int = 5) -> None:
        self.n, self.size, self.per_class = n, size, per_class

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = i // self.per_class
        pattern = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(label))
        image = F.interpolate(pattern, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return image.roll(shifts=3 * (i % self.per_class), dims=2), label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50", "googlenet", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=60_000, help="images")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=4, help="learners")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--dump-after", type=float, default=90.0, help="seconds before a stage's stack dump")
    p.add_argument("--progress", action="store_true", help="progress bar of the embedding pass")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def stage(name: str, start: float) -> float:
        seconds = time.perf_counter() - start
        print(f"  {name}: {seconds:.1f} s", flush=True)
        faulthandler.dump_traceback_later(args.dump_after, repeat=True, file=sys.stderr)  # restart the clock
        return seconds

    faulthandler.dump_traceback_later(args.dump_after, repeat=True, file=sys.stderr)
    model = build_model(
        ModelConfig(
            backbone=args.backbone,
            head="gce",
            num_learners=args.k,
            embedding_dim=args.dim,
            pretrained=False,
            freeze_bn=True,
        )
    ).to(device)
    dataset = ShiftedPatterns(args.n, args.size)
    start = time.perf_counter()
    for i in range(64):
        dataset[i]
    print(f"  making one image: {1000 * (time.perf_counter() - start) / 64:.2f} ms (one loader worker)", flush=True)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        x, y = extract_embeddings(
            model, dataset, batch_size=args.batch, num_workers=args.workers, device=device, progress=args.progress
        )
    if cuda:
        torch.cuda.synchronize()
    embed_s = stage(f"embedding {args.n:,} images", start)
    start = time.perf_counter()
    result = evaluate_embeddings(x, y, recall_ks=(1, 10, 100, 1000), clustering=False)
    retrieval_s = stage("retrieval metrics", start)
    start = time.perf_counter()
    nmi, clusters = M.nmi(x, y, seed=0)
    f1 = M.f1_score_pairwise(y, clusters)
    clustering_s = stage(f"k-means ({len(set(y.tolist())):,} clusters), NMI, F1", start)
    faulthandler.cancel_dump_traceback_later()
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(
        f"eval {args.n:,} x {args.dim} ({args.backbone} {args.size}px)\tembedding {embed_s:.0f} s "
        f"({args.n / embed_s:.0f} img/s on {args.device}), retrieval {retrieval_s:.0f} s, clustering "
        f"{clustering_s:.0f} s (CPU, {torch.get_num_threads()} threads), R@1 {100 * result.recall[1]:.1f}, "
        f"NMI {100 * nmi:.1f}, F1 {100 * f1:.1f}{peak}"
    )


if __name__ == "__main__":
    main()
