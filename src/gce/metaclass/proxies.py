"""Class proxies: one unit vector per training class, summarising where that class sits.

A class proxy is the L2-normalised mean of the class's (normalised) embeddings. GCE clusters these
proxies to form meta-classes (see :mod:`gce.metaclass.strategies`).

Two ways to obtain them:

* :func:`class_proxies` -- exact, from the embeddings of an un-augmented pass over the training
  set (the default reading of the method).
* :class:`ProxyEMA` -- an exponential moving average updated from the training batches, which costs
  nothing extra but lags behind the model and sees augmented images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["class_proxies", "ProxyEMA"]


def _check_inputs(embeddings: Tensor, labels: Tensor, num_classes: int) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be N x D, got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got range "
            f"{int(labels.min())}..{int(labels.max())}"
        )


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


class ProxyEMA(nn.Module):
    r"""Class proxies kept as an exponential moving average of batch class means.

    For every class ``c`` present in a batch, with ``m`` the batch mean of its normalised
    embeddings: ``state_c <- momentum * state_c + (1 - momentum) * m``. The first time a class is
    seen its state is set to ``m`` directly, so the average is not biased towards the zero start.

    It is an ``nn.Module`` with buffers so that ``state_dict()`` puts it in a checkpoint and
    ``.to(device)`` moves it; it has no parameters and never receives gradients.

    Args:
        num_classes: ``C``.
        dim: embedding size ``D``.
        momentum: weight of the old value, in ``[0, 1)``.
    """

    state: Tensor
    seen: Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = momentum
        self.register_buffer("state", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Fold one batch into the running proxies (no gradient flows back to the model)."""
        embeddings = embeddings.detach().to(self.state.dtype)
        labels = torch.as_tensor(labels, device=self.state.device).long()
        embeddings = embeddings.to(self.state.device)
        _check_inputs(embeddings, labels, self.num_classes)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of size {self.dim}, got {embeddings.shape[1]}")
        sums, counts = _class_sums(F.normalize(embeddings, dim=1), labels, self.num_classes)
        present = counts > 0
        means = sums[present] / counts[present, None]
        first = ~self.seen[present]
        # Classes seen for the first time take the batch mean as is (no zero-start bias).
        momentum = torch.where(first, 0.0, self.momentum).to(means.dtype)[:, None]
        self.state[present] = momentum * self.state[present] + (1.0 - momentum) * means
        self.seen[present] = True

    @property
    def proxies(self) -> Tensor:
        """``C x D`` normalised proxies; classes never seen are the zero vector."""
        return F.normalize(self.state, dim=1)
