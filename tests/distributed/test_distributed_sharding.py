"""2 gloo processes: sharded extraction and evaluation equal one process exactly; BatchNorm over
the global batch equals one process's BatchNorm; work done once on rank 0 reaches every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gce.config import ModelConfig
from gce.distributed import SINGLE
from gce.distributed.batchnorm import GlobalBatchNorm, synchronise_batchnorm
from gce.distributed.sharding import compute_on_main, extract_embeddings_sharded, shard_batches
from gce.errors import GceError
from gce.evaluation import evaluate_embeddings
from gce.models import build_model
from helpers.distributed_helpers import run_ranks
from helpers.numerics import THREADS, reordered

WORLD = 2
SIZE, BATCH = 23, 4  # 6 batches, the last one short: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3, 5
# GlobalBatchNorm against BatchNorm2d: per channel, sums over 6 images x 3 x 3 positions = 54 values,
# each rank's half and then the all-reduce, in another order (tests/helpers/numerics.py). Outputs and running
# statistics: the mean, the variance and the normalisation (depth 3), relative to their largest entry.
BN_RTOL = reordered(54, 3)
# Input and weight gradients: the backward adds two more sums over the 54 values (depth 5).
BN_GRAD_RTOL = reordered(54, 5)


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(SIZE, 3, 32, 32, generator=g), torch.arange(SIZE) % 5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False, freeze_bn=True)
    )


def _extract_and_evaluate(ctx) -> tuple:
    embeddings, labels = extract_embeddings_sharded(_model(), _dataset(), ctx, batch_size=BATCH, progress=False)
    result = compute_on_main(ctx, lambda: evaluate_embeddings(embeddings, labels, recall_ks=(1, 2), seed=0))
    return embeddings, labels, result


def _batchnorm(ctx) -> tuple:
    """A conv + BN in training mode, 3 steps: outputs, input gradients, running statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    replaced = synchronise_batchnorm(net, torch.device("cpu")) if ctx.enabled else 0
    rows = slice(ctx.rank * 6 // ctx.world_size, (ctx.rank + 1) * 6 // ctx.world_size)
    outs, grads = [], []
    for step in range(3):
        x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(step))[rows].requires_grad_(True)
        y = net(x)
        # A loss that mixes rows: the gradient through the batch statistics matters.
        weights = torch.arange(6 * 4 * 3 * 3).reshape(6, 4, 3, 3).float().sin()
        (y * weights[rows]).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    bn = net[1]
    return replaced, outs, grads, bn.weight.grad, bn.running_mean, bn.running_var, type(bn).__name__


def _failure_on_main(ctx) -> str:
    def fail():
        raise GceError("only rank 0 knows")

    try:
        compute_on_main(ctx, fail)
    except GceError as exc:
        return str(exc)
    return "no error"


def _everything(ctx) -> dict:
    out = {"extract": _extract_and_evaluate(ctx), "bn": _batchnorm(ctx)}
    if ctx.enabled:
        out["failure"] = _failure_on_main(ctx)
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # as in the spawned ranks: same kernels, same bits
    try:
        single = _everything(SINGLE)
    finally:
        torch.set_num_threads(threads)
    return single, run_ranks(_everything, WORLD)


def test_shards_cover_every_item_once_by_whole_batches():
    shards = [shard_batches(SIZE, BATCH, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(SIZE))
    assert shards[0] == [0, 1, 2, 3, 12, 13, 14, 15] and shards[2][-3:] == [20, 21, 22]
    assert shard_batches(3, BATCH, 1, 2) == []  # fewer batches than ranks


def test_sharded_extraction_and_metrics_equal_one_process_exactly(runs):
    single, ranks = runs
    embeddings, labels, result = single["extract"]
    for rank_embeddings, rank_labels, rank_result in (r["extract"] for r in ranks):
        assert torch.equal(rank_embeddings, embeddings)
        assert torch.equal(rank_labels, labels)
        assert rank_result == result


def test_global_batchnorm_equals_one_process(runs):
    single, ranks = runs
    _, outs, grads, w_grad, mean, var, _ = single["bn"]
    for rank, (replaced, r_outs, r_grads, _r_w_grad, r_mean, r_var, name) in enumerate(r["bn"] for r in ranks):
        assert replaced == 1 and name == GlobalBatchNorm.__name__
        rows = slice(rank * 3, rank * 3 + 3)
        for a, b in zip(r_outs, outs, strict=False):
            torch.testing.assert_close(a, b[rows], atol=BN_RTOL * float(b.abs().max()), rtol=0)
        for a, b in zip(r_grads, grads, strict=False):  # each rank's own rows get the full gradient
            torch.testing.assert_close(a, b[rows], atol=BN_GRAD_RTOL * float(b.abs().max()), rtol=0)
        torch.testing.assert_close(r_mean, mean, atol=BN_RTOL * float(mean.abs().max()), rtol=0)
        torch.testing.assert_close(r_var, var, atol=BN_RTOL * float(var.abs().max()), rtol=0)
    # The BN weight gradient: each rank holds its share; summed they give the single-process one.
    torch.testing.assert_close(
        sum(r["bn"][3] for r in ranks), w_grad, atol=BN_GRAD_RTOL * float(w_grad.abs().max()), rtol=0
    )


def test_an_error_on_rank_zero_reaches_every_rank(runs):
    assert [r["failure"] for r in runs[1]] == ["only rank 0 knows"] * WORLD
