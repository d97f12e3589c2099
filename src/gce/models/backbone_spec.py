"""The backbone registry: one :class:`BackboneSpec` per ``model.backbone`` name.

The torchvision trunks register in :mod:`gce.models.torchvision_backbones`, the timm ones in
:mod:`gce.models.timm_backbones`; :mod:`gce.models.backbones` imports both and builds trunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from gce.config.vocabulary import BACKBONE_NAMES
from gce.models.weight_files import StateFile
from gce.registry import Registry

__all__ = ["BACKBONES", "BackboneSpec", "PretrainedWeights"]


class PretrainedWeights(Protocol):
    """Where a backbone's pretrained weights live and how they are fetched."""

    def cache_path(self) -> Path:
        """The file (or cache folder) the library looks in, present or not."""
        ...

    def is_cached(self) -> bool:
        """Whether the weights are on this machine (no network needed)."""
        ...

    def load(self, allow_download: bool) -> StateFile:
        """The state dict; a missing file (or a failed download) is a one-line GceError saying what to put where."""
        ...


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one trunk.

    ``make_trunk(weights)`` builds the torchvision or timm model, loads ``weights`` into it
    strictly when given (:func:`~gce.models.weight_files.load_strict`) and returns the trunk: images
    ``B x 3 x H x W`` -> feature map ``B x C x h x w``. ``channels`` is the vocabulary's ``C``
    (what the torch-free config checks use); a trunk with an ``out_channels`` attribute (timm's
    ``num_features``) reports its own.
    """

    name: str
    channels: int
    make_trunk: Callable[[StateFile | None], nn.Module]
    pretrained: PretrainedWeights

    def __call__(self, weights: StateFile | None) -> nn.Module:
        return self.make_trunk(weights)


BACKBONES: Registry[BackboneSpec] = Registry("backbone", "model.backbone", BACKBONE_NAMES)
