"""A grouped convolution that can run as K matrix products instead of cuDNN's grouped kernels.

The GCE block's 3x3 convolution has ``groups=K`` on the trunk's last feature map (ResNet-50 at
224 px: 2048 channels at 7 x 7). On an H200 cuDNN ran it at about 25-30 TFLOP/s in fp32 and bf16
(``benchmarks/gpu_check.sh``: the GCE step 1.16-1.26x the single head's time where its FLOPs are
1.06-1.11x), far below the GPU's matrix rate. Written as im2col (``F.unfold``) and one matrix
product per group (``torch.einsum``, i.e. cuBLAS batched GEMM), the same arithmetic runs on the
matrix units. ``benchmarks/group_conv_impl.py`` measures both.

:class:`GroupedConv2d` is an ``nn.Conv2d`` (same parameters, state-dict keys, initialisation and
export) whose ``impl`` picks the computation: ``"conv"`` (``nn.Conv2d``'s own), ``"gemm"``
(unfold + per-group matrix products) or ``"auto"`` (see :data:`AUTO_GEMM_DEVICES`). Both give the
same result up to float rounding (tested against each other, values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AUTO_GEMM_DEVICES", "GROUPED_CONV_IMPLS", "GroupedConv2d", "grouped_conv_as_gemm"]

GROUPED_CONV_IMPLS = ("auto", "conv", "gemm")
# Devices on which impl="auto" takes the matrix-product path: where it was measured faster.
AUTO_GEMM_DEVICES: frozenset[str] = frozenset({"cuda"})


def grouped_conv_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         padding: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding, groups=groups)`` as im2col and one
    matrix product per group (any kernel size, stride 1, dilation 1, zero padding)."""
    b, _, h, w = x.shape
    out_channels, in_per_group, kh, kw = weight.shape
    h_out, w_out = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    if kh == kw == 1 and padding == (0, 0):
        cols = x.reshape(b, groups, in_per_group, h * w)
    else:  # (b, C*kh*kw, L): rows ordered (channel, kernel row, kernel column), as the weight's
        cols = F.unfold(x, (kh, kw), padding=padding).view(b, groups, in_per_group * kh * kw, h_out * w_out)
    kernels = weight.reshape(groups, out_channels // groups, in_per_group * kh * kw)
    out = torch.einsum("goi,bgil->bgol", kernels, cols).reshape(b, out_channels, h_out, w_out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups > 1``, stride 1, dilation 1 and zero padding, computed by ``impl``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0, groups: int = 1,
                 bias: bool = True, impl: str = "auto") -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=bias)
        if impl not in GROUPED_CONV_IMPLS:
            raise ValueError(f"impl={impl!r}: expected one of {', '.join(GROUPED_CONV_IMPLS)}")
        self.impl = impl

    def uses_gemm(self, device: torch.device) -> bool:
        return self.impl == "gemm" or (self.impl == "auto" and device.type in AUTO_GEMM_DEVICES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_gemm(x.device) and not torch.jit.is_scripting() and not torch.jit.is_tracing() \
                and not torch.onnx.is_in_onnx_export():
            return grouped_conv_as_gemm(x, self.weight, self.bias, self.padding, self.groups)  # type: ignore[arg-type]
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"
