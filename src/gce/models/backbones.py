"""Backbone trunks and the one backbone registry (:data:`BACKBONES`, names in ``gce.config.vocabulary``).

Every trunk maps an ImageNet-normalised batch ``B x 3 x H x W`` to a feature map ``B x C x h x w``;
the head (see :mod:`gce.models.heads`) does the pooling.

* torchvision CNNs (``resnet18``, ``resnet50``, ``googlenet``, ``mobilenet_v2``):
  :mod:`gce.models.torchvision_backbones`, ImageNet weights from the torch hub cache;
* timm models (``timm/convnext_tiny``, ``timm/vit_small_patch16_224``,
  ``timm/vit_small_patch14_dinov2``; the ``timm`` extra): :mod:`gce.models.timm_backbones`,
  weights from the Hugging Face hub cache; a ViT's patch tokens become the feature map's grid.

Pretrained weights come from those caches (downloaded when missing and allowed), or from a local
state-dict file (``model.weights``). Either way they are loaded strictly, and a missing file is a
one-line :class:`~gce.errors.GceError` saying which file to put where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

# Registration order is the vocabulary's (the order error messages list names in): torchvision first.
from gce.models import torchvision_backbones as _torchvision_backbones  # registers the torchvision names

# isort: split
from gce.models import timm_backbones as _timm_backbones  # registers the timm/ names
from gce.models.backbone_spec import BACKBONES, BackboneSpec
from gce.models.torchvision_backbones import GoogLeNetInputTransform
from gce.models.weight_files import read_state_file

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

del _timm_backbones, _torchvision_backbones  # imported for their registrations only


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_trunk`."""
    return list(BACKBONES)


def weights_cache_path(name: str) -> Path:
    """Where the library looks for backbone ``name``'s pretrained weights (whether or not present):
    the torch hub cache file for torchvision, the Hugging Face cache folder for timm."""
    return BACKBONES[name].pretrained.cache_path()


def build_trunk(
    name: str, pretrained: bool, allow_download: bool = True, weights: str | None = None
) -> tuple[nn.Module, int]:
    """Build backbone ``name`` without pooling/classifier; return ``(trunk, output_channels)``.

    With ``pretrained=True`` the weights come from the file ``weights`` when given (``model.weights``:
    a torchvision or timm state dict, ``.pth``/``.pt``/``.safetensors``), else from the library's
    cache (torchvision: ``IMAGENET1K_V1`` in the torch hub cache; timm: the model's default tag in
    the Hugging Face cache), downloaded if missing unless ``allow_download`` is false. A missing file,
    a failed download or keys that do not fit raise a one-line :class:`GceError`. Unknown names raise
    :class:`ConfigError` listing the valid ones. ``weights`` is ignored when ``pretrained`` is false
    (a checkpoint's weights follow). The channels are the trunk's own (timm's ``num_features``).
    """
    spec = BACKBONES[name]
    state = None
    if pretrained:
        state = read_state_file(weights, "model.weights") if weights else spec.pretrained.load(allow_download)
    trunk = spec(state)
    return trunk, int(getattr(trunk, "out_channels", spec.channels))


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
