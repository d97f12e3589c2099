"""2 gloo processes: the sharded triplet loss equals the single-process loss, value and gradient.

The global batch is split in rank order; some anchors have their only positive on the other rank,
so mining must see across ranks. Gradients: after DDP's averaging over W ranks, the parameter
gradient equals the single-process one, i.e. each rank's gradient on its own rows is W x the
single-process gradient of those rows; also checked end to end through a DDP-wrapped layer.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gce.distributed import SINGLE, DistributedGCELoss, all_gather_with_grad, all_reduce_with_grad
from gce.losses import GCELoss
from helpers.distributed_helpers import run_ranks
from helpers.numerics import reordered

WORLD = 2
# Rank 0 holds rows 0-4, rank 1 rows 5-9. Row 2 (class 1) and row 4 (class 3) have their only
# positive on rank 1; rows 0-1 are a positive pair on rank 0.
LABELS = torch.tensor([0, 0, 1, 2, 3, 1, 2, 4, 4, 3])
UNEVEN = (6, 4)
# Tolerances (tests/helpers/numerics.py): the two paths differ in the order of their sums. A loss is a mean of
# <= 10 * 9 * 8 < 1000 triplet terms, each d_ap - d_an + margin with distances between unit vectors
# (<= 2); a term goes through the normalisation, the distance and the sum (depth 3): 2.6e-5.
LOSS_ATOL = reordered(1000, 3) * (2 + 0.3)
# A row's gradient: the same chain and its backward (depth 6), relative to the largest entry of the
# single-process gradient (a term's gradient is a difference of unit directions, all of size <= 1).
GRAD_RTOL = reordered(1000, 6)
# Through DDP's linear layer: one more product of length <= 10 and the all-reduce (depth 8).
PARAM_GRAD_RTOL = reordered(1000, 8)
SETTINGS = [
    {"mining": m, "distance": d, "full_embedding_weight": w, "margin": 0.3}
    for m, d, w in itertools.product(("semihard", "hard", "all"), ("euclidean", "cosine"), (0.0, 0.5))
]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(LABELS), 8, generator=g), torch.randn(len(LABELS), 5, generator=g)


def _case(loss: GCELoss, x: torch.Tensor, labels: torch.Tensor, mode: str):
    if mode == "learner":
        return loss(x, labels, slice(4, 8))
    if mode == "full":
        return loss(x, labels, None)
    meta = [labels % 2, labels // 2]  # the "all learners" reading: own labels per learner
    return loss.all_learners(x, labels, [slice(0, 4), slice(4, 8)], meta)


def _rows(ctx, split: tuple[int, ...]) -> slice:
    if not ctx.enabled:
        return slice(0, len(LABELS))
    start = sum(split[: ctx.rank])
    return slice(start, start + split[ctx.rank])


def _losses(ctx, settings: list[dict], split: tuple[int, ...] = (5, 5)) -> list[tuple]:
    """Per setting and mode: (loss parts, gradient of the own rows); single process when alone."""
    x_all, _ = _batch()
    rows = _rows(ctx, split)
    out = []
    for s in settings:
        loss = DistributedGCELoss(**s) if ctx.enabled else GCELoss(**s)
        for mode in ("learner", "full", "all_learners"):
            x = x_all[rows].clone().requires_grad_(True)
            total, parts = _case(loss, x, LABELS[rows], mode)
            total.backward()
            out.append((parts, x.grad.clone(), float(total.detach())))
    return out


def _ddp_layer(ctx) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """A DDP-wrapped linear embedding trained one step: its parameter gradients and the loss parts."""
    _, inputs = _batch()
    torch.manual_seed(1)
    layer = nn.Linear(5, 8)
    model = nn.parallel.DistributedDataParallel(layer) if ctx.enabled else layer
    rows = slice(ctx.rank * len(LABELS) // ctx.world_size, (ctx.rank + 1) * len(LABELS) // ctx.world_size)
    loss_fn = (DistributedGCELoss if ctx.enabled else GCELoss)(mining="all", margin=0.3, full_embedding_weight=0.5)
    z = nn.functional.normalize(model(inputs[rows]), dim=1)
    total, parts = loss_fn(z, LABELS[rows], slice(0, 4))
    total.backward()
    return total.detach(), [p.grad.clone() for p in layer.parameters()], parts


def _collectives(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through the gather and the all-reduce of a known function of all ranks' rows."""
    x = torch.full((2, 3), float(ctx.rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    ((gathered * weights).sum() * (ctx.rank + 1)).backward()
    y = torch.tensor([float(ctx.rank + 1)], requires_grad=True)
    (all_reduce_with_grad(y) * (ctx.rank + 1)).sum().backward()
    return x.grad, y.grad


def _everything(ctx) -> dict:
    """All checks of this module in one start of the processes (starting them is the slow part)."""
    out = {"losses": _losses(ctx, SETTINGS), "ddp": _ddp_layer(ctx)}
    if ctx.enabled:  # a batch that does not split evenly (6 + 4 rows)
        out["uneven"] = _losses(ctx, SETTINGS[:4], UNEVEN)
    if ctx.enabled:
        out["collectives"] = _collectives(ctx)
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    return _everything(SINGLE), run_ranks(_everything, WORLD)


@pytest.fixture(scope="module")
def results(runs):
    single, ranks = runs
    return single["losses"], [r["losses"] for r in ranks]


def test_gathered_order_and_gradients_sum_over_ranks(runs):
    grads = [r["collectives"] for r in runs[1]]
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    for rank, (x_grad, y_grad) in enumerate(grads):
        # Loss_r = (r + 1) * sum(w * gathered): d(sum over ranks)/d(x_rank) = (1 + 2) * w[rank rows].
        assert torch.equal(x_grad, 3 * weights[2 * rank : 2 * rank + 2])
        assert torch.equal(y_grad, torch.tensor([3.0]))


def test_sharded_loss_equals_single_process(results):
    single, ranks = results
    assert any(parts["triplets"] > 0 for parts, _, _ in single)
    for i, (parts, grad, total) in enumerate(single):
        for rank in range(WORLD):
            r_parts, r_grad, r_total = ranks[rank][i]
            assert r_parts.keys() == parts.keys()
            for key, value in parts.items():
                assert r_parts[key] == pytest.approx(value, abs=LOSS_ATOL), (SETTINGS[i // 3], key)
            rows = slice(rank * 5, rank * 5 + 5)
            # DDP averages over W ranks, so each rank back-propagates W x its share.
            torch.testing.assert_close(r_grad / WORLD, grad[rows], atol=GRAD_RTOL * float(grad.abs().max()), rtol=0)
            # The value is the global loss on every rank (logs, the finite-loss check).
            assert r_total == pytest.approx(total, abs=LOSS_ATOL)


def test_a_batch_split_unevenly_gives_the_same_loss(runs):
    single = runs[0]["losses"]
    for rank, run in enumerate(runs[1]):
        rows = slice(sum(UNEVEN[:rank]), sum(UNEVEN[: rank + 1]))
        for (parts, grad, _total), (r_parts, r_grad, _r_total) in zip(single, run["uneven"], strict=False):
            assert r_parts["loss"] == pytest.approx(parts["loss"], abs=LOSS_ATOL)
            assert r_parts["triplets"] == parts["triplets"]
            torch.testing.assert_close(r_grad / WORLD, grad[rows], atol=GRAD_RTOL * float(grad.abs().max()), rtol=0)


def test_cross_rank_positives_are_mined(results):
    single, ranks = results
    hard_all = next(i for i, s in enumerate(SETTINGS) if s["mining"] == "all") * 3
    assert ranks[0][hard_all][0]["triplets"] == single[hard_all][0]["triplets"] > 0
    # Row 2's only positive (row 5) is on rank 1: its gradient is non-zero only if mining crossed ranks.
    assert ranks[0][hard_all][1][2].abs().sum() > 0


def test_ddp_parameter_gradients_equal_single_process(runs):
    _single_total, single_grads, single_parts = runs[0]["ddp"]
    for _total, grads, parts in (r["ddp"] for r in runs[1]):
        assert parts["loss"] == pytest.approx(single_parts["loss"], abs=LOSS_ATOL)
        for g, s in zip(grads, single_grads, strict=False):
            torch.testing.assert_close(g, s, atol=PARAM_GRAD_RTOL * float(s.abs().max()), rtol=0)
