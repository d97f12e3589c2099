"""gce embed / index / search / export from the command line: outputs and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gce.cli import main
from helpers.numerics import MOBILENET_V2_GCE_DEPTH, MOBILENET_V2_LONGEST_SUM, reordered
from helpers.retrieval_fixtures import make_checkpoint

pytest.importorskip("faiss")
# Embeddings of mobilenet_v2 + GCE head (K=2): unit vectors per learner, so an entry moves by at most
# the chain's reordering bound (54 layers, sums of <= 5760 terms: 4.9e-4) between two code paths.
EMBED_ATOL = reordered(MOBILENET_V2_LONGEST_SUM, MOBILENET_V2_GCE_DEPTH)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def built(checkpoint, shape_folder, tmp_path_factory):
    """An embeddings folder and a flat index of the shape images (48 images, 8 classes)."""
    root = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                "folder",
                "--root",
                str(shape_folder),
                "--split",
                "all",
                "--out",
                str(root / "emb"),
                "--shard-size",
                "20",
                "--workers",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["index", "build", str(root / "emb"), "--out", str(root / "idx"), "--quiet"]) == 0
    return root


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "\n" not in err, err
    return err


def test_search_json_finds_each_query_first(built, checkpoint, shape_folder, capsys):
    capsys.readouterr()
    queries = sorted(str(p) for p in Path(shape_folder).glob("class_0[03]/img_1.png"))
    assert (
        main(["search", "--index", str(built / "idx"), "--checkpoint", str(checkpoint), *queries, "--k", "4", "--json"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for query, line in zip(queries, lines, strict=False):
        answer = json.loads(line)
        assert answer["query"] == query and len(answer["results"]) == 4
        top = answer["results"][0]
        assert set(top) == {"id", "score", "path", "label"}
        assert top["path"] == os.path.abspath(query) and top["score"] == pytest.approx(1.0, abs=1e-5)
        assert top["label"] == Path(query).parent.name
        scores = [r["score"] for r in answer["results"]]
        assert scores == sorted(scores, reverse=True)


def test_search_table_with_learner_subset(built, checkpoint, shape_folder, capsys):
    query = str(next(Path(shape_folder).glob("class_01/img_0.png")))
    assert (
        main(
            [
                "search",
                "--index",
                str(built / "idx"),
                "--checkpoint",
                str(checkpoint),
                query,
                "--k",
                "3",
                "--learners",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "learners 1" in out and out.count("\n") == 5 and "class_01" in out


def test_embed_csv_and_images_and_index_add(checkpoint, shape_folder, tmp_path, capsys):
    images = sorted(Path(shape_folder).glob("class_02/*.png"))
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("path,label\n" + "".join(f"{p},two\n" for p in images[:3]))
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--csv",
                str(csv_file),
                "--out",
                str(tmp_path / "a"),
                "--workers",
                "0",
                "--quiet",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(Path(shape_folder) / "class_03"),
                "--out",
                str(tmp_path / "b"),
                "--workers",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert "embedded 6 of 6 images" in capsys.readouterr().out
    assert main(["index", "build", str(tmp_path / "a"), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    assert main(["index", "add", str(tmp_path / "idx"), str(tmp_path / "b")]) == 0
    assert "added 6 items (ids 3..8)" in capsys.readouterr().out
    from gce.retrieval import SearchIndex

    index = SearchIndex.load(tmp_path / "idx")
    assert index.item(0).label == "two" and index.item(5).label is None and index.size == 9


def test_errors_are_one_line_naming_the_file(built, checkpoint, tmp_path, capsys):
    bad = tmp_path / "fake.jpg"
    bad.write_bytes(b"\x00" * 50)
    assert main(["search", "--index", str(built / "idx"), "--checkpoint", str(checkpoint), str(bad)]) == 1
    assert "fake.jpg" in error_line(capsys)
    other = make_checkpoint(tmp_path / "other.pt", seed=7)
    assert main(["search", "--index", str(built / "idx"), "--checkpoint", str(other), str(bad)]) == 1
    assert "the index was built with model" in error_line(capsys)
    assert main(["search", "--index", str(built / "emb"), "--checkpoint", str(checkpoint), str(bad)]) == 1
    assert "not a gce index" in error_line(capsys)
    assert main(["index", "build", str(built / "idx"), "--out", str(tmp_path / "x")]) == 1
    assert "not a gce embeddings folder" in error_line(capsys)
    assert (
        main(
            ["embed", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "e")]
        )
        == 1
    )
    assert "no such folder" in error_line(capsys)
    assert main(["index", "build", str(built / "emb"), "--out", str(built / "idx")]) == 1
    assert "already holds an index" in error_line(capsys)
    assert (
        main(["search", "--index", str(built / "idx"), "--checkpoint", str(checkpoint), str(bad), "--weights", "1,2,3"])
        == 1
    )
    assert "fake.jpg" in error_line(capsys)  # the image is read before the weights are checked


def test_embed_skip_bad_counts(checkpoint, shape_folder, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(Path(shape_folder).glob("class_04/*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz-broken.png").write_bytes(b"\x89PNG broken")
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(folder),
                "--out",
                str(tmp_path / "e"),
                "--workers",
                "0",
                "--quiet",
            ]
        )
        == 1
    )
    assert "zz-broken.png" in error_line(capsys)
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(folder),
                "--out",
                str(tmp_path / "e"),
                "--workers",
                "0",
                "--quiet",
                "--skip-bad",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "embedded 3 of 4 images" in out and "skipped 1 unreadable images (first:" in out


def test_sigkilled_embed_resumes_to_the_same_result(checkpoint, shape_folder, tmp_path):
    """A real SIGKILL while shards are being written; the rerun finishes and equals a clean run."""
    out = tmp_path / "emb"
    cmd = [
        sys.executable,
        "-m",
        "gce",
        "embed",
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(shape_folder),
        "--out",
        str(out),
        "--shard-size",
        "4",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("shard-*.npz"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from gce.errors import DatasetError
    from gce.retrieval import read_store

    manifest = json.loads((out / "embeddings.json").read_text())
    assert not manifest["complete"]
    with pytest.raises(DatasetError, match="incomplete"):
        read_store(out)
    assert subprocess.run(cmd, env=env).returncode == 0
    resumed = read_store(out)
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(shape_folder),
                "--out",
                str(tmp_path / "clean"),
                "--shard-size",
                "4",
                "--workers",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    clean = read_store(tmp_path / "clean")
    assert resumed.paths == clean.paths
    # Batches of 2 against batches of 64: other kernel blocking, rounding-level differences of unit vectors.
    np.testing.assert_allclose(resumed.embeddings, clean.embeddings, atol=EMBED_ATOL)


@pytest.mark.parametrize("command", ["export", "embed", "index"])
def test_output_paths_are_checked_before_any_work(command, tmp_path, capsys):
    """Every retrieval command refuses a bad --out in one line before it loads a model or reads a
    catalogue: here the model and the embeddings do not even exist, so only the output check can
    answer (without it the error would be about the missing input)."""
    a_file = tmp_path / "plain.txt"
    a_file.write_text("keep me")
    missing = str(tmp_path / "no-such-model.pt")
    argv = {
        "export": ["export", missing, "--out", str(tmp_path)],  # a directory as the output file
        "embed": ["embed", "--checkpoint", missing, "--images", str(tmp_path), "--out", str(a_file)],
        "index": ["index", "build", str(tmp_path / "no-such-embeddings"), "--out", str(a_file)],
    }[command]
    capsys.readouterr()
    assert main(argv) == 1
    message = error_line(capsys)
    assert "--out" in message and ("not a folder" in message or "directory" in message), message
    assert a_file.read_text() == "keep me"


def test_embed_refuses_an_output_folder_inside_its_image_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    capsys.readouterr()
    assert (
        main(["embed", "--checkpoint", str(tmp_path / "m.pt"), "--images", str(images), "--out", str(images / "emb")])
        == 1
    )
    assert "inside" in error_line(capsys)


def test_embed_of_the_training_dataset_uses_the_checkpoints_split(shape_folder, tmp_path, capsys):
    """Before: `--dataset folder --split test` re-split the folder with the loader's default
    test_fraction (0.5), not the 0.25 the model was trained and evaluated with."""
    from gce.data import load_dataset

    options = {"test_fraction": 0.25, "seed": 3}
    model = make_checkpoint(tmp_path / "run" / "model.pt", data={"root": str(shape_folder), "options": options})
    expected = load_dataset("folder", shape_folder, **options).test
    assert len(expected) != len(load_dataset("folder", shape_folder).test)
    args = ["embed", "--checkpoint", str(model), "--dataset", "folder", "--root", str(shape_folder)]
    assert main([*args, "--split", "test", "--out", str(tmp_path / "emb"), "--workers", "0", "--quiet"]) == 0
    assert f"embedded {len(expected)} of {len(expected)} images" in capsys.readouterr().out
