"""Sharded embedding extraction: each rank embeds every W-th batch, all ranks get the whole result.

The batches are exactly those of a single-process extraction (``batch_size`` consecutive items,
the last one short): rank r takes batches r, r + W, r + 2W ... So every image is embedded in the
same batch as by one process, and the gathered embeddings are bit-identical to one process's on
the same machine (same kernels, same thread count), in dataset order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.data import Dataset, Subset

from gce.distributed.collectives import all_gather_rows
from gce.distributed.context import DistContext, broadcast_object
from gce.evaluation import extract_embeddings

__all__ = ["compute_on_main", "extract_embeddings_sharded", "shard_batches"]

T = TypeVar("T")


def shard_batches(size: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Dataset indices of the batches ``rank, rank + W, ...`` of a ``size``-item pass, in order."""
    batches = range(rank, math.ceil(size / batch_size), world_size)
    return [i for b in batches for i in range(b * batch_size, min(size, (b + 1) * batch_size))]


def extract_embeddings_sharded(
    model: torch.nn.Module,
    dataset: Dataset,
    ctx: DistContext,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gce.evaluation.extract_embeddings` over ``ctx.world_size`` ranks: same result, on
    every rank (CPU tensors, dataset order); each rank embeds ~1/W of the batches."""
    if not ctx.enabled:
        return extract_embeddings(
            model,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=ctx.device,
            progress=progress,
            desc=desc,
        )
    size = len(dataset)  # type: ignore[arg-type]
    mine = shard_batches(size, batch_size, ctx.rank, ctx.world_size)
    if mine:
        embeddings, labels = extract_embeddings(
            model,
            Subset(dataset, mine),
            batch_size=batch_size,
            num_workers=num_workers,
            device=ctx.device,
            progress=progress and ctx.is_main,
            desc=desc,
        )
    else:  # fewer batches than ranks: this rank has none, but still takes part in the gather
        dim = _embedding_dim(model, dataset, ctx.device)
        embeddings, labels = torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
    # NCCL gathers device tensors; gloo CPU ones.
    parts = all_gather_rows(embeddings.to(ctx.device))
    label_parts = all_gather_rows(labels.to(ctx.device))
    out = torch.empty(size, parts[0].shape[1], dtype=parts[0].dtype)
    out_labels = torch.empty(size, dtype=torch.int64)
    for rank, (part, part_labels) in enumerate(zip(parts, label_parts, strict=True)):
        rows = torch.as_tensor(shard_batches(size, batch_size, rank, ctx.world_size), dtype=torch.int64)
        out[rows] = part.cpu()
        out_labels[rows] = part_labels.cpu()
    return out, out_labels


def _embedding_dim(model: torch.nn.Module, dataset: Dataset, device: torch.device) -> int:
    dim = getattr(model, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    embeddings, _ = extract_embeddings(model, Subset(dataset, [0]), batch_size=1, device=device, progress=False)
    return int(embeddings.shape[1])


def compute_on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` run once, on rank 0, and its (picklable) result broadcast to every rank.

    For work whose result must be identical everywhere but may differ bitwise between machines
    (k-means, the Hungarian matching, metrics): it is computed once rather than trusted to agree.
    """
    if not ctx.enabled:
        return fn()
    outcome: tuple[str, object] | None = None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # the other ranks must not wait for a result that never comes
            outcome = ("error", exc)
    status, value = broadcast_object(ctx, outcome)
    if status == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
