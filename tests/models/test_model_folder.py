"""Model folders (gce model save): the same model as its .pt, through every loader; hf:// from the cache."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gce.cli import main
from gce.errors import CheckpointError
from gce.retrieval import Embedder
from gce.sharing.location import checkpoint_argument, model_folder
from gce.training.checkpoint import load_model
from helpers.hub_cache import put_in_hub_cache
from helpers.retrieval_fixtures import make_checkpoint

pytest.importorskip("safetensors")
pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A run's model.pt and the model folder saved from it."""
    root = tmp_path_factory.mktemp("pair")
    checkpoint = make_checkpoint(root / "run" / "model.pt")
    assert main(["model", "save", str(root / "run"), str(root / "folder")]) == 0
    return checkpoint, root / "folder"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test, and no network: HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf-cache"
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "\n" not in err, err
    return err


def test_the_folder_loads_the_same_weights_and_config(pair):
    checkpoint, folder = pair
    (a, cfg_a), (b, cfg_b) = load_model(checkpoint), load_model(folder)
    assert cfg_a == cfg_b
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_embeddings_and_model_id_are_identical(pair, shape_folder):
    checkpoint, folder = pair
    paths = sorted(str(p) for p in Path(shape_folder).rglob("*.png"))[:12]
    from_pt, from_folder = Embedder.from_checkpoint(checkpoint), Embedder.from_checkpoint(folder)
    assert from_folder.model_id == from_pt.model_id
    assert json.loads((folder / "config.json").read_text())["model_id"] == from_pt.model_id
    a, b = from_pt.embed_paths(paths), from_folder.embed_paths(paths)
    assert a.shape == (12, 16) and np.isfinite(a).all()
    assert torch.equal(torch.from_numpy(a), torch.from_numpy(b))  # bitwise: same weights, same code path
    assert from_folder.metadata()["preprocessing"] == from_pt.metadata()["preprocessing"]


def test_an_index_built_from_the_pt_answers_queries_through_the_folder(pair, shape_folder, tmp_path, capsys):
    checkpoint, folder = pair
    common = ["--dataset", "folder", "--root", str(shape_folder), "--split", "all", "--workers", "0", "--quiet"]
    assert main(["embed", "--checkpoint", str(checkpoint), *common, "--out", str(tmp_path / "emb")]) == 0
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    queries = sorted(str(p) for p in Path(shape_folder).glob("class_0[03]/img_1.png"))
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--checkpoint", str(folder), *queries, "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [a["results"][0]["path"] for a in answers] == queries  # each query finds itself first
    # A unit vector's cosine with itself: D products summed in float32, then rounded to 6 decimals in JSON.
    tolerance = 4 * 16 * float(np.finfo(np.float32).eps) + 5e-7
    assert all(abs(a["results"][0]["score"] - 1.0) <= tolerance for a in answers)
    if importlib.util.find_spec("fastapi") is not None:  # gce serve loads it the same way (and checks the id)
        from gce.serve import load_service

        assert load_service(tmp_path / "idx", folder).embedder.model_id == Embedder.from_checkpoint(checkpoint).model_id


def test_eval_gives_the_same_metrics_for_the_folder(pair, shape_folder, tmp_path, capsys):
    checkpoint, folder = pair
    results = []
    for i, source in enumerate((checkpoint, folder)):
        out = tmp_path / f"m{i}.json"
        args = ["--root", str(shape_folder), "--workers", "0", "--no-clustering", "--quiet", "--out", str(out)]
        assert main(["eval", "--checkpoint", str(source), *args]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and "recall@1" in results[0]


def test_hf_reference_resolves_from_the_cache_offline(pair, offline_hub, shape_folder):
    checkpoint, folder = pair
    snapshot = put_in_hub_cache(offline_hub, "acme/shapes", folder)
    tagged = put_in_hub_cache(offline_hub, "acme/shapes", folder, revision="v1")
    assert tagged != snapshot  # another commit: the revision picks the snapshot
    assert model_folder("hf://acme/shapes") == snapshot
    assert model_folder("hf://acme/shapes@v1") == tagged
    path = [str(next(Path(shape_folder).rglob("*.png")))]
    via_hub, via_pt = Embedder.from_checkpoint("hf://acme/shapes"), Embedder.from_checkpoint(checkpoint)
    assert via_hub.model_id == via_pt.model_id and via_hub.source == "hf://acme/shapes"
    assert np.array_equal(via_hub.embed_paths(path), via_pt.embed_paths(path))


def test_hf_reference_falls_back_to_the_cache_when_the_hub_is_unreachable(pair, offline_hub, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    with pytest.raises(CheckpointError, match=r"^hf://acme/other: the Hub cannot be reached and the Hugging Face"):
        model_folder("hf://acme/other")
    snapshot = put_in_hub_cache(offline_hub, "acme/shapes", pair[1])
    assert model_folder("hf://acme/shapes") == snapshot
    assert calls == ["acme/other", "acme/shapes"]


def test_hf_reference_not_cached_offline_is_one_line(offline_hub, capsys, tmp_path):
    (tmp_path / "images").mkdir()
    args = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "emb"), "--quiet"]
    assert main(["embed", "--checkpoint", "hf://acme/missing@v2", *args]) == 1
    line = error_line(capsys)
    assert "hf://acme/missing@v2" in line and "HF_HUB_OFFLINE" in line and str(offline_hub) in line
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("text", ["hf://acme", "hf://acme/", "hf:///x", "hf://a/b/c", "hf://acme/x@", "hf://a/../b"])
def test_a_malformed_hf_reference_is_a_usage_error(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected hf://org/name"):
        checkpoint_argument(text)


def test_a_damaged_weights_file_is_one_line(pair, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(pair[1], damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a tensor: safetensors itself would not notice
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch with config\.json"):
        load_model(damaged)
    out, images = tmp_path / "emb", tmp_path / "images"
    images.mkdir()
    assert main(["embed", "--checkpoint", str(damaged), "--images", str(images), "--out", str(out)]) == 1
    assert f"{weights}: checksum mismatch" in error_line(capsys)


def test_a_truncated_or_foreign_folder_is_one_line(pair, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(pair[1], cut)
    (cut / "model.safetensors").write_bytes((pair[1] / "model.safetensors").read_bytes()[:1000])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    images = tmp_path / "images"
    images.mkdir()
    for folder, expected in ((cut, "checksum mismatch"), (foreign, "not a gce model folder")):
        out = tmp_path / f"emb-{folder.name}"
        assert main(["embed", "--checkpoint", str(folder), "--images", str(images), "--out", str(out)]) == 1
        assert expected in error_line(capsys)
