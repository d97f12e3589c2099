"""Checks of a model's shape values (learner slices, block channels, grouped input), without torch.

One validation path: a :class:`~gce.config.ModelConfig` runs :func:`check_model_config` when it is
made or changed (so :func:`~gce.models.build_model` takes it as valid), and the heads run
:func:`check_head_config` when built directly. Errors are one-line
:class:`~gce.errors.ConfigError` messages naming the key to fix.
"""

from __future__ import annotations

from typing import Protocol

from gce.config.vocabulary import (
    BACKBONE_CHANNELS,
    BACKBONE_NAMES,
    BACKBONE_PATCH,
    BLOCK_KINDS,
    HEADS,
    INPUT_MIXING_MODES,
    POOLING_MODES,
)
from gce.errors import ConfigError

__all__ = ["ModelShape", "check_head_config", "check_image_size", "check_model_config"]


class ModelShape(Protocol):
    """The ``model`` values the checks read (a :class:`~gce.config.ModelConfig` is one)."""

    @property
    def backbone(self) -> str: ...
    @property
    def head(self) -> str: ...
    @property
    def num_learners(self) -> int: ...
    @property
    def embedding_dim(self) -> int: ...
    @property
    def pooling(self) -> str: ...
    @property
    def block_channels(self) -> int | None: ...
    @property
    def input_mixing(self) -> str: ...
    @property
    def block(self) -> str: ...
    @property
    def block_residual(self) -> bool: ...
    @property
    def grouped_trunk_layers(self) -> int: ...
    @property
    def pretrained(self) -> bool: ...
    @property
    def weights(self) -> str | None: ...


def check_head_config(
    in_channels: int,
    num_learners: int,
    embedding_dim: int,
    *,
    pooling: str = "avg+max",
    block_channels: int | None = None,
    input_mixing: str | None = None,
    block: str = "conv3x3",
    block_residual: bool = False,
    prefix: str = "",
) -> None:
    """Raise :class:`ConfigError` for an impossible head configuration.

    ``prefix`` is prepended to key names in messages (``"model."`` when called from the config
    layer), so the user sees the key to fix. ``input_mixing=None`` skips the GCE-only checks.
    """
    k, d = num_learners, embedding_dim
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{prefix}num_learners={k!r} must be a positive integer")
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ConfigError(f"{prefix}embedding_dim={d!r} must be a positive integer")
    if d % k:
        raise ConfigError(f"{prefix}embedding_dim={d} is not divisible by {prefix}num_learners={k}")
    if pooling not in POOLING_MODES:
        raise ConfigError(f"{prefix}pooling={pooling!r} is unknown; valid: {', '.join(POOLING_MODES)}")
    if input_mixing is None:
        return
    if input_mixing not in INPUT_MIXING_MODES:
        raise ConfigError(f"{prefix}input_mixing={input_mixing!r} is unknown; valid: {', '.join(INPUT_MIXING_MODES)}")
    if input_mixing == "grouped" and in_channels % k:
        divisors = [q for q in range(1, min(in_channels, 64) + 1) if in_channels % q == 0]
        raise ConfigError(
            f"{prefix}num_learners={k} does not divide the trunk's {in_channels} channels, which "
            f"{prefix}input_mixing='grouped' splits between the learners; use num_learners in "
            f"{divisors} or input_mixing='shared'"
        )
    if block not in BLOCK_KINDS:
        raise ConfigError(f"{prefix}block={block!r} is unknown; valid: {', '.join(BLOCK_KINDS)}")
    if block_residual:
        if block == "none":
            raise ConfigError(f"{prefix}block_residual=true needs a block; {prefix}block is 'none'")
        if input_mixing != "grouped" or (block_channels is not None and block_channels != in_channels):
            raise ConfigError(
                f"{prefix}block_residual=true adds the trunk features to the block's output, so it needs "
                f"{prefix}input_mixing='grouped' and {prefix}block_channels unset or {in_channels} "
                f"(got {input_mixing!r}, {block_channels})"
            )
    if block_channels is not None:
        if not isinstance(block_channels, int) or isinstance(block_channels, bool) or block_channels < 1:
            raise ConfigError(f"{prefix}block_channels={block_channels!r} must be a positive integer")
        if block_channels % k:
            raise ConfigError(f"{prefix}block_channels={block_channels} is not divisible by {prefix}num_learners={k}")


def check_model_config(model: ModelShape) -> None:
    """Validate all values before anything is built or loaded; errors name the ``model.`` key."""
    backbone, head, gce = model.backbone, model.head, model.head == "gce"
    if backbone not in BACKBONE_CHANNELS:
        raise ConfigError(f"model.backbone={backbone!r} is unknown; valid backbones: {', '.join(BACKBONE_NAMES)}")
    if head not in HEADS:
        raise ConfigError(f"model.head={head!r} is unknown; valid heads: {', '.join(HEADS)}")
    check_head_config(
        BACKBONE_CHANNELS[backbone],
        model.num_learners,
        model.embedding_dim,
        pooling=model.pooling,
        block_channels=model.block_channels if gce else None,
        input_mixing=model.input_mixing if gce else None,
        block=model.block if gce else "conv3x3",
        block_residual=model.block_residual if gce else False,
        prefix="model.",
    )
    if model.grouped_trunk_layers and (not gce or model.input_mixing != "grouped"):
        raise ConfigError(
            f"model.grouped_trunk_layers={model.grouped_trunk_layers} gives each learner its own trunk channels, "
            f"which only model.head='gce' with model.input_mixing='grouped' keeps apart "
            f"(got head={head!r}, input_mixing={model.input_mixing!r})"
        )
    if model.grouped_trunk_layers and backbone in BACKBONE_PATCH:
        raise ConfigError(
            f"model.grouped_trunk_layers={model.grouped_trunk_layers} copies a CNN's last layers; "
            f"model.backbone={backbone} is a vision transformer (use 0)"
        )
    if model.weights is not None and not model.pretrained:
        raise ConfigError(
            f"model.weights={model.weights} is the file the pretrained weights come from, but model.pretrained=false; "
            f"set model.pretrained=true or remove model.weights"
        )


def check_image_size(backbone: str, image_size: int) -> None:
    """A vision transformer's patch tokens tile the image: ``data.image_size`` must be a multiple of the patch."""
    patch = BACKBONE_PATCH.get(backbone)
    if patch is not None and image_size % patch:
        lower = max(patch, image_size // patch * patch)
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of the patch size {patch} of "
            f"model.backbone={backbone}; use {lower} or {lower + patch}"
        )
