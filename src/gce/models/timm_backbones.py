"""timm trunks (the ``timm`` extra): ConvNeXt-T and two ViT-S, as feature maps for the GCE head.

* ``timm/convnext_tiny``: the stem and the four stages (timm's ``forward_features``), 768 channels
  at 1/32 of the image size; the classifier head (pooling, LayerNorm, linear) is dropped.
* ``timm/vit_small_patch16_224``, ``timm/vit_small_patch14_dinov2``: the transformer's output
  tokens after its last LayerNorm, class (and any register) tokens dropped, and the patch tokens
  ``B x N x C`` laid out on their grid ``B x C x H/p x W/p``; the group channel-wise block and the
  heads then run unchanged on that map. The models are built with timm's ``dynamic_img_size``:
  the position embeddings keep the grid the weights were trained on (14 x 14 for ViT-S/16, 37 x 37
  for DINOv2's 518 px) and are interpolated to the input's grid in the forward, so one state dict
  serves every image size (a checkpoint does not depend on ``data.image_size``), which must be a
  multiple of the patch ``p`` (16; 14 for DINOv2).

Channels come from the model (timm's ``num_features``). Pretrained weights are timm's default
tag of each model (``convnext_tiny.in12k_ft_in1k``, ``vit_small_patch16_224.augreg_in21k_ft_in1k``,
``vit_small_patch14_dinov2.lvd142m``), ``model.safetensors`` from the Hugging Face hub, kept in its
cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``); offline, the cache or
``model.weights`` must hold them. timm is imported only when such a trunk is built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gce.config.vocabulary import BACKBONE_CHANNELS
from gce.errors import ConfigError, GceError
from gce.extras import require_extra
from gce.models.backbone_spec import BACKBONES, BackboneSpec
from gce.models.weight_files import StateFile, load_strict, read_state_file

__all__ = ["HUB_FILENAME", "TimmCnnTrunk", "TimmWeights", "ViTTrunk"]

#: The file of a timm model repository on the Hugging Face hub that gce reads.
HUB_FILENAME = "model.safetensors"


def _timm() -> Any:
    require_extra("timm")
    import timm

    return timm


class ViTTrunk(nn.Module):
    """A timm vision transformer as a feature map: patch tokens ``B x N x C`` -> ``B x C x H/p x W/p``."""

    vit: Any  # timm's VisionTransformer (timm is optional: not imported for the annotation)

    def __init__(self, vit: Any, name: str) -> None:
        super().__init__()
        self.vit = vit
        self.name = name
        ph, pw = vit.patch_embed.patch_size
        self.patch = (int(ph), int(pw))
        self.prefix = int(vit.num_prefix_tokens)  # class token (+ register tokens)
        self.out_channels = int(vit.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ph, pw = self.patch
        if h % ph or w % pw:
            raise ConfigError(f"images of {h} x {w} px are not a multiple of the patch size {ph} of {self.name}")
        tokens = self.vit.forward_features(images)[:, self.prefix :]
        # timm flattens the patch grid row by row (NHWC -> N x HW x C), so this restores it.
        return tokens.reshape(b, h // ph, w // pw, -1).permute(0, 3, 1, 2)


class TimmCnnTrunk(nn.Sequential):
    """A timm CNN's feature layers (its ``forward_features``), under the module names of timm's model."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int) -> None:
        super().__init__(layers)
        self.out_channels = out_channels


@dataclass(frozen=True)
class TimmWeights:
    """A timm model's default pretrained weights: ``model.safetensors`` of its Hugging Face repository."""

    name: str  # the gce backbone name
    timm_name: str

    def repo(self) -> str:
        return str(_timm().models.get_pretrained_cfg(self.timm_name).hf_hub_id)

    @staticmethod
    def _cache_dir() -> Path:
        from huggingface_hub import constants  # read at call time: HF_HUB_CACHE may change (tests)

        return Path(constants.HF_HUB_CACHE)

    def cache_path(self) -> Path:
        return self._cache_dir() / f"models--{self.repo().replace('/', '--')}"

    def _cached_file(self) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo(), HUB_FILENAME, cache_dir=self._cache_dir())
        return found if isinstance(found, str) else None

    def is_cached(self) -> bool:
        try:
            return self._cached_file() is not None
        except GceError:  # timm not installed: nothing to load them into either
            return False

    def _missing(self, reason: str) -> str:
        repo = self.repo()
        return (
            f"pretrained weights for {self.name} are not available ({reason}): {HUB_FILENAME} of {repo} is not "
            f"in the Hugging Face cache {self._cache_dir()}; download https://huggingface.co/{repo}/resolve/main/"
            f"{HUB_FILENAME} on a machine with internet and set model.weights: PATH to it (or copy that machine's "
            f"{self.cache_path().name} folder into the cache), or set model.pretrained=false"
        )

    def load(self, allow_download: bool) -> StateFile:
        path = self._cached_file()
        if path is None and not allow_download:
            raise GceError(self._missing("downloads disabled"))
        if path is None:
            import huggingface_hub

            try:  # looked up on the module at call time so tests can replace it
                path = str(huggingface_hub.hf_hub_download(self.repo(), HUB_FILENAME, cache_dir=self._cache_dir()))
            except Exception as exc:  # no network, no such file, a proxy error: one line
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise GceError(self._missing(f"download failed: {type(exc).__name__}: {first.strip()}")) from exc
        return read_state_file(path, f"pretrained weights of {self.name}")


def _create(timm_name: str, **kwargs: Any) -> Any:
    return _timm().create_model(timm_name, pretrained=False, **kwargs)


def _vit_maker(name: str, timm_name: str) -> Callable[[StateFile | None], nn.Module]:
    def make(weights: StateFile | None) -> nn.Module:
        vit = _create(timm_name, dynamic_img_size=True)
        if weights is not None:
            from timm.models.vision_transformer import checkpoint_filter_fn

            # timm's conversion: original DINOv2 / other-resolution checkpoints into this model's keys
            load_strict(vit, StateFile(checkpoint_filter_fn(weights.state, vit), weights.source), name)
        vit.reset_classifier(0)
        return ViTTrunk(vit, name)

    return make


def _make_convnext_tiny(weights: StateFile | None) -> nn.Module:
    model = _create("convnext_tiny")
    if weights is not None:
        from timm.models.convnext import checkpoint_filter_fn

        load_strict(model, StateFile(checkpoint_filter_fn(weights.state, model), weights.source), "timm/convnext_tiny")
    layers = OrderedDict((n, getattr(model, n)) for n in ("stem", "stages", "norm_pre"))
    return TimmCnnTrunk(layers, int(model.num_features))


for _name, _make in (
    ("timm/convnext_tiny", _make_convnext_tiny),
    ("timm/vit_small_patch16_224", _vit_maker("timm/vit_small_patch16_224", "vit_small_patch16_224")),
    ("timm/vit_small_patch14_dinov2", _vit_maker("timm/vit_small_patch14_dinov2", "vit_small_patch14_dinov2")),
):
    _spec = BackboneSpec(_name, BACKBONE_CHANNELS[_name], _make, TimmWeights(_name, _name.removeprefix("timm/")))
    BACKBONES.register(_name)(_spec)
