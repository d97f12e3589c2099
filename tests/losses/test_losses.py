"""Triplet loss on a learner's slice, checked against brute-force loops over triplets."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gce.losses import GCELoss, LearnerTripletLoss

Triplet = tuple[int, int, int]


def batch(seed: int = 0, classes: int = 4, per_class: int = 3, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per_class, dim, generator=gen, dtype=torch.float64)
    y = torch.arange(classes).repeat_interleave(per_class)
    return x, y


def valid_triplets(labels: torch.Tensor) -> list[Triplet]:
    n = len(labels)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]
    ]


def distances(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Pairwise distance matrix on normalised rows (cosine: 1 - similarity, same ordering/gaps)."""
    xn = F.normalize(x, dim=1)
    if kind == "euclidean":
        return torch.cdist(xn, xn)
    return 1.0 - xn @ xn.T


def brute_force_loss(x: torch.Tensor, labels: torch.Tensor, margin: float, kind: str) -> float:
    """Mean of the strictly positive hinge terms over all valid triplets (AvgNonZeroReducer)."""
    d = distances(x, kind)
    losses = [max(0.0, float(d[a, p] - d[a, q]) + margin) for a, p, q in valid_triplets(labels)]
    positive = [v for v in losses if v > 0]
    return sum(positive) / len(positive) if positive else 0.0


def brute_force_mined(
    x: torch.Tensor, labels: torch.Tensor, margin: float, mining: str, kind: str = "euclidean"
) -> set[Triplet]:
    d = distances(x, kind)
    chosen = set()
    for a, p, q in valid_triplets(labels):
        gap = float(d[a, q] - d[a, p])
        keep = {"semihard": 0 < gap <= margin, "hard": gap <= 0, "all": gap <= margin}[mining]
        if keep:
            chosen.add((a, p, q))
    return chosen


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_mining_matches_brute_force(kind: str, seed: int) -> None:
    x, y = batch(seed)
    loss = LearnerTripletLoss(margin=0.3, mining="all", distance=kind)
    value, count = loss.compute(x, y, None)
    assert value.item() == pytest.approx(brute_force_loss(x, y, 0.3, kind), rel=1e-9, abs=1e-12)
    assert count == len(brute_force_mined(x, y, 0.3, "all", kind))


@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
def test_mining_selects_brute_force_triplets(mining: str) -> None:
    x, y = batch(2, classes=5, per_class=3, dim=6)
    loss = LearnerTripletLoss(margin=0.2, mining=mining)
    a, p, q = loss.mine(x, y)
    got = set(zip(a.tolist(), p.tolist(), q.tolist(), strict=True))
    expected = brute_force_mined(x, y, 0.2, mining)
    assert got == expected
    assert expected, "the batch must contain triplets of this kind for the test to mean anything"


def test_semihard_loss_value_matches_brute_force() -> None:
    x, y = batch(3)
    margin = 0.2
    d = distances(x, "euclidean")
    terms = [float(d[a, p] - d[a, q]) + margin for a, p, q in brute_force_mined(x, y, margin, "semihard")]
    expected = sum(t for t in terms if t > 0) / sum(t > 0 for t in terms)
    assert LearnerTripletLoss(margin, "semihard")(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_slice_is_renormalised_and_other_slices_get_no_gradient() -> None:
    x, y = batch(4, dim=12)
    x.requires_grad_(True)
    loss = LearnerTripletLoss(margin=0.5, mining="all")
    value = loss(x, y, slice(4, 8))
    assert value.item() == pytest.approx(brute_force_loss(x.detach()[:, 4:8], y, 0.5, "euclidean"))
    value.backward()
    assert torch.all(x.grad[:, :4] == 0) and torch.all(x.grad[:, 8:] == 0)
    assert x.grad[:, 4:8].abs().sum() > 0


def test_gce_loss_components() -> None:
    x, y = batch(5, dim=8)
    learner_only = GCELoss(margin=0.3, mining="all")
    total, parts = learner_only(x, y, slice(0, 4))
    assert "full_loss" not in parts
    assert parts["loss"] == pytest.approx(parts["learner_loss"]) == pytest.approx(total.item())
    assert parts["triplets"] == len(brute_force_mined(x[:, :4], y, 0.3, "all"))

    mixed = GCELoss(margin=0.3, mining="all", full_embedding_weight=0.5)
    total, parts = mixed(x, y, slice(0, 4))
    expected_full = brute_force_loss(x, y, 0.3, "euclidean")
    assert parts["full_loss"] == pytest.approx(expected_full)
    assert total.item() == pytest.approx(parts["learner_loss"] + 0.5 * expected_full)
    # Without a slice the learner loss already is the full loss: no second term.
    total, parts = mixed(x, y, None)
    assert "full_loss" not in parts and total.item() == pytest.approx(expected_full)


def test_no_triplet_gives_zero_loss_that_backpropagates() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    total, parts = GCELoss(margin=0.1, mining="semihard")(x, y, None)
    assert total.item() == 0.0 and parts["triplets"] == 0
    total.backward()
    assert torch.all(x.grad == 0)


def test_duplicate_images_give_finite_gradients() -> None:
    # Sampling with replacement puts the same image twice in a batch: d(a, p) = 0 exactly.
    base = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0]])
    x = torch.cat([base, base]).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    value = LearnerTripletLoss(margin=0.5, mining="all")(x, y)
    assert value.item() > 0
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="mining"):
        LearnerTripletLoss(mining="easy-ish")
    with pytest.raises(ValueError, match="distance"):
        LearnerTripletLoss(distance="manhattan")
    with pytest.raises(ValueError, match="full_embedding_weight"):
        GCELoss(full_embedding_weight=-1.0)
