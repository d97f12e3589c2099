"""Inference runtimes: ONNX Runtime embeds like PyTorch (to the export bound), its cache, auto's fallbacks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import gce.retrieval.export as export_module
from gce.cli import main
from gce.config.vocabulary import RUNTIME_NAMES
from gce.data import load_folder
from gce.data.images import load_rgb
from gce.errors import GceError
from gce.retrieval import Embedder, read_store
from gce.retrieval import runtimes as rt
from helpers.numerics import RESNET18_GCE_DEPTH, RESNET18_LONGEST_SUM, reordered
from helpers.retrieval_fixtures import make_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# The export tests' bound: resnet18 + GCE head, unit vectors per learner, another runtime's sum order.
EMBED_ATOL = reordered(RESNET18_LONGEST_SUM, RESNET18_GCE_DEPTH)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # resnet18: the quickest graph to export (tests/retrieval/test_retrieval_export.py)
    return make_checkpoint(tmp_path_factory.mktemp("rt") / "model.pt", backbone="resnet18")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Embedder.from_checkpoint(checkpoint, runtime="torch")


@pytest.fixture(scope="module")
def onnx_embedder(checkpoint, reference):
    embedder = Embedder.from_checkpoint(checkpoint, runtime="onnx")
    assert embedder.runtime.name == "onnx"  # opened (and exported) on first use
    return embedder


@pytest.fixture(scope="module")
def images(reference, shape_folder):
    records = load_folder(shape_folder, test_fraction=0.5).test
    return torch.stack([reference.transform(load_rgb(p)) for p in records.paths[:6]])


@pytest.fixture
def exports(monkeypatch):
    """Counts the ONNX exports made (the real export runs)."""
    calls: list[str] = []
    real = export_module.export_model

    def counted(embedder, out, *args, **kwargs):
        calls.append(str(out))
        return real(embedder, out, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_model", counted)
    return calls


def test_every_runtime_name_has_a_factory():
    assert rt.RUNTIMES.missing() == [] and set(rt.RUNTIMES) == set(RUNTIME_NAMES)


def test_onnx_embeddings_match_torch_within_the_export_bound_and_keep_the_model_id(reference, onnx_embedder, images):
    assert onnx_embedder.runtime.name == "onnx" and reference.runtime.name == "torch"
    assert onnx_embedder.model_id == reference.model_id  # indexes built with either accept the other
    assert onnx_embedder.metadata() == reference.metadata()
    for batch in (images, images[:1], images[:5]):
        got, want = onnx_embedder.embed_tensors(batch), reference.embed_tensors(batch)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= EMBED_ATOL
    for s in onnx_embedder.learner_slices:
        assert np.allclose(np.linalg.norm(got[:, s], axis=1), 1.0, atol=1e-5)


def test_the_cache_is_reused_rebuilt_when_damaged_keyed_by_model_id(checkpoint, onnx_embedder, exports, tmp_path):
    cached = checkpoint.with_name("model.pt.onnx-cache") / f"{onnx_embedder.model_id}.onnx"
    assert cached.is_file() and json.loads(cached.with_name(cached.name + ".json").read_text())["model_id"]
    assert Embedder.from_checkpoint(checkpoint, runtime="onnx").runtime.path == cached
    assert exports == []  # the second session did not export again

    cached.write_bytes(b"\x08\x01not an onnx model" * 8)  # damaged: onnxruntime cannot load it
    again = Embedder.from_checkpoint(checkpoint, runtime="onnx")
    assert again.runtime.name == "onnx" and exports == [str(cached)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert np.abs(again.embed_tensors(x) - onnx_embedder.embed_tensors(x)).max() <= EMBED_ATOL

    other = make_checkpoint(tmp_path / "model.pt", backbone="resnet18", seed=1)
    shutil.copytree(cached.parent, tmp_path / "model.pt.onnx-cache")  # another model's file beside it
    changed = Embedder.from_checkpoint(other, runtime="onnx")
    assert changed.runtime.name == "onnx" and changed.model_id != onnx_embedder.model_id
    assert exports[1:] == [str(tmp_path / "model.pt.onnx-cache" / f"{changed.model_id}.onnx")]


def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_user_cache(tmp_path, monkeypatch, exports):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = make_checkpoint(tmp_path / "m" / "model.pt", backbone="resnet18", seed=2)
    (tmp_path / "m" / "model.pt.onnx-cache").write_text("a file where the folder would go")
    embedder = Embedder.from_checkpoint(model, runtime="onnx")
    assert embedder.runtime.path == tmp_path / "xdg" / "gce" / "onnx" / f"{embedder.model_id}.onnx"
    assert len(exports) == 1


def test_auto_falls_back_to_torch_with_one_line_without_onnxruntime(checkpoint, monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(rt, "_import_onnxruntime", missing)
    embedder = Embedder.from_checkpoint(checkpoint, runtime="auto")
    assert embedder.runtime.name == "torch"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "using torch" in err and "onnxruntime is not installed" in err

    with pytest.raises(GceError, match=r"^--runtime onnx: onnxruntime is not installed") as info:
        Embedder.from_checkpoint(checkpoint, runtime="onnx").runtime  # noqa: B018  (opens it)
    assert "\n" not in str(info.value)


def test_auto_falls_back_when_parity_fails_and_explicit_onnx_refuses(checkpoint, onnx_embedder, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "PARITY_LIMIT", -1.0)  # no difference can pass
    path = onnx_embedder.runtime.path  # given: no export is tried again (a cached file would be)
    embedder = Embedder.from_checkpoint(checkpoint, runtime="auto", onnx_file=path)
    assert embedder.runtime.name == "torch"
    err = capsys.readouterr().err.strip().splitlines()
    fallback = [line for line in err if "using torch" in line]
    assert len(fallback) == 1 and "differs from PyTorch" in fallback[0]
    with pytest.raises(GceError, match=r"^--runtime onnx: the ONNX model differs from PyTorch"):
        Embedder.from_checkpoint(checkpoint, runtime="onnx", onnx_file=path).runtime  # noqa: B018


def test_cli_embed_with_onnx_writes_what_torch_writes(checkpoint, onnx_embedder, shape_folder, tmp_path):
    stores = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        args = ["embed", "--checkpoint", str(checkpoint), "--images", str(shape_folder), "--out", str(out)]
        assert main([*args, "--runtime", runtime, "--threads", "1", "--workers", "0", "--quiet"]) == 0
        stores[runtime] = read_store(out)
    torch_set, onnx_set = stores["torch"], stores["onnx"]
    assert torch_set.model["model_id"] == onnx_set.model["model_id"] == onnx_embedder.model_id
    assert torch_set.paths == onnx_set.paths
    assert np.abs(torch_set.embeddings - onnx_set.embeddings).max() <= EMBED_ATOL


def test_cli_search_with_onnx_finds_what_torch_finds(checkpoint, onnx_embedder, shape_folder, tmp_path, capsys):
    store = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(shape_folder), "--out", str(store)]) == 0
    assert main(["index", "build", str(store), "--out", str(tmp_path / "index")]) == 0
    queries = [str(p) for p in sorted(shape_folder.glob("*/*"))[:3]]
    answers = {}
    for runtime in ("torch", "onnx"):
        capsys.readouterr()
        args = ["search", *queries, "--index", str(tmp_path / "index"), "--checkpoint", str(checkpoint), "--json"]
        assert main([*args, "--k", "5", "--runtime", runtime, "--threads", "1"]) == 0
        captured = capsys.readouterr()
        assert f"runtime {runtime}: " in captured.err and "1 thread(s)" in captured.err
        answers[runtime] = [json.loads(line)["results"] for line in captured.out.splitlines()]
    for torch_hits, onnx_hits in zip(answers["torch"], answers["onnx"], strict=True):
        # A cosine of two embeddings, each within EMBED_ATOL per entry of the other runtime's: it moves by
        # at most 2 * sqrt(D) * EMBED_ATOL (Cauchy-Schwarz, unit-length vectors, D = 16).
        bound = 2 * 4 * EMBED_ATOL + 1e-6  # + the 6 decimals the JSON rounds to
        assert all(abs(a["score"] - b["score"]) <= bound for a, b in zip(torch_hits, onnx_hits, strict=True))
        scores = [h["score"] for h in torch_hits]
        for rank, (a, b) in enumerate(zip(torch_hits, onnx_hits, strict=True)):
            separated = all(abs(scores[rank] - s) > 2 * bound for j, s in enumerate(scores) if j != rank)
            if separated:  # a hit whose score no other hit's is near keeps its rank
                assert a["id"] == b["id"]


def test_an_input_error_comes_alone_before_any_export(tmp_path, capsys, exports):
    model = make_checkpoint(tmp_path / "model.pt", backbone="resnet18", seed=3)
    args = ["embed", "--checkpoint", str(model), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "e")]
    assert main(args) == 1  # default --runtime auto, no --quiet
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: --images") and "\n" not in err
    assert exports == [] and not (tmp_path / "model.pt.onnx-cache").exists()  # opened on first use only


def _two_thread_onnx(checkpoint, onnx_embedder) -> Embedder:
    embedder = Embedder.from_checkpoint(checkpoint, runtime="onnx")
    embedder.runtime = rt.OnnxRuntime(onnx_embedder.runtime.path, embedder.device, threads=2)
    return embedder


def test_batch_lanes_run_single_threaded_sessions_and_return_batches_in_order(checkpoint, onnx_embedder, images):
    from gce.retrieval.batch_lanes import BatchLanes

    embedder = _two_thread_onnx(checkpoint, onnx_embedder)
    got: list[tuple[int, np.ndarray]] = []
    with BatchLanes(embedder) as lanes:
        assert (lanes.lanes, lanes.runtime.threads) == (2, 1)
        for number in range(len(images)):  # one image per batch: 6 batches on 2 lanes
            lanes.submit(images[number : number + 1], np.array([number]), lambda e, ids: got.append((int(ids[0]), e)))
        lanes.drain(lambda e, ids: got.append((int(ids[0]), e)))
    assert [number for number, _ in got] == list(range(len(images)))
    np.testing.assert_allclose(
        np.concatenate([e for _, e in got]), embedder.embed_tensors(images), rtol=0, atol=EMBED_ATOL
    )
    with BatchLanes(Embedder.from_checkpoint(checkpoint, runtime="torch")) as lanes:
        assert lanes.lanes == 1  # torch (and a 1-thread session) run one batch after the other


def test_embed_on_lanes_writes_the_store_in_item_order(checkpoint, onnx_embedder, shape_folder, tmp_path):
    from gce.retrieval import embed_to_store

    embedder = _two_thread_onnx(checkpoint, onnx_embedder)
    paths = load_folder(shape_folder, test_fraction=0.5).test.paths[:7]
    embed_to_store(embedder, paths, None, tmp_path / "emb", shard_size=3, batch_size=2, progress=False)
    stored = read_store(tmp_path / "emb")
    assert stored.ids.tolist() == list(range(7)) and list(stored.paths) == [str(p) for p in paths]
    np.testing.assert_allclose(stored.embeddings, embedder.embed_paths(paths), rtol=0, atol=EMBED_ATOL)
