"""gce embed / gce export / image decoding against a hostile user (issue 23): outputs never delete or
replace what gce did not write, and every file read back is verified, with one-line errors."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gce.cli import build_parser, main
from gce.data.images import check_image, load_rgb
from gce.errors import BadImageError, DatasetError, GceError
from gce.io import OutputError
from helpers.retrieval_fixtures import make_checkpoint

pytest.importorskip("faiss")


# ------------------------------------------------------------------------------------ helpers
def _image_files(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        path = folder / name
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, "PNG")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def embedder(checkpoint):
    from gce.retrieval import Embedder

    return Embedder.from_checkpoint(checkpoint)


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 1 with one `gce: error:` line; return it."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ empty paths
def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_no_command_takes_a_path_with_plain_Path():
    """Path("") is ".", the current folder: every path option goes through gce.io.path_argument."""
    plain = [
        f"gce {name} {action.dest}"
        for name, sub in _subparsers(build_parser())
        for action in sub._actions
        if action.type is Path
    ]
    assert plain == []


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "--checkpoint", "m.pt", "--images", "imgs", "--out", ""],
        ["embed", "--checkpoint", "", "--images", "imgs", "--out", "e"],
        ["embed", "--checkpoint", "m.pt", "--csv", "", "--out", "e"],
        ["export", "m.pt", "--out", ""],
        ["export", "", "--out", "m.onnx"],
        ["index", "build", "emb", "--out", ""],
        ["index", "build", "", "--out", "idx"],
        ["search", "--index", "", "--checkpoint", "m.pt", "q.png"],
        ["serve", "--index", "idx", "--checkpoint", ""],
    ],
)
def test_an_empty_path_is_a_usage_error(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "the path is empty" in _usage_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder


def test_an_empty_config_path_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "the path is empty" in _fails(["train", ""], capsys)


# ------------------------------------------------------------------------------------ embed: ownership
def test_embed_refuses_a_folder_it_did_not_write_and_deletes_nothing(checkpoint, tmp_path, capsys):
    images = tmp_path / "imgs"
    _image_files(images, ["a.png", "b.png"])
    out = tmp_path / "backup"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"the user's archive")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    err = _fails(["embed", "--checkpoint", checkpoint, "--images", images, "--out", out, "--quiet"], capsys)
    assert "not written by this command" in err and "shard-000000.tar" in err and "notes.txt" in err
    assert _tree(out) == before


def test_embed_csv_beside_its_images_never_touches_them(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _image_files(photos, ["shard-0.png", "shard-1.png"])
    (photos / "list.csv").write_text("path\nshard-0.png\nshard-1.png\n")
    before = _tree(photos)
    err = _fails(
        ["embed", "--checkpoint", checkpoint, "--csv", photos / "list.csv", "--out", photos, "--quiet"], capsys
    )
    assert "shard-0.png" in err and "choose a new or empty folder" in err
    assert _tree(photos) == before


def test_embed_to_store_refuses_a_foreign_folder(embedder, tmp_path):
    from gce.retrieval import embed_to_store

    (paths := _image_files(tmp_path / "imgs", ["a.png"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-00000.npz").write_bytes(b"a user's file with gce's name")
    with pytest.raises(OutputError, match=r"no embeddings\.json"):
        embed_to_store(embedder, [str(p) for p in paths], None, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "shard-00000.npz").read_bytes() == b"a user's file with gce's name"


def test_overwrite_and_resume_remove_only_the_files_the_store_recorded(embedder, tmp_path):
    from gce.retrieval import embed_to_store, read_store

    paths = [str(p) for p in _image_files(tmp_path / "imgs", [f"{i}.png" for i in range(5)])]
    out = tmp_path / "e"
    embed_to_store(embedder, paths, None, out, shard_size=2, progress=False)
    (out / "shard-000000.tar").write_bytes(b"user")  # put in the store folder later by the user
    (out / "shard-notes.txt").write_text("user")
    (out / ".shard-00000.npz.tmp-999999999").write_bytes(b"a temporary of a live writer? pid unknown")
    embed_to_store(embedder, paths[:3], None, out, shard_size=2, progress=False, overwrite=True)
    assert (out / "shard-000000.tar").read_bytes() == b"user" and (out / "shard-notes.txt").exists()
    assert sorted(p.name for p in out.glob("shard-0000?.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    assert len(read_store(out).embeddings) == 3
    # a file of the user's at a name the store is about to write is refused, not replaced
    (out / "shard-00002.npz").unlink(missing_ok=True)
    manifest_before = (out / "embeddings.json").read_bytes()
    embed_to_store(embedder, paths[:3], None, tmp_path / "g", shard_size=2, progress=False)
    (out / "shard-00002.npz").write_bytes(b"user")
    with pytest.raises(GceError, match=r"shard-00002\.npz was not written by this store"):
        embed_to_store(embedder, paths, None, out, shard_size=2, progress=False, overwrite=True)
    assert (out / "shard-00002.npz").read_bytes() == b"user" and (out / "shard-000000.tar").exists()
    assert manifest_before  # the refusal came before any write


# ------------------------------------------------------------------------------------ embed: manifest verified
@pytest.fixture(scope="module")
def pristine_store(embedder, tmp_path_factory) -> Path:
    from gce.retrieval import embed_to_store

    folder = tmp_path_factory.mktemp("store")
    paths = [str(p) for p in _image_files(folder / "imgs", [f"{i}.png" for i in range(5)])]
    embed_to_store(embedder, paths, ["x", "y", "x", "y", "x"], folder / "store", shard_size=2, progress=False)
    return folder / "store"


@pytest.fixture
def store(pristine_store, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_store, tmp_path / "store"))


def _edit(store: Path, change, *, rechecksum: bool) -> None:
    path = store / "embeddings.json"
    values = json.loads(path.read_text())
    change(values)
    if rechecksum:  # as a careful forger would: only the content checks remain
        from gce.retrieval.files import MANIFEST_CHECKSUM, manifest_digest

        values[MANIFEST_CHECKSUM] = manifest_digest(values)
    path.write_text(json.dumps(values))


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def _slices(values, s):
    values["model"]["learner_slices"] = s


EDITS = {
    "overlapping slices": lambda m: _slices(m, [[0, 10], [6, 16]]),
    "an empty slice": lambda m: _slices(m, [[0, 16], [16, 16]]),
    "unequal slices": lambda m: _slices(m, [[0, 4], [4, 16]]),
    "slices not a list": lambda m: _slices(m, "0:8,8:16"),
    "a gap between shards": lambda m: m["shards"][1].update(start=3),
    "a shard's count": lambda m: m["shards"][0].update(count=1),
    "items_total as text": lambda m: m.update(items_total="5"),
    "no shards list": lambda m: m.update(shards={}),
    "no model": lambda m: m.pop("model"),
    "complete flag": lambda m: m.update(complete=False),
    "dtype": lambda m: m.update(dtype="int8"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_store_manifest_is_refused_in_one_line(store, edit, tmp_path):
    from gce.retrieval import build_index_from_store, read_store

    _edit(store, EDITS[edit], rechecksum=False)
    with pytest.raises(DatasetError, match="manifest checksum mismatch") as err:
        read_store(store)
    _one_line(err)
    with pytest.raises(DatasetError, match="manifest checksum mismatch"):
        build_index_from_store(store, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_store_manifest_content_is_checked_behind_the_checksum(store, edit):
    from gce.retrieval import read_store

    _edit(store, EDITS[edit], rechecksum=True)
    with pytest.raises(DatasetError, match="damaged manifest") as err:
        read_store(store, require_complete=False)
    assert "embeddings.json" in _one_line(err)


def test_a_store_manifest_without_checksum_is_refused_also_on_resume(store, embedder):
    from gce.retrieval import embed_to_store, read_store

    path = store / "embeddings.json"
    values = json.loads(path.read_text())
    values.pop("manifest_sha256")
    path.write_text(json.dumps(values))
    with pytest.raises(DatasetError, match="no checksum") as err:
        read_store(store)
    _one_line(err)
    before = _tree(store)
    with pytest.raises(DatasetError, match=r"delete .* yourself"):
        embed_to_store(embedder, ["x.png"], None, store, progress=False, overwrite=True)
    assert _tree(store) == before


# ------------------------------------------------------------------------------------ embed: names, options
def test_file_names_that_are_not_utf8_are_refused_or_skipped(checkpoint, tmp_path, capsys):
    images = tmp_path / "imgs"
    _image_files(images, ["ok.png"])
    shutil.copy(images / "ok.png", os.fsdecode(bytes(images) + b"/caf\xe9.png"))
    err = _fails(["embed", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "e", "--quiet"], capsys)
    assert "caf\\xe9.png" in err and "not valid UTF-8" in err
    assert not (tmp_path / "e").exists()
    argv = ["embed", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "e", "--quiet", "--skip-bad"]
    assert main([str(a) for a in argv]) == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    from gce.retrieval import read_store

    data = read_store(tmp_path / "e")
    assert data.paths == [str(images / "ok.png")]
    manifest = json.loads((tmp_path / "e" / "embeddings.json").read_text(encoding="utf-8"))
    assert manifest["shards"][0]["bad"][0][0].endswith("caf\\xe9.png")


def test_split_without_dataset_is_refused_not_ignored(checkpoint, tmp_path, capsys):
    _image_files(tmp_path / "imgs", ["a.png"])
    argv = ["embed", "--checkpoint", checkpoint, "--images", tmp_path / "imgs", "--split", "train"]
    err = _fails([*argv, "--out", tmp_path / "e"], capsys)
    assert "--split train goes with --dataset" in err and not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as training leaves it: last.pt (+ .sha256), config.yaml, metrics."""
    folder = tmp_path_factory.mktemp("run")
    model = make_checkpoint(folder / "model.pt", backbone="resnet18")
    for name in ("model.pt", "model.pt.sha256"):
        shutil.copy(folder / name, folder / name.replace("model", "last"))
    assert model.exists()
    (folder / "config.yaml").write_text("model: {}\n")
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "notes.ts").write_text("a user's TypeScript file\n")
    return folder


@pytest.mark.parametrize(
    ("out", "fmt", "message"),
    [
        ("config.yaml", "torchscript", "writes a .ts or .pt"),
        ("config.yaml", "onnx", "writes a .onnx file"),
        ("notes.ts", "torchscript", "not a gce export"),
        ("last.pt", "torchscript", "one of this command's inputs"),
        ("metrics.jsonl", "onnx", "writes a .onnx file"),
    ],
)
def test_export_never_replaces_a_file_of_the_run_folder(run_folder, out, fmt, message, capsys):
    before = _tree(run_folder)
    err = _fails(["export", run_folder, "--format", fmt, "--out", run_folder / out], capsys)
    assert message in err
    assert _tree(run_folder) == before


def test_export_metadata_sidecar_of_another_program_is_not_replaced(run_folder, tmp_path, capsys):
    (tmp_path / "m.ts.json").write_text('{"theirs": true}')
    err = _fails(["export", run_folder / "model.pt", "--format", "torchscript", "--out", tmp_path / "m.ts"], capsys)
    assert "not the metadata of a gce export" in err
    assert not (tmp_path / "m.ts").exists() and (tmp_path / "m.ts.json").read_text() == '{"theirs": true}'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--out", "model"], "ends in 'no extension'"),
        (["--format", "onnx", "--out", "model.ts"], "writes a .onnx file"),
        (["--format", "torchscript", "--out", "model.onnx"], "writes a .ts or .pt"),
        (["--opset", "17", "--out", "model.onnx"], "--opset 17 is not supported"),
        (["--opset", "0", "--out", "model.onnx"], "--opset 0 is not supported"),
        (["--opset", "1000", "--out", "model.onnx"], "--opset 1000 is not supported"),
        (["--format", "torchscript", "--opset", "18", "--out", "model.ts"], "only --format onnx has an opset"),
    ],
)
def test_export_requests_it_cannot_honour_are_refused_before_any_work(run_folder, tmp_path, args, message, capsys):
    pytest.importorskip("onnx")
    argv = ["export", run_folder / "model.pt", *[str(tmp_path / a) if a.startswith("model") else a for a in args]]
    err = _fails(argv, capsys)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_parity_check_leaves_no_file_and_no_new_folder(run_folder, tmp_path, capsys, monkeypatch):
    import gce.retrieval.export as export_module

    monkeypatch.setattr(export_module, "PARITY_LIMIT", -1.0)  # every export "differs"
    out = tmp_path / "new" / "sub" / "m.ts"
    err = _fails(["export", run_folder / "model.pt", "--format", "torchscript", "--out", out], capsys)
    assert "differs from PyTorch" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_re_export_replaces_its_own_earlier_export(run_folder, tmp_path, capsys):
    out = tmp_path / "m.ts"
    argv = ["export", run_folder / "model.pt", "--format", "torchscript", "--out", out]
    assert main([str(a) for a in argv]) == 0
    first = out.stat().st_mtime_ns
    assert main([str(a) for a in argv]) == 0
    assert (
        out.stat().st_mtime_ns >= first and json.loads((tmp_path / "m.ts.json").read_text())["format"] == "torchscript"
    )
    capsys.readouterr()


def test_export_refuses_a_file_at_another_opset_than_asked(embedder, tmp_path, monkeypatch):
    """The exporter falls back to its own opset without an error: the written file is checked."""
    pytest.importorskip("onnxscript")
    import onnx
    import torch

    from gce.retrieval.export import export_model

    class Program:
        def save(self, path):
            graph = onnx.helper.make_graph([], "g", [], [])
            onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    with pytest.raises(GceError, match="wrote opset 18 instead") as err:
        export_model(embedder, tmp_path / "m.onnx", "onnx", opset=20)
    _one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_export_writes_the_opset_asked_for(run_folder, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(run_folder / "model.pt"), "--opset", "20", "--out", str(out)]) == 0
    assert "parity check" in capsys.readouterr().out
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [20]


# ------------------------------------------------------------------------------------ images
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, raw: bytes, *, color: int = 2, interlace: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _rgb_rows(pixels: np.ndarray) -> bytes:
    return b"".join(b"\0" + row.tobytes() for row in pixels)


def test_a_png_whose_pixel_data_ends_early_is_refused_not_black(tmp_path, embedder):
    pixels = np.random.default_rng(1).integers(1, 255, (16, 16, 3), dtype=np.uint8)
    raw = _rgb_rows(pixels)
    whole, short = tmp_path / "whole.png", tmp_path / "short.png"
    whole.write_bytes(_png(16, 16, raw))
    short.write_bytes(_png(16, 16, raw[: len(raw) // 2]))  # a valid zlib stream of half the rows
    np.testing.assert_array_equal(np.asarray(load_rgb(whole)), pixels)
    with pytest.raises(BadImageError, match=r"short\.png: truncated or corrupt image \(pixel data ends after 392 of"):
        load_rgb(short)
    assert "truncated" in check_image(short)
    from gce.retrieval import embed_to_store

    info = embed_to_store(embedder, [str(whole), str(short)], None, tmp_path / "e", skip_bad=True, progress=False)
    assert (info.embedded, info.skipped) == (1, 1) and info.bad[0][0] == str(short)


def test_truncated_png_and_jpeg_files_are_refused(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    for fmt, name in (("PNG", "cut.png"), ("JPEG", "cut.jpg")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        (tmp_path / name).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
        with pytest.raises(BadImageError, match="truncated"):
            load_rgb(tmp_path / name)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_complete_pngs_of_every_layout_pass_the_pixel_data_check(tmp_path, mode):
    from gce.data.png_pixels import png_pixel_data_problem

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (13, 7, 4), dtype=np.uint8), "RGBA")
    image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
    image.save(tmp_path / "x.png")
    assert png_pixel_data_problem(str(tmp_path / "x.png")) is None
    load_rgb(tmp_path / "x.png")


def test_interlaced_png_sizes(tmp_path):
    """Adam7 (Pillow reads it, cannot write it): 5 x 3 grey, passes written by hand."""
    from gce.data.png_pixels import png_pixel_data_problem

    width, height = 5, 3
    grey = np.arange(width * height, dtype=np.uint8).reshape(height, width) * 10
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(_rgb_rows(grey[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if grey[y0::dy, x0::dx].size)
    (tmp_path / "i.png").write_bytes(_png(width, height, raw, color=0, interlace=1))
    assert png_pixel_data_problem(str(tmp_path / "i.png")) is None
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "i.png"))[..., 0], grey)
    (tmp_path / "j.png").write_bytes(_png(width, height, raw[:-3], color=0, interlace=1))
    assert "pixel data ends after" in png_pixel_data_problem(str(tmp_path / "j.png"))
    with pytest.raises(BadImageError, match="truncated"):  # Pillow sees this one too
        load_rgb(tmp_path / "j.png")


def test_pillow_never_loads_truncated_images_here():
    import gce.commands.embed
    import gce.data
    import gce.retrieval
    import gce.serve

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    src = Path(gce.data.__file__).resolve().parents[1]
    assert [p for p in src.rglob("*.py") if "LOAD_TRUNCATED_IMAGES" in p.read_text()] == []
