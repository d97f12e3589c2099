"""CUDA paths (skipped without a GPU; benchmarks/gpu_check.sh runs them on a GPU machine).

Every tensor of a step stays on the GPU, results agree with the CPU, bf16 autocast leaves the loss
in fp32, and the embedding pass of a sharded/single extraction matches the CPU one.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from gce.distributed import SINGLE, DistContext
from gce.distributed.sharding import extract_embeddings_sharded
from gce.losses import GCELoss
from gce.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False,
                       freeze_bn=True)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 4


def test_forward_and_loss_on_gpu_match_cpu():
    images, labels = _batch()
    model = _model()
    loss_fn = GCELoss(margin=0.3, mining="all")
    cpu_loss, _ = loss_fn(model(images), labels, slice(0, 8))
    gpu_model = model.cuda()
    gpu_out = gpu_model(images.cuda())
    assert gpu_out.is_cuda
    gpu_loss, _ = loss_fn(gpu_out, labels.cuda(), slice(0, 8))
    assert gpu_loss.is_cuda
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_forward_keeps_the_loss_in_fp32():
    images, labels = _batch()
    model = _model().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda())
    loss, parts = GCELoss(margin=0.3, mining="all")(out.float(), labels.cuda(), slice(0, 8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_extraction_on_gpu_matches_cpu():
    images, labels = _batch()
    dataset = TensorDataset(images, labels)
    cpu, cpu_labels = extract_embeddings_sharded(_model(), dataset, SINGLE, batch_size=5, progress=False)
    ctx = DistContext(device=torch.device("cuda", 0))
    gpu, gpu_labels = extract_embeddings_sharded(_model().cuda(), dataset, ctx, batch_size=5, progress=False)
    assert not gpu.is_cuda  # results come back on the CPU, where metrics are computed
    assert torch.equal(gpu_labels, cpu_labels)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
