"""BatchNorm over the global batch, so that N processes normalise exactly like one.

A BatchNorm layer in training mode normalises with the statistics of its batch. Under N processes
each holds 1/N of the global batch, so plain BatchNorm would normalise with other statistics than a
single process. The GCE head's BatchNorm always trains (the trunk's is frozen by default), so under
N processes it is always synchronised; the trunk's trainable BatchNorm layers
(``model.freeze_bn: false``) are synchronised when ``train.sync_bn: true``.

On CUDA this is torch's :class:`torch.nn.SyncBatchNorm`. torch's version runs on GPUs only, so on
CPU (gloo) :class:`GlobalBatchNorm` does the same: per-channel sums of all ranks (a differentiable
all-reduce, two passes: the mean, then the centred squares), normalisation with the global mean
and biased variance, running statistics updated with the unbiased global variance. Frozen layers
(eval mode, running statistics) are left alone. Parameters and buffers keep their objects and
names, so optimisers and checkpoints are unaffected.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gce.distributed.collectives import all_reduce_with_grad
from gce.models.backbones import is_frozen_batchnorm

__all__ = ["GlobalBatchNorm", "synchronise_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch of all ranks (gloo/CPU)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        # float64 sums: the single-process kernel accumulates in double on CPU as well.
        x = input.double()
        local = torch.cat([x.sum(dims), x.new_tensor([input.numel() // input.shape[1]])])
        summed = all_reduce_with_grad(local)
        count = summed[-1].detach()
        mean = summed[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        out = out.to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in torch's BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        assert self.running_mean is not None and self.running_var is not None  # called with track_running_stats
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _global_copy(bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameter objects
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> int:
    """Replace, in place, every trainable BatchNorm layer under ``module`` by its synchronised
    version (:class:`torch.nn.SyncBatchNorm` on CUDA, :class:`GlobalBatchNorm` elsewhere).

    Frozen layers (:func:`gce.models.backbones.freeze_batchnorm`) are kept. Returns the number of
    layers replaced.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.SyncBatchNorm, GlobalBatchNorm)) or (
            isinstance(child, nn.modules.batchnorm._BatchNorm) and is_frozen_batchnorm(child)
        ):
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if device.type == "cuda":
                new: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                new = _global_copy(child)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += synchronise_batchnorm(child, device)
    return replaced
