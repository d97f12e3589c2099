"""The emoji builder on a fake node_modules tree (npm is never run) and its loader."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from PIL import Image

from gce.data import build_emoji_dataset, emoji, load_dataset
from gce.errors import ConfigError, DatasetError, GceError
from helpers.data_fixtures import make_emoji_cache

# Six classes drawn by >= 4 of the 5 vendors once skin tones and fe0f are handled:
#   1f600, 2764 (from 2764-fe0f), 1f44d (its skin-tone variants dropped), 0023-20e3, 1f680, 1f431;
# 1f431 by 4 vendors; 1f98a is drawn by 3 vendors only, 1f44d-1f3fb is a skin-tone variant.
COMMON = ["1f600", "2764-FE0F", "1f44d", "1f44d-1f3fb", "0023-fe0f-20e3", "1f680", "1f431"]
TABLE = {
    "apple": [*COMMON, "1f98a"],
    "google": [*COMMON, "1f98a"],
    "twitter": [*COMMON, "1f98a"],
    "facebook": COMMON,
    "fluent3d": [*COMMON[:-1], "2764"],  # both 2764 and 2764-fe0f: one drawing is kept
}
KEYS = ["0023-20e3", "1f431", "1f44d", "1f600", "1f680", "2764"]


@pytest.fixture
def cache(tmp_path):
    return make_emoji_cache(tmp_path / "npm", TABLE)


@pytest.fixture
def no_npm(monkeypatch):
    """Fail the test if the builder tries to run npm."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"npm must not run in tests: {args}")

    monkeypatch.setattr(emoji.subprocess, "run", refuse)


def read_manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_class_key_and_skin_tones():
    assert emoji.class_key("263A-FE0F") == "263a"
    assert emoji.class_key("1f441-fe0f-200d-1f5e8-fe0f") == "1f441-200d-1f5e8"
    assert emoji.has_skin_tone("1f44d-1f3fd") and not emoji.has_skin_tone("1f44d")


def test_build_writes_images_manifest_and_split(tmp_path, cache, no_npm):
    out = build_emoji_dataset(tmp_path / "emoji", cache_dir=cache, progress=False)
    rows = read_manifest(out)
    assert list(rows[0]) == ["path", "label", "vendor", "split"]
    assert sorted({r["label"] for r in rows}) == KEYS
    counts = {k: sum(r["label"] == k for r in rows) for k in KEYS}
    assert counts == {"0023-20e3": 5, "1f431": 4, "1f44d": 5, "1f600": 5, "1f680": 5, "2764": 5}
    split_of = {r["label"]: r["split"] for r in rows}
    assert [split_of[k] for k in KEYS] == ["train", "test"] * 3  # sorted keys, odd positions test
    for row in rows:
        image = Image.open(out / row["path"])
        assert image.mode == "RGB" and image.size == (64, 64)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited onto white
        assert row["path"] == f"images/{row['label']}/{row['vendor']}.png"
    meta = json.loads((out / "emoji_meta.json").read_text())
    assert (meta["num_classes"], meta["num_images"], meta["size"]) == (6, 29, 64)
    assert not (tmp_path / "emoji.tmp").exists()


def test_loader_reads_manifest(tmp_path, cache, no_npm):
    out = build_emoji_dataset(tmp_path / "emoji", cache_dir=cache, progress=False)
    splits = load_dataset("emoji", out)
    assert splits.name == "emoji"
    assert splits.train.class_names == ["0023-20e3", "1f44d", "1f680"]
    assert splits.test.class_names == ["1f431", "1f600", "2764"]
    assert (len(splits.train), len(splits.test)) == (15, 14)


def test_build_is_idempotent_and_rebuilds_on_new_settings(tmp_path, cache, no_npm):
    out = build_emoji_dataset(tmp_path / "emoji", cache_dir=cache, progress=False)
    stamp = (out / "manifest.csv").stat().st_mtime_ns
    build_emoji_dataset(out, cache_dir=cache, progress=False)
    assert (out / "manifest.csv").stat().st_mtime_ns == stamp
    build_emoji_dataset(
        out, cache_dir=cache, size=32, vendors=("apple", "google", "fluent3d"), min_vendors=3, progress=False
    )
    rows = read_manifest(out)
    assert {r["vendor"] for r in rows} == {"apple", "google", "fluent3d"}
    assert Image.open(out / rows[0]["path"]).size == (32, 32)
    assert not (tmp_path / "emoji.old").exists()


def test_interrupted_build_leaves_no_output(tmp_path, cache, no_npm, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(emoji, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        build_emoji_dataset(tmp_path / "emoji", cache_dir=cache, progress=False)
    assert not (tmp_path / "emoji").exists() and not (tmp_path / "emoji.tmp").exists()


def test_refuses_to_overwrite_foreign_folder(tmp_path, cache, no_npm):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_text("x")
    with pytest.raises(GceError, match="photos is not empty and was not built by `gce data emoji`"):
        build_emoji_dataset(tmp_path / "photos", cache_dir=cache, progress=False)
    assert (tmp_path / "photos" / "holiday.jpg").exists()


def test_bad_options(tmp_path, cache):
    with pytest.raises(ConfigError, match="unknown vendor 'samsung'"):
        build_emoji_dataset(tmp_path / "e", vendors=("apple", "samsung"), cache_dir=cache)
    with pytest.raises(ConfigError, match="min_vendors"):
        build_emoji_dataset(tmp_path / "e", vendors=("apple", "google"), cache_dir=cache)


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(GceError, match="npm was not found"):
        build_emoji_dataset(tmp_path / "e", cache_dir=tmp_path / "empty", progress=False)
    assert not (tmp_path / "e").exists()


def test_failing_npm_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="npm ERR! network unreachable")

    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji.subprocess, "run", fake_run)
    with pytest.raises(GceError, match=r"(?s)npm install .*failed \(exit code 1\).*network unreachable"):
        build_emoji_dataset(
            tmp_path / "e", vendors=("apple", "fluent3d"), min_vendors=2, cache_dir=tmp_path / "cache", progress=False
        )
    assert calls[0][1:6] == ["install", "--no-audit", "--no-fund", "--prefix", str(tmp_path / "cache")]
    assert calls[0][6:] == ["emoji-datasource-apple@16.0.0", "@lobehub/fluent-emoji-3d@1.1.0"]


def test_only_missing_packages_are_installed(tmp_path, monkeypatch):
    cache = make_emoji_cache(tmp_path / "npm", {v: TABLE[v] for v in ("apple", "google")})
    calls = []

    def fake_run(command, **kwargs):  # "installs" the missing package by writing the fake tree
        calls.append(command)
        make_emoji_cache(cache, {"twitter": TABLE["twitter"]})
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji.subprocess, "run", fake_run)
    build_emoji_dataset(
        tmp_path / "e", vendors=("apple", "google", "twitter"), min_vendors=3, cache_dir=cache, progress=False
    )
    assert len(calls) == 1 and calls[0][6:] == ["emoji-datasource-twitter@16.0.0"]


def test_loader_without_manifest(tmp_path):
    with pytest.raises(DatasetError, match=r"manifest\.csv not found; build the dataset with `gce data emoji --out"):
        load_dataset("emoji", tmp_path)
