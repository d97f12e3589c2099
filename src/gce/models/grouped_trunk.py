"""A trunk whose last layers are owned by the learners: the group channel-wise idea given depth.

:class:`GroupedTrunk` keeps the first layers of a pretrained trunk shared and gives each of the
K learners its own copy of the last ``layers`` layers, initialised from the same (ImageNet)
weights. Learner ``k``'s copy produces output channel group ``k`` (channels
``k*C/K .. (k+1)*C/K-1``) of the usual ``C``-channel feature map, which the GCE head with
``input_mixing="grouped"`` hands to learner ``k`` alone. So:

* at initialisation the grouped trunk computes exactly what the plain trunk computes (every copy
  holds the same weights, and group ``k`` of the output is what the plain trunk's last layer
  gives for those channels);
* from then on, a loss on learner ``k``'s embedding reaches only copy ``k`` and the shared layers:
  the copies of the other learners get an exactly zero gradient, and they drift apart as each is
  trained on its own meta-class.

The copied layers are the trunk's top-level layers counted from the end, except that a last
``nn.Sequential`` is opened first: MobileNetV2's ``features`` (19 layers: ``layers=2`` is the last
inverted-residual block 160->320 plus the 1x1 conv 320->1280), ResNet's ``layer4`` (its 2-3
bottleneck blocks; ``layers=1`` is the last bottleneck block). Where the last copied layer is a
plain ``conv -> BN -> activation`` (MobileNetV2's 1x1 conv), each copy keeps only its own
``C/K`` output channels (the rows of the pretrained weights); otherwise each copy computes all
``C`` channels and keeps its group (extra compute, same result).

``layers=1`` on MobileNetV2 gives the learners the last 1x1 conv only: its output channels are
independent of each other already, so this computes and trains exactly like the plain trunk
followed by the grouped head (only the parameter layout differs). Depth starts at ``layers=2``.
"""

from __future__ import annotations

import copy
from typing import TypeGuard, cast

import torch
from torch import nn

from gce.errors import ConfigError

__all__ = ["GroupedTrunk", "trunk_layers"]


def trunk_layers(trunk: nn.Module) -> list[nn.Module]:
    """The trunk as a flat list of layers that run one after the other (see the module doc)."""
    layers = list(trunk.children())
    while layers and type(layers[-1]) is nn.Sequential and len(layers[-1]) > 1:
        layers = layers[:-1] + list(layers[-1].children())
    return layers


def _is_conv_bn_act(layer: nn.Module) -> TypeGuard[nn.Sequential]:
    children = list(layer.children())
    return (
        isinstance(layer, nn.Sequential)
        and len(children) == 3
        and isinstance(children[0], nn.Conv2d)
        and children[0].groups == 1
        and isinstance(children[1], nn.BatchNorm2d)
        and not list(children[2].parameters())
    )


def _keep_output_channels(layer: nn.Sequential, rows: slice) -> nn.Sequential:
    """A ``conv -> BN -> act`` layer reduced to output channels ``rows``, weights and statistics kept."""
    conv, bn, act = layer.children()
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)  # checked by _is_conv_bn_act
    keep = range(conv.out_channels)[rows]
    # torch annotates a conv's geometry as tuple[int, ...]; a Conv2d's are the pairs its constructor takes.
    kernel_size, stride, dilation = (cast("tuple[int, int]", v) for v in (conv.kernel_size, conv.stride, conv.dilation))
    padding = cast("str | tuple[int, int]", conv.padding)
    new_conv = nn.Conv2d(
        conv.in_channels, len(keep), kernel_size, stride, padding, dilation, bias=conv.bias is not None
    )
    new_bn = nn.BatchNorm2d(
        len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    with torch.no_grad():
        _copy_rows(new_conv.weight, conv.weight, rows)
        _copy_rows(new_conv.bias, conv.bias, rows)  # both absent without a bias
        _copy_rows(new_bn.weight, bn.weight, rows)  # both absent unless affine
        _copy_rows(new_bn.bias, bn.bias, rows)
        _copy_rows(new_bn.running_mean, bn.running_mean, rows)  # both absent unless track_running_stats
        _copy_rows(new_bn.running_var, bn.running_var, rows)
        _copy_rows(new_bn.num_batches_tracked, bn.num_batches_tracked, None)
    return nn.Sequential(new_conv, new_bn, copy.deepcopy(act))


def _copy_rows(dst: torch.Tensor | None, src: torch.Tensor | None, rows: slice | None) -> None:
    """``dst <- src[rows]`` (all of ``src`` for ``rows=None``); nothing when the layers have no such tensor."""
    if dst is None or src is None:
        assert dst is None and src is None, "layers built with the same options have the same tensors"
        return
    dst.copy_(src if rows is None else src[rows])


class _SelectChannels(nn.Module):
    """Keep channels ``start .. stop-1`` of a feature map."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start : self.stop]

    def extra_repr(self) -> str:
        return f"channels {self.start}..{self.stop - 1}"


class GroupedTrunk(nn.Module):
    """Shared first layers, then one copy of the last ``layers`` layers per learner.

    Output: the ``C``-channel feature map of the plain trunk, channel group ``k`` computed by
    learner ``k``'s copy (``branches[k]``). See the module docstring.
    """

    def __init__(self, trunk: nn.Module, out_channels: int, num_learners: int, layers: int) -> None:
        super().__init__()
        all_layers = trunk_layers(trunk)
        if not 1 <= layers < len(all_layers):
            raise ConfigError(
                f"model.grouped_trunk_layers={layers} must be between 1 and {len(all_layers) - 1} "
                f"for this backbone (it has {len(all_layers)} layers)"
            )
        if out_channels % num_learners:
            raise ConfigError(
                f"model.num_learners={num_learners} does not divide the trunk's {out_channels} channels, "
                f"which model.grouped_trunk_layers splits between the learners"
            )
        self.num_learners = num_learners
        self.layers = layers
        self.shared = nn.Sequential(*all_layers[:-layers])
        tail = all_layers[-layers:]
        width = out_channels // num_learners
        branches = []
        for k in range(num_learners):
            rows = slice(k * width, (k + 1) * width)
            own = [copy.deepcopy(layer) for layer in tail]
            if _is_conv_bn_act(own[-1]):
                own[-1] = _keep_output_channels(own[-1], rows)
            else:
                own.append(_SelectChannels(rows.start, rows.stop))
            branches.append(nn.Sequential(*own))
        self.branches = nn.ModuleList(branches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shared = self.shared(images)
        return torch.cat([branch(shared) for branch in self.branches], dim=1)
