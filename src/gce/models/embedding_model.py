"""The embedding model: backbone trunk + embedding head, and its builder from config values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gce.config.vocabulary import HEADS
from gce.models.backbones import build_trunk, freeze_batchnorm, is_frozen_batchnorm
from gce.models.grouped_trunk import GroupedTrunk
from gce.models.heads import EmbeddingHead, GroupChannelwiseHead, LinearSplitHead
from gce.registry import Registry

if TYPE_CHECKING:
    from gce.config import ModelConfig

__all__ = ["HEADS", "EmbeddingModel", "build_model"]


class EmbeddingModel(nn.Module):
    """``images (B x 3 x H x W, ImageNet-normalised) -> embedding (B x D)``.

    The embedding is the concatenation of ``num_learners`` unit vectors of ``learner_dim``
    dimensions (see :meth:`learner_slices`). A checkpoint rebuilds the same architecture from the
    model section of the run's config (:func:`build_model`).

    Layers frozen with :func:`~gce.models.backbones.freeze_batchnorm` stay in eval mode through
    :meth:`train`.
    """

    def __init__(self, trunk: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    @property
    def num_learners(self) -> int:
        return self.head.num_learners

    @property
    def learner_dim(self) -> int:
        return self.head.learner_dim

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    def learner_slices(self) -> list[slice]:
        """Slice of the embedding that belongs to each learner, in order."""
        return self.head.learner_slices()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Set train/eval mode, keeping frozen BatchNorm layers in eval mode."""
        super().train(mode)
        for m in self.modules():
            if is_frozen_batchnorm(m):
                m.eval()
        return self

    def learner_parameter_slices(self, k: int) -> dict[str, slice]:
        """Names (as in ``named_parameters()``) of the head parameters learner ``k`` owns a part
        of, each with the rows (dim 0) that are learner ``k``'s.

        Parameters shared by all learners (the shared trunk; the ``"shared"`` mixing conv) are not
        listed; with a :class:`GroupedTrunk`, learner ``k``'s copy of the trunk's last layers is
        listed whole. Use it to look at one learner's gradients: ``param.grad[rows]``.
        """
        owned = {f"head.{name}": rows for name, rows in self.head.learner_parameter_slices(k).items()}
        if isinstance(self.trunk, GroupedTrunk):
            branch = self.trunk.branches[k]
            owned.update({f"trunk.branches.{k}.{name}": slice(None) for name, _ in branch.named_parameters()})
        return owned

    def learner_parameters(self, k: int) -> dict[str, torch.Tensor]:
        """The head parameters that belong to learner ``k``: detached views of their rows.

        The views share storage with the parameters (they see later updates) but carry no
        gradient; see :meth:`learner_parameter_slices` for gradients.
        """
        params = dict(self.named_parameters())
        return {name: params[name].detach()[rows] for name, rows in self.learner_parameter_slices(k).items()}

    def param_groups(self, backbone_lr: float, head_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: trunk at ``backbone_lr``, head at ``head_lr``.

        Only parameters that require gradients are included (frozen BatchNorm ones do not), and
        an empty group is left out. Each group has a ``"name"`` ("backbone" or "head") for logging.
        """
        groups = []
        for name, module, lr in (("backbone", self.trunk, backbone_lr), ("head", self.head, head_lr)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
        return groups


def build_model(model: ModelConfig, *, pretrained: bool | None = None, allow_download: bool = True) -> EmbeddingModel:
    """The :class:`EmbeddingModel` that a config's ``model`` section describes; every caller builds models here.

    ``model`` was validated when it was made (:func:`~gce.config.model_checks.check_model_config`:
    one-line :class:`~gce.errors.ConfigError` naming the key, e.g.
    ``model.embedding_dim=100 is not divisible by model.num_learners=3``), so nothing is checked
    twice. ``pretrained`` overrides ``model.pretrained`` (``False`` when checkpoint weights follow);
    pretrained weights come from ``model.weights`` when set, else the torchvision/timm cache; a missing
    file raises :class:`~gce.errors.GceError` (see :func:`~gce.models.backbones.build_trunk`). The
    ``linear_split`` head ignores the GCE block's values (``block_channels``, ``input_mixing``, ``block``,
    ``block_residual``). With
    ``grouped_trunk_layers > 0`` each learner owns a copy of the trunk's last layers
    (:class:`~gce.models.grouped_trunk.GroupedTrunk`). ``freeze_bn`` freezes the trunk's BatchNorm
    layers only: the head's BatchNorm is new and must learn.
    """
    use_pretrained = model.pretrained if pretrained is None else pretrained
    trunk, channels = build_trunk(model.backbone, use_pretrained, allow_download=allow_download, weights=model.weights)
    if model.grouped_trunk_layers:
        trunk = GroupedTrunk(trunk, channels, model.num_learners, model.grouped_trunk_layers)
    if model.freeze_bn:
        freeze_batchnorm(trunk)
    shape = HeadShape(
        channels,
        model.num_learners,
        model.embedding_dim,
        model.pooling,
        model.block_channels,
        model.input_mixing,
        model.block,
        model.block_residual,
    )
    return EmbeddingModel(trunk, HEAD_REGISTRY[model.head](shape))


@dataclass(frozen=True)
class HeadShape:
    """What a head is built from: the trunk's channels and the ``model.*`` head values."""

    in_channels: int
    num_learners: int
    embedding_dim: int
    pooling: str
    block_channels: int | None
    input_mixing: str
    block: str
    block_residual: bool


HEAD_REGISTRY: Registry[Callable[[HeadShape], EmbeddingHead]] = Registry("head", "model.head", HEADS)


@HEAD_REGISTRY.register("gce")
def _group_channelwise(s: HeadShape) -> EmbeddingHead:
    return GroupChannelwiseHead(
        s.in_channels,
        s.num_learners,
        s.embedding_dim,
        s.block_channels,
        pooling=s.pooling,
        input_mixing=s.input_mixing,
        block=s.block,
        block_residual=s.block_residual,
    )


@HEAD_REGISTRY.register("linear_split")
def _linear_split(s: HeadShape) -> EmbeddingHead:
    return LinearSplitHead(s.in_channels, s.num_learners, s.embedding_dim, pooling=s.pooling)
