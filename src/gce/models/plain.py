"""Untrained reference embedders for ``gce eval``: a pretrained trunk, or raw pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.backbones import build_trunk


class PooledTrunk(nn.Module):
    """A torchvision trunk with global average pooling and L2 normalisation (no training)."""

    def __init__(self, backbone: str, pretrained: bool = True) -> None:
        super().__init__()
        self.trunk, self.embedding_dim = build_trunk(backbone, pretrained=pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images).mean(dim=(2, 3))
        return F.normalize(features, dim=1)


class RawPixels(nn.Module):
    """The flattened image, centred per image and L2-normalised: cosine similarity of these is the
    Pearson correlation of two images' pixels, the floor any learned embedding must beat."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return F.normalize(flat - flat.mean(dim=1, keepdim=True), dim=1)
