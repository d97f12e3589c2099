"""Class proxies: one unit vector per training class, summarising where that class sits.

A class proxy is the L2-normalised mean of the class's (normalised) embeddings. GCE clusters these
proxies to form meta-classes (see :mod:`gce.metaclass.strategies`).

:func:`class_proxies` computes them exactly, from the embeddings of an un-augmented pass over the
training set. (An exponential moving average kept during training would save that pass but lag
behind the model and see augmented images; it was never wired in nor measured, so it is not here.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_proxies"]


def _check_inputs(embeddings: Tensor, labels: Tensor, num_classes: int) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be N x D, got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range {int(labels.min())}..{int(labels.max())}")


def _class_sums(embeddings: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums (C x D) and counts (C,) with ``index_add_``: one pass, no loop over classes."""
    sums = embeddings.new_zeros((num_classes, embeddings.shape[1]))
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).to(embeddings.dtype)
    return sums, counts


def class_proxies(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    r"""Normalised per-class mean of ``embeddings``.

    .. math:: p_c = \frac{\mu_c}{\lVert \mu_c \rVert_2}, \qquad
              \mu_c = \frac{1}{|I_c|} \sum_{i \in I_c} \frac{x_i}{\lVert x_i \rVert_2}

    Each embedding is normalised first so that every image votes with the same weight whatever its
    norm (the model already outputs normalised slices; this keeps the function correct for raw
    features too). A class without any sample gets the zero vector: it has no images, so whichever
    learner it is later assigned to receives no data from it.

    Args:
        embeddings: ``N x D`` float tensor.
        labels: ``N`` integer tensor with values in ``0..num_classes-1``.
        num_classes: ``C``.

    Returns:
        ``C x D`` tensor on the device and dtype of ``embeddings``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
        >>> class_proxies(x, torch.tensor([0, 1, 1]), 2)
        tensor([[1., 0.],
                [0., 1.]])
    """
    labels = torch.as_tensor(labels, device=embeddings.device).long()
    _check_inputs(embeddings, labels, num_classes)
    sums, _ = _class_sums(F.normalize(embeddings, dim=1), labels, num_classes)
    # Normalising the sum equals normalising the mean; empty classes stay exactly zero.
    return F.normalize(sums, dim=1)
