"""gce model save / info / push: the folder's files and card, refusals and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from gce.cli import main
from helpers.hub_cache import put_in_hub_cache
from helpers.retrieval_fixtures import make_checkpoint

pytest.importorskip("safetensors")
pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shape_folder):
    """A run folder: model.pt, and final_metrics.json as gce's own evaluation writes it."""
    folder = tmp_path_factory.mktemp("run")
    make_checkpoint(folder / "model.pt", data={"root": str(shape_folder)})
    args = ["--workers", "0", "--no-clustering", "--quiet", "--out", str(folder / "final_metrics.json")]
    assert main(["eval", "--checkpoint", str(folder / "model.pt"), *args]) == 0
    return folder


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "shapes-model"
    options = ["--license", "apache-2.0", "--name", "shapes", "--repo", "acme/shapes"]
    assert main(["model", "save", str(run), str(out), *options]) == 0
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "\n" not in err, err
    return err


def test_save_writes_the_hub_layout_with_a_card(saved, run):
    from huggingface_hub.repocard import metadata_load

    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert config["metrics"] == metrics and config["license"] == "apache-2.0" and config["name"] == "shapes"
    assert config["num_learners"] == 2 and config["embedding_dim"] == 16
    assert config["learner_slices"] == [[0, 8], [8, 16]] and config["source"] == "model.pt"
    assert config["config"]["model"]["backbone"] == "mobilenet_v2" and config["preprocessing"]["center_crop"] == 32
    front = metadata_load(saved / "README.md")
    assert front["library_name"] == "gce" and front["license"] == "apache-2.0"
    assert {"metric-learning", "image-retrieval"} <= set(front["tags"])
    card = (saved / "README.md").read_text()
    assert f"| recall@1 | {100 * metrics['recall@1']:.2f} |" in card
    assert f"| map@r | {100 * metrics['map@r']:.2f} |" in card
    assert "K = 2 learners x 8 dimensions = D = 16" in card and "| 1 | 8-15 |" in card
    assert "resize the short side to 32 pixels, centre-crop 32 x 32" in card
    assert "backbone: mobilenet_v2" in card and "num_learners: 2" in card  # the training config
    assert "`apache-2.0`" in card and "--checkpoint hf://acme/shapes" in card
    assert config["model_id"] in card and config["weights"]["sha256"] in card


def test_save_of_another_file_has_no_metrics(run, tmp_path, capsys):
    shutil.copy(run / "model.pt", tmp_path / "best.pt")
    shutil.copy(run / "model.pt.sha256", tmp_path / "best.pt.sha256")
    shutil.copy(run / "final_metrics.json", tmp_path / "final_metrics.json")
    assert main(["model", "save", str(tmp_path / "best.pt"), str(tmp_path / "out")]) == 0
    assert "no metrics on the card" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["metrics"] is None and config["license"] == "unknown"
    assert "No metrics were recorded" in (tmp_path / "out" / "README.md").read_text()


def test_save_refuses_a_foreign_folder_and_replaces_its_own(run, saved, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["model", "save", str(run), str(mine)]) == 1
    assert "not empty and was not written by this command" in error_line(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    assert main(["model", "save", str(run), str(other)]) == 1
    assert "config.json that gce did not write" in error_line(capsys)
    assert (other / "config.json").read_text() == '{"model_type": "bert"}'
    again = tmp_path / "again"
    shutil.copytree(saved, again)
    assert main(["model", "save", str(run), str(again), "--license", "mit"]) == 0
    assert json.loads((again / "config.json").read_text())["license"] == "mit"
    assert (again / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    assert main(["model", "save", str(run), str(tmp_path / "x"), "--license", "MIT License"]) == 1
    assert "--license 'MIT License'" in error_line(capsys)
    assert main(["model", "save", str(run), str(tmp_path / "x"), "--repo", "acme"]) == 1
    assert "hf://acme: expected hf://org/name" in error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_info_describes_a_folder_and_an_hf_reference(saved, tmp_path, monkeypatch, capsys):
    config = json.loads((saved / "config.json").read_text())
    capsys.readouterr()
    assert main(["model", "info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert config["model_id"] in out and "K=2 x 8 dims = D=16" in out and "apache-2.0" in out
    assert "checksum ok" in out and f"recall@1 {100 * config['metrics']['recall@1']:.1f}" in out
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_in_hub_cache(tmp_path / "cache", "acme/shapes", saved)
    assert main(["model", "info", "hf://acme/shapes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == config
    assert main(["model", "info", "hf://acme/absent"]) == 1
    assert "hf://acme/absent: HF_HUB_OFFLINE is set" in error_line(capsys)


def test_info_and_push_refuse_a_damaged_folder(saved, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    with open(damaged / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["model", "info", str(damaged)]) == 1
    captured = capsys.readouterr()
    assert "CHECKSUM MISMATCH" in captured.out and "checksum mismatch with config.json" in captured.err
    assert main(["model", "push", str(damaged), "acme/shapes"]) == 1
    assert "checksum mismatch with config.json" in error_line(capsys)


def test_push_without_network_is_one_line(saved, monkeypatch, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, **kwargs):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    assert main(["model", "push", str(saved), "acme/shapes", "--private"]) == 1
    line = error_line(capsys)
    assert "cannot push to hf://acme/shapes: the Hub cannot be reached (ConnectError" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["model", "push", str(saved), "acme/shapes"]) == 1
    assert "cannot push to hf://acme/shapes: HF_HUB_OFFLINE is set" in error_line(capsys)


def test_push_uploads_the_folder_files(saved, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://huggingface.co/{repo_id}",
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw))
    )
    assert main(["model", "push", str(saved), "acme/shapes", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    (create, repo, kw), (upload, repo2, kw2) = calls
    assert (create, repo, kw["private"], kw["exist_ok"]) == ("create", "acme/shapes", True, True)
    assert (upload, repo2, kw2["folder_path"]) == ("upload", "acme/shapes", saved)
    assert sorted(kw2["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]

    def no_token(self, repo_id, **kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_token)
    assert main(["model", "push", str(saved), "acme/shapes"]) == 1
    assert "no Hugging Face token (log in with `hf auth login` or set HF_TOKEN)" in error_line(capsys)
