"""Embedding heads: feature map ``B x C x h x w`` -> ensemble embedding ``B x D``.

Both heads split the embedding into ``K = num_learners`` consecutive slices of
``learner_dim = D / K`` dimensions, one per base learner, and L2-normalise each slice. The
concatenated ensemble embedding therefore has norm ``sqrt(K)``; cosine similarity on it is the
mean of the learners' cosine similarities.

- :class:`GroupChannelwiseHead` is the GCE head: a group channel-wise convolution block whose
  channel group ``k`` feeds only learner ``k``.
- :class:`LinearSplitHead` is the Divide-and-Conquer-style ablation: one dense linear layer whose
  output rows are split between the learners. With ``K=1`` it is the single-metric baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gce.config.model_checks import check_head_config
from gce.config.vocabulary import BLOCK_KINDS, INPUT_MIXING_MODES, POOLING_MODES
from gce.errors import ConfigError

__all__ = [
    "BLOCK_KINDS",
    "INPUT_MIXING_MODES",
    "POOLING_MODES",
    "EmbeddingHead",
    "GlobalPool",
    "GroupChannelwiseHead",
    "LinearSplitHead",
    "check_head_config",
]


class GlobalPool(nn.Module):
    """Global pooling ``B x C x h x w -> B x C``: average, max, or their sum (``"avg+max"``).

    Pooling acts on each channel separately, so it never mixes channel groups. The sum of average
    and max pooling is a common DML choice: max pooling keeps small, distinctive parts, average
    pooling keeps the overall appearance.
    """

    def __init__(self, mode: str = "avg+max") -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ConfigError(f"pooling={mode!r} is unknown; valid: {', '.join(POOLING_MODES)}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class EmbeddingHead(nn.Module):
    """Common part of the heads: the learner split and the per-learner normalisation."""

    def __init__(self, in_channels: int, num_learners: int, embedding_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_learners = num_learners
        self.embedding_dim = embedding_dim
        self.learner_dim = embedding_dim // num_learners

    def learner_slices(self) -> list[slice]:
        """Slice of the embedding's last dimension that belongs to each learner, in order."""
        d = self.learner_dim
        return [slice(k * d, (k + 1) * d) for k in range(self.num_learners)]

    def learner_parameter_slices(self, k: int) -> dict[str, slice]:
        """For each head parameter (by name) owned in part by learner ``k``: its rows (dim 0).

        Parameters shared by all learners are left out. Subclasses implement
        :meth:`_owned_parameters`.
        """
        if not 0 <= k < self.num_learners:
            raise IndexError(f"learner {k} out of range for {self.num_learners} learners")
        return {name: _group_rows(p.shape[0], self.num_learners, k) for name, p in self._owned_parameters()}

    def _owned_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters whose dim 0 is split evenly between the learners, in learner order."""
        raise NotImplementedError

    def _normalise_learners(self, z: torch.Tensor) -> torch.Tensor:
        """L2-normalise each learner's ``learner_dim`` slice of ``z`` (``B x D``)."""
        b = z.shape[0]
        z = F.normalize(z.view(b, self.num_learners, self.learner_dim), dim=2)
        return z.reshape(b, self.embedding_dim)


def _group_rows(rows: int, groups: int, k: int) -> slice:
    size = rows // groups
    return slice(k * size, (k + 1) * size)


class GroupChannelwiseHead(EmbeddingHead):
    """The GCE head: a group channel-wise convolution block and per-group embeddings.

    Layout, with ``K = num_learners`` and ``c = block_channels / K``::

        feature map (C channels)
          [input_mixing="shared" only: 1x1 dense conv C -> K*c, no bias]
          -> 3x3 conv, groups=K (block_channels = K*c out) -> BatchNorm -> ReLU
          -> global pooling per channel (avg, max or avg+max)
          -> 1x1 conv, groups=K (block_channels -> D), i.e. a block-diagonal linear layer
          -> K vectors of D/K, each L2-normalised, concatenated to B x D

    Channel group ``k`` of the block (channels ``k*c .. (k+1)*c-1``) and rows
    ``k*D/K .. (k+1)*D/K-1`` of the embedding belong to learner ``k`` alone: no weight of one
    learner ever touches another learner's activations, so a loss on learner ``k``'s slice has an
    exactly zero gradient on the other learners' block and embedding weights.

    ``input_mixing`` decides what each learner sees of the trunk:

    - ``"grouped"`` (default, the reading of the spec "channel group k belongs to learner k and
      never mixes"): the grouped 3x3 conv also splits the *trunk's* channels into K input groups,
      so learner ``k`` sees only trunk channels ``k*C/K .. (k+1)*C/K-1``. The learners are fully
      separate from the trunk output on; the cost is that each one sees 1/K of the pretrained
      features, and ``C`` must be divisible by ``K``.
    - ``"shared"``: a 1x1 dense conv (shared by all learners) first mixes all trunk channels into
      ``block_channels`` channels, which the grouped conv then splits. Every learner sees every
      trunk feature (more capacity per learner, any ``K``), at the price of one shared layer of
      ``C x block_channels`` weights; the groups are still separate from the block on.

    ``block`` chooses the layers of the block (every one grouped, ``groups=K``): ``"conv3x3"``
    (default; above), ``"bottleneck"`` (1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU) or
    ``"none"`` (each learner pools its trunk channels directly into its embedding rows).
    ``block_residual=True`` returns ``ReLU(x + BN(conv(...)))`` instead, ResNet style, with the
    last BN's scale starting at zero (needs the block's output to match the trunk's channels).

    ``block_channels`` defaults to ``C`` (``"grouped"``) or ``C`` rounded up to a multiple of K
    (``"shared"``). The grouped 3x3 conv has ``9 * C * block_channels / K`` weights: lower
    ``block_channels`` for large trunks with small K (resnet50, K=1: 38M weights at the default).

    Initialisation: where each group's 3x3 conv maps as many channels in as out (the defaults),
    it starts as the identity (Dirac kernel), so that with an ImageNet trunk the fresh block
    passes the pretrained features through (in eval mode, ReLU(BN(x)) with BN's initial running
    statistics is ``x`` for the non-negative trunk output) and the embedding is, per learner, a random
    orthogonal projection of the pooled pretrained features -- a useful embedding before any
    training. Otherwise the conv is Kaiming-initialised. Each learner's embedding block is
    initialised with orthonormal rows; BN starts at weight 1, bias 0.
    """

    def __init__(
        self,
        in_channels: int,
        num_learners: int,
        embedding_dim: int,
        block_channels: int | None = None,
        pooling: str = "avg+max",
        input_mixing: str = "grouped",
        block: str = "conv3x3",
        block_residual: bool = False,
    ) -> None:
        check_head_config(
            in_channels,
            num_learners,
            embedding_dim,
            pooling=pooling,
            block_channels=block_channels,
            input_mixing=input_mixing,
            block=block,
            block_residual=block_residual,
        )
        super().__init__(in_channels, num_learners, embedding_dim)
        k = num_learners
        if block_channels is None:
            block_channels = in_channels if input_mixing == "grouped" else -(-in_channels // k) * k
        self.block_channels = block_channels
        self.input_mixing = input_mixing
        self.block_residual = block_residual

        # Shared mixing layer (shared mode only): no bias, the BN after the grouped conv has one.
        self.mix = nn.Conv2d(in_channels, block_channels, 1, bias=False) if input_mixing == "shared" else None
        conv_in = block_channels if self.mix is not None else in_channels
        self.block = _grouped_block(block, conv_in, block_channels, k, final_relu=not block_residual)
        self.pool = GlobalPool(pooling)
        embed_in = block_channels if block != "none" else conv_in
        self.embed = nn.Conv2d(embed_in, embedding_dim, 1, groups=k)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as described in the class docstring."""
        k = self.num_learners
        if self.mix is not None:
            # Linear layer (no activation follows directly): keep the input's variance.
            nn.init.kaiming_normal_(self.mix.weight, mode="fan_in", nonlinearity="linear")
        for layer in self.block:
            if isinstance(layer, nn.Conv2d):
                if layer.in_channels == layer.out_channels and not self.block_residual:
                    nn.init.dirac_(layer.weight, groups=k)
                else:
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.block_residual:
            # ResNet's zero-gamma: the residual branch starts at 0, so the head starts as the
            # identity on the (non-negative) trunk features, as the Dirac-initialised block does.
            last_bn = self.block[-1]
            assert isinstance(last_bn, nn.BatchNorm2d)  # built with final_relu=False: the block ends in its BN
            nn.init.zeros_(last_bn.weight)
        # One orthonormal-row block per learner: a distance-preserving random projection.
        with torch.no_grad():
            for rows in self.embed.weight.view(k, self.learner_dim, -1):
                nn.init.orthogonal_(rows)
        assert self.embed.bias is not None  # nn.Conv2d's default bias=True
        nn.init.zeros_(self.embed.bias)

    def _owned_parameters(self) -> list[tuple[str, torch.Tensor]]:
        # Grouped conv weights are laid out (out_channels, in_channels/groups, kh, kw): the rows of
        # output group k are learner k's. BN's per-channel parameters follow the same rows.
        owned: list[tuple[str, torch.Tensor]] = [(f"block.{name}", p) for name, p in self.block.named_parameters()]
        assert self.embed.bias is not None
        return [*owned, ("embed.weight", self.embed.weight), ("embed.bias", self.embed.bias)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.mix(features) if self.mix is not None else features
        y = self.block(x)
        if self.block_residual:
            y = F.relu(x + y)
        z = self.embed(self.pool(y)[:, :, None, None]).flatten(1)
        return self._normalise_learners(z)


def _grouped_block(kind: str, in_channels: int, out_channels: int, groups: int, final_relu: bool) -> nn.Sequential:
    """The group channel-wise block: every conv has ``groups`` groups, so group k stays learner k's.

    ``conv3x3``: 3x3 conv -> BN -> ReLU (the layout of the original head; its state-dict keys
    ``block.0``/``block.1`` are unchanged). ``bottleneck``: 1x1 conv -> BN -> ReLU -> 3x3 conv ->
    BN -> ReLU, two grouped layers. ``none``: no layer (pool the trunk channels of each group
    directly). ``final_relu=False`` leaves the last ReLU to the residual sum.
    """

    def conv_bn(cin: int, size: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, out_channels, size, padding=size // 2, groups=groups, bias=False)
        return [conv, nn.BatchNorm2d(out_channels)]

    if kind == "none":
        return nn.Sequential()
    if kind == "conv3x3":
        layers = conv_bn(in_channels, 3)
    else:
        layers = [*conv_bn(in_channels, 1), nn.ReLU(inplace=True), *conv_bn(out_channels, 3)]
    if final_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LinearSplitHead(EmbeddingHead):
    """Divide-and-Conquer-style head: pooled ``C`` features -> one dense ``Linear(C, D)`` -> K slices.

    All learners share the trunk and the pooled feature; they differ only in their rows of the
    linear layer (rows ``k*D/K .. (k+1)*D/K-1`` are learner ``k``'s). Each slice is L2-normalised.
    With ``num_learners=1`` this is the single-metric baseline. The weight starts with
    orthonormal rows (``D <= C``) so that the fresh embedding preserves pooled-feature geometry.
    """

    def __init__(self, in_channels: int, num_learners: int, embedding_dim: int, pooling: str = "avg+max") -> None:
        check_head_config(in_channels, num_learners, embedding_dim, pooling=pooling)
        super().__init__(in_channels, num_learners, embedding_dim)
        self.pool = GlobalPool(pooling)
        self.linear = nn.Linear(in_channels, embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal weight, zero bias."""
        nn.init.orthogonal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def _owned_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [("linear.weight", self.linear.weight), ("linear.bias", self.linear.bias)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._normalise_learners(self.linear(self.pool(features)))
