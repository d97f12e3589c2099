"""GroupedConv2d: the per-group matrix-product path computes the framework's grouped convolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gce.models.grouped_conv as grouped_conv
from gce.config import load_config
from gce.errors import ConfigError
from gce.models import build_model
from gce.models.grouped_conv import GroupedConv2d


@pytest.fixture
def gemm_calls(monkeypatch) -> list[int]:
    """Counts the calls of the matrix-product path (so a test knows which path ran)."""
    calls: list[int] = []
    original = grouped_conv.grouped_conv_as_gemm

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(grouped_conv, "grouped_conv_as_gemm", spy)
    return calls


@pytest.mark.parametrize(("groups", "kernel", "padding", "bias", "shape"), [
    (4, 3, 1, False, (3, 64, 7, 7)),   # the GCE block: 3x3, "same" padding
    (8, 3, 1, True, (2, 64, 5, 6)),    # non-square map, bias
    (4, 1, 0, True, (5, 64, 1, 1)),    # the embedding layer: 1x1 on pooled features
    (2, 3, 0, False, (2, 64, 6, 5)),   # no padding: the output shrinks
    (4, 1, 0, False, (2, 64, 4, 4)),   # the bottleneck's 1x1 on a map
])
def test_gemm_path_equals_the_grouped_convolution_values_and_gradients(groups, kernel, padding, bias, shape,
                                                                       gemm_calls):
    torch.manual_seed(0)
    conv = GroupedConv2d(64, 32, kernel, padding=padding, groups=groups, bias=bias, impl="gemm")
    x = torch.randn(*shape, requires_grad=True)
    out = conv(x)
    assert gemm_calls == [1]
    reference = F.conv2d(x, conv.weight, conv.bias, padding=padding, groups=groups)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, conv.weight], upstream)
    expected = torch.autograd.grad(reference, [x, conv.weight], upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_auto_takes_the_gemm_path_on_cuda_only(gemm_calls):
    conv = GroupedConv2d(8, 8, 3, padding=1, groups=2)
    assert conv.impl == "auto"
    assert conv.uses_gemm(torch.device("cuda", 0)) and not conv.uses_gemm(torch.device("cpu"))
    conv(torch.randn(1, 8, 4, 4))
    assert gemm_calls == []  # CPU: the framework's own kernel
    conv.impl = "conv"
    assert not conv.uses_gemm(torch.device("cuda", 0))


def test_tracing_records_the_framework_convolution(gemm_calls):
    """Exports (TorchScript trace, ONNX) keep one conv node, whatever the impl."""
    conv = GroupedConv2d(8, 8, 3, padding=1, groups=2, impl="gemm").eval()
    x = torch.randn(1, 8, 4, 4)
    traced = torch.jit.trace(conv, x)
    assert "aten::_convolution" in str(traced.graph) and "einsum" not in str(traced.graph)
    torch.testing.assert_close(traced(x), F.conv2d(x, conv.weight, conv.bias, padding=1, groups=2))


def test_models_with_either_impl_share_weights_and_embeddings():
    conv_model = build_model("resnet18", "gce", 4, 32, pretrained=False, freeze_bn=True, group_conv="conv").eval()
    gemm_model = build_model("resnet18", "gce", 4, 32, pretrained=False, freeze_bn=True, group_conv="gemm").eval()
    gemm_model.load_state_dict(conv_model.state_dict())  # same keys and shapes
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gemm_model(images), conv_model(images), atol=1e-5, rtol=1e-4)


def test_bad_impl_is_refused():
    with pytest.raises(ValueError, match="impl='fast'"):
        GroupedConv2d(8, 8, 3, groups=2, impl="fast")
    config = Path(__file__).resolve().parents[1] / "configs" / "emoji.yaml"
    assert load_config(config, ["model.group_conv=gemm"]).model.group_conv == "gemm"
    with pytest.raises(ConfigError, match="group_conv"):
        load_config(config, ["model.group_conv=fast"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemm_path_on_the_gpu_equals_cudnn_in_fp32_and_stays_close_in_bf16(gemm_calls):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        conv = GroupedConv2d(256, 256, 3, padding=1, groups=4, bias=False).cuda()
        x = torch.randn(8, 256, 7, 7, device="cuda", requires_grad=True)
        out = conv(x)
        assert gemm_calls == [1]  # auto on CUDA
        reference = F.conv2d(x, conv.weight, None, padding=1, groups=4)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
        upstream = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, [x, conv.weight], upstream),
                             torch.autograd.grad(reference, [x, conv.weight], upstream)):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = conv(x)
        assert low.dtype == torch.bfloat16
        assert (low.float() - reference).norm() / reference.norm() < 1e-2
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
