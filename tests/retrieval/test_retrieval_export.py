"""gce export: ONNX and TorchScript files that embed real images like PyTorch does (to float rounding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gce.cli import main
from gce.data import load_folder
from gce.data.images import load_rgb
from gce.errors import GceError
from gce.retrieval import Embedder
from gce.retrieval.export import export_model, load_exported, read_export_metadata
from helpers.numerics import RESNET18_GCE_DEPTH, RESNET18_LONGEST_SUM, reordered
from helpers.retrieval_fixtures import make_checkpoint

# resnet18 + GCE head embeddings, unit vectors per learner: an entry moves by at most the chain's
# reordering bound (22 layers, sums of <= 4608 terms: 1.8e-4) under another runtime's kernels.
EMBED_ATOL = reordered(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    # resnet18: the smallest graph to export (MobileNetV2's takes ~3x longer through the dynamo exporter)
    return Embedder.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", backbone="resnet18"))


@pytest.fixture(scope="module")
def real_images(embedder, shape_folder):
    records = load_folder(shape_folder, test_fraction=0.5).test
    return torch.stack([embedder.transform(load_rgb(p)) for p in records.paths[:6]])


@pytest.fixture(scope="module")
def onnx_file(embedder, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_model(embedder, path, "onnx")
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_matches_pytorch_on_real_images(fmt, embedder, real_images, onnx_file, tmp_path):
    if fmt == "onnx":
        path = onnx_file
    else:
        path = tmp_path / "model.ts"
        export_model(embedder, path, "torchscript")
    run = load_exported(path)
    reference = embedder.embed_tensors(real_images)
    for batch in (real_images, real_images[:1], real_images[:5]):  # the batch size is dynamic
        out = run(batch.numpy())
        assert out.shape == (len(batch), embedder.embedding_dim)
        # Another runtime's kernels (onnxruntime, TorchScript), other sum orders: rounding of unit vectors.
        assert np.abs(out - reference[: len(batch)]).max() <= EMBED_ATOL
    for s in embedder.learner_slices:  # per-learner normalisation is inside the graph
        np.testing.assert_allclose(np.linalg.norm(out[:, s], axis=1), 1.0, atol=1e-5)


def test_metadata_inside_the_file_and_beside_it(embedder, onnx_file):
    meta = read_export_metadata(onnx_file)
    sidecar = json.loads(onnx_file.with_name("model.onnx.json").read_text())
    assert meta == sidecar
    assert meta["model_id"] == embedder.model_id and meta["num_learners"] == 2 and meta["embedding_dim"] == 16
    assert meta["learner_slices"] == [[0, 8], [8, 16]]
    assert meta["preprocessing"]["center_crop"] == 32 and meta["preprocessing"]["resize_short_side"] == 32
    assert meta["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    import onnx

    model = onnx.load(str(onnx_file))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension


def test_cli_torchscript_export_prints_the_parity_check(embedder, tmp_path, capsys):
    out = tmp_path / "m.ts"
    assert main(["export", embedder.source, "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity check" in text and "K=2 learners of 8 dims" in text
    assert read_export_metadata(out)["model_id"] == embedder.model_id


def test_export_errors_are_one_line(embedder, tmp_path, capsys):
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(GceError, match=r"bad\.onnx"):
        read_export_metadata(garbage)
    with pytest.raises(GceError, match="is a folder"):
        export_model(embedder, tmp_path, "torchscript")
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error:") and "missing.pt" in err and "\n" not in err
