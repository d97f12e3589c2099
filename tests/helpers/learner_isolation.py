"""Shared check of the group channel-wise head: learner k's loss reaches only learner k's rows."""

from __future__ import annotations

import torch
from torch import nn


def other_rows(rows: slice, length: int) -> torch.Tensor:
    """Boolean mask of the rows outside ``rows``."""
    mask = torch.ones(length, dtype=torch.bool)
    mask[rows] = False
    return mask


def learner_backward(head: nn.Module, k: int, channels: int) -> tuple[dict[str, slice], torch.Tensor]:
    """Backward of a loss on learner ``k``'s slice only; asserts that every parameter row learner
    ``k`` owns gets a gradient and no other row does. Returns the owned rows and the gradient per
    input (trunk) channel."""
    params = dict(head.named_parameters())
    head.zero_grad()
    features = torch.rand(3, channels, 4, 4, requires_grad=True)
    z = head(features)
    out_slice = head.learner_slices()[k]
    # A weighted sum so that the loss is not constant on the unit sphere.
    (z[:, out_slice] * torch.randn_like(z[:, out_slice])).sum().backward()
    owned = head.learner_parameter_slices(k)
    for name, rows in owned.items():
        grad = params[name].grad
        assert torch.count_nonzero(grad[other_rows(rows, grad.shape[0])]) == 0, f"learner {k} leaks into {name}"
        assert torch.count_nonzero(grad[rows]) > 0, f"learner {k} does not train its {name}"
    return owned, features.grad.abs().sum(dim=(0, 2, 3))
