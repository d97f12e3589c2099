"""Training throughput of 1 process x 2 threads against 2 processes x 1 thread (gloo, this CPU).

Each setting trains the same model on the same global batches (P x M random images, one learner
per step, round-robin) for ``--steps`` steps after ``--warmup``:

* ``1 proc x 2 threads``: the single-process step (plain model and loss, the whole batch);
* ``2 procs x 1 thread``: what ``gce train --nproc 2`` runs: DDP, BatchNorm over the global batch,
  the gathered triplet loss, each rank half the batch;
* ``2 procs x 1 thread, no communication``: the same half-batch step without DDP, gathers or
  synchronised BatchNorm (wrong results, only a timing reference). The communication share of the
  2-process step is ``1 - this / the 2-process step``.

images/s = global batch / median step time. Run with nothing else on the machine; on a shared
machine compare the rows of one run only.

    python benchmarks/distributed_scaling.py
    python benchmarks/distributed_scaling.py --backbone resnet18 --size 64 --steps 10
    python benchmarks/distributed_scaling.py --memory --backbone resnet50 --size 224 --classes 32 --per-class 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from gce.config import ModelConfig
from gce.distributed import DistributedGCELoss, init_distributed, shutdown_distributed
from gce.distributed.batchnorm import synchronise_batchnorm
from gce.distributed.training import ddp_without_buffer_sync
from gce.losses import GCELoss
from gce.models import build_model
from gce.runtime import flush_denormals


def _model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            backbone=args.backbone,
            head="gce",
            num_learners=args.k,
            embedding_dim=args.dim,
            pretrained=False,
            freeze_bn=True,
        )
    )


def _batch(args: argparse.Namespace, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    return torch.randn(len(labels), 3, args.size, args.size, generator=g), labels


def run_steps(args: argparse.Namespace, rank: int, world: int, communicate: bool) -> list[float]:
    """Seconds of each measured step on this rank."""
    flush_denormals(torch.device("cpu"))  # as gce train does on CPU
    model = _model(args).train()
    loss_fn: GCELoss = GCELoss(margin=0.1, mining="semihard")
    step_model: nn.Module = model
    if world > 1 and communicate:
        synchronise_batchnorm(model, torch.device("cpu"))
        step_model = ddp_without_buffer_sync(model, torch.device("cpu"))
        loss_fn = DistributedGCELoss.like(loss_fn)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    slices = model.learner_slices()
    times = []
    for step in range(args.warmup + args.steps):
        images, labels = _batch(args, step)
        rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
        start = time.perf_counter()
        loss, _ = loss_fn(step_model(images[rows]), labels[rows], slices[step % args.k])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, communicate: bool, folder: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    init_distributed("cpu", timeout_s=600)
    try:
        times = run_steps(args, rank, world, communicate)
    finally:
        shutdown_distributed()
    torch.save(times, os.path.join(folder, f"{rank}.pt"))


def two_processes(args: argparse.Namespace, communicate: bool) -> list[float]:
    """Per-step time of the slower rank (a step ends when both are done)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(2, port, args, communicate, folder), nprocs=2, join=True)
        per_rank = [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(2)]
    return [max(pair) for pair in zip(*per_rank, strict=True)]


def saved_bytes_per_image(args: argparse.Namespace, bf16: bool) -> float:
    """Bytes the autograd graph keeps for backward per training image (measured on a CPU forward)."""
    model = _model(args).train()
    storages: dict[int, int] = {}  # a tensor saved by several operations is stored once

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    images = torch.randn(2, 3, args.size, args.size)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        model(images)
    return sum(storages.values()) / 2


def memory_table(args: argparse.Namespace) -> None:
    """Training memory per GPU for 1, 2, 4, 8 processes at the given global batch (computed)."""
    model = _model(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # fp32 weights + gradients + Adam's two moments + DDP's gradient buckets (a copy of the gradients).
    states = 4 * (frozen + trainable) + 4 * trainable * 4
    batch = args.classes * args.per_class
    per_image = {False: saved_bytes_per_image(args, False), True: saved_bytes_per_image(args, True)}
    gib = 2.0**30
    print(
        f"{args.backbone} + GCE head K={args.k}, D={args.dim}, {args.size} px, global batch {batch}: "
        f"{trainable / 1e6:.1f} M trainable + {frozen / 1e6:.2f} M frozen parameters"
    )
    print(
        f"weights, gradients, Adam state, DDP buckets: {states / gib:.2f} GiB per process; activations kept for "
        f"backward: {per_image[False] / 2**20:.0f} MiB/image fp32, {per_image[True] / 2**20:.0f} MiB/image bf16"
    )
    print(f"{'processes':>9} {'images/process':>15} {'fp32 GiB':>9} {'bf16 GiB':>9}")
    for n in (1, 2, 4, 8):
        local = -(-batch // n)
        print(
            f"{n:>9} {local:>15} {(states + local * per_image[False]) / gib:>9.2f} "
            f"{(states + local * per_image[True]) / gib:>9.2f}"
        )
    print("(computed: allocator overhead, cuDNN workspaces and the CUDA context, ~0.5-1 GiB, come on top)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2", choices=["resnet18", "resnet50", "googlenet", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=16, help="P")
    p.add_argument("--per-class", type=int, default=4, help="M")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="print the computed training memory per GPU instead")
    args = p.parse_args()
    if args.memory:
        memory_table(args)
        return
    batch = args.classes * args.per_class
    torch.set_num_threads(2)
    rows = [("1 proc x 2 threads", statistics.median(run_steps(args, 0, 1, True)))]
    rows.append(("2 procs x 1 thread", statistics.median(two_processes(args, True))))
    rows.append(("2 procs x 1 thread, no communication", statistics.median(two_processes(args, False))))
    print(
        f"{args.backbone}, {args.size} px, global batch {args.classes}x{args.per_class}, K={args.k}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {os.cpu_count()} CPUs"
    )
    print(f"{'setting':<38} {'s/step':>7} {'images/s':>9}")
    for name, seconds in rows:
        print(f"{name:<38} {seconds:>7.3f} {batch / seconds:>9.1f}")
    share = 1 - rows[2][1] / rows[1][1]
    print(f"communication share of the 2-process step: {100 * share:.0f} %")


if __name__ == "__main__":
    main()
