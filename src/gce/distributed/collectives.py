"""Collectives with exact gradients, and gathers of unequal shards.

:func:`all_gather_with_grad` concatenates every rank's rows (rank 0's first, so every rank sees the
same order). Its backward returns each rank the gradient of its own rows **summed over all ranks**:
every rank's loss depends on every rank's rows, and the gradient of the sum of the ranks' losses
with respect to rank r's rows is that sum. Two known pitfalls are avoided: returning only the local
``grads[rank]`` (off by the world size), and leaving the gradient on the other ranks' copies unused.
On NCCL the backward is one reduce-scatter; gloo has no reduce-scatter, so there it is an
all-reduce of the whole gradient followed by taking the own slice (same values, more traffic; the
batch embeddings are small).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

__all__ = ["all_gather_rows", "all_gather_with_grad", "all_reduce_sum", "all_reduce_with_grad", "gather_sizes"]


def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Number of rows of every rank, in rank order."""
    count = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c) for c in torch.cat(counts).tolist()]  # one device-to-host copy, not one per rank


def _all_gather_into(out: Tensor, tensor: Tensor) -> None:
    # torch 2.14 renamed all_gather_into_tensor / reduce_scatter_tensor (deprecated, warning on every
    # call) to all_gather_single / reduce_scatter_single.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, tensor)


def _reduce_scatter_sum_into(out: Tensor, tensor: Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, tensor, op=dist.ReduceOp.SUM)


class _AllGatherRows(Function):
    """Forward: all ranks' rows (``sizes[r]`` each) concatenated; shards are padded to the
    longest for the collective. Backward: the summed gradient of the own rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:
        rank, world = _world()
        longest = max(sizes)
        ctx.sizes, ctx.rank, ctx.longest = sizes, rank, longest
        padded = tensor.contiguous()
        if tensor.shape[0] < longest:
            padded = torch.cat([padded, padded.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))])
        out = padded.new_empty((world * longest, *tensor.shape[1:]))
        _all_gather_into(out, padded)
        if all(size == longest for size in sizes):
            return out
        return torch.cat([out[r * longest : r * longest + size] for r, size in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        sizes, rank, longest = ctx.sizes, ctx.rank, ctx.longest
        grad = grad.contiguous()
        offset = sum(sizes[:rank])
        if dist.get_backend() == dist.Backend.NCCL:
            if any(size != longest for size in sizes):  # back to the padded layout of the collective
                layout = grad.new_zeros((len(sizes) * longest, *grad.shape[1:]))
                for r, size in enumerate(sizes):
                    layout[r * longest : r * longest + size] = grad[sum(sizes[:r]) : sum(sizes[:r]) + size]
                grad = layout
            mine = grad.new_empty((longest, *grad.shape[1:]))
            _reduce_scatter_sum_into(mine, grad)
            return mine[: sizes[rank]], None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[offset : offset + sizes[rank]].clone(), None


class _AllReduceSum(Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # d(sum of all ranks' losses)/d(my input) = sum over ranks of d(loss_r)/d(the reduced value).
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def all_gather_with_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Rows of every rank concatenated in rank order, differentiable as described in the module
    docstring. ``sizes``: every rank's number of rows, when known (else gathered first; the
    trailing shape must be the same everywhere). Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _AllGatherRows.apply(tensor, sizes)


def all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """Sum over ranks, differentiable (the backward sums the ranks' gradients). Identity alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks of a tensor that needs no gradient (counts, logged values); a copy."""
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(tensor: Tensor) -> list[Tensor]:
    """Every rank's tensor (any number of rows, same trailing shape and dtype), in rank order, no
    gradient. Shards are padded to the longest for the collective and cut back afterwards."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [tensor]
    _, world = _world()
    sizes = gather_sizes(tensor.shape[0], tensor.device)
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]
