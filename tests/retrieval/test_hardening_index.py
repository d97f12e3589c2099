"""Index folders under a hostile user: foreign files, concurrent writers and readers, huge counts,
edited manifests, damaged files. Every refusal is one line; nothing the user owns is removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gce
from gce.cli import main
from gce.errors import DatasetError, GceError
from gce.retrieval import SearchIndex, build_index
from helpers.retrieval_fixtures import clustered_embeddings, make_checkpoint, model_meta

pytest.importorskip("faiss")

SRC = str(Path(gce.__file__).resolve().parents[1])  # the code under test, for the subprocesses too
TESTS = str(Path(__file__).resolve().parents[1])  # the folder that holds the package `helpers`


def _one_line(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value), str(err.value)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gce: error: ") and "\n" not in err, err
    return err


def small_index(folder: Path, n: int = 40, index_type: str = "flat", **kwargs) -> SearchIndex:
    x, _ = clustered_embeddings(n)
    return build_index(x, [f"p{i}" for i in range(n)], None, folder, model_meta(), index_type=index_type, **kwargs)[0]


@pytest.fixture(scope="module")
def store(shape_folder, tmp_path_factory):
    """An embeddings folder of 8 shape images (a tiny random checkpoint)."""
    from gce.retrieval import Embedder, embed_to_store

    root = tmp_path_factory.mktemp("hardening")
    embedder = Embedder.from_checkpoint(make_checkpoint(root / "ckpt" / "model.pt"))
    paths = sorted(str(p) for p in Path(shape_folder).rglob("*.png"))[:8]
    embed_to_store(embedder, paths, None, root / "emb", progress=False)
    return root / "emb"


# ------------------------------------------------------------------------ 1. the folder is the user's
def test_build_refuses_a_folder_of_someone_elses_files_and_keeps_them(store, tmp_path, capsys):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<html>mine</html>")
    (out / "items.csv").write_text("a,b\n")
    assert main(["index", "build", str(store), "--out", str(out), "--quiet"]) == 1
    line = error_line(capsys)
    assert "not empty" in line and "index.html" in line and "items.csv" in line
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "items.csv"]
    assert (out / "index.html").read_text() == "<html>mine</html>"


def test_rewriting_its_own_index_removes_only_the_files_its_manifest_named(store, tmp_path):
    out = tmp_path / "idx"
    assert main(["index", "build", str(store), "--out", str(out), "--quiet"]) == 0
    mine = {"index.html": "<html/>", "items.csv": "x\n", "index.7.txt": "notes"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert main(["index", "add", str(out), str(store)]) == 0
    assert main(["index", "build", str(store), "--out", str(out), "--overwrite", "--quiet"]) == 0
    for name, text in mine.items():
        assert (out / name).read_text() == text
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*mine, "build_report.json", "index.2.faiss", "items.2.npz", "manifest.json"])
    assert SearchIndex.load(out).size == 8


def test_overwrite_refuses_another_programs_manifest(store, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    (out / "index.js").write_text("//")
    assert main(["index", "build", str(store), "--out", str(out), "--overwrite", "--quiet"]) == 1
    assert "not a gce index manifest" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["index.js", "manifest.json"]


def test_empty_paths_are_refused_not_taken_as_the_current_folder(store, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for argv in (
        ["index", "build", str(store), "--out", "", "--quiet"],
        ["index", "build", "", "--out", str(tmp_path / "x"), "--quiet"],
        ["index", "add", "", str(store)],
        ["index", "info", ""],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "empty" in capsys.readouterr().err
    assert not list(cwd.iterdir())
    with pytest.raises(GceError, match="empty") as err:
        small_index("")  # type: ignore[arg-type]
    _one_line(err)


def test_a_killed_builds_leftovers_do_not_block_the_next_build(tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    (out / "write.lock").write_text("999999999")  # the holder is gone: its flock went with it
    (out / ".index.0.faiss.tmp-999999999").write_bytes(b"half")
    small_index(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["build_report.json", "index.0.faiss", "items.0.npz", "manifest.json"]


# ------------------------------------------------------------------------ 2. writers and readers at once
def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    from gce.io import hold_lock

    index = small_index(tmp_path / "idx")
    lock = tmp_path / "idx" / "write.lock"
    with hold_lock(lock, "test"), pytest.raises(GceError, match=f"in use by process {os.getpid()}") as e:
        index.add(clustered_embeddings(3, seed=1)[0], ["a", "b", "c"], model_id=model_meta()["model_id"])
    _one_line(e)
    assert SearchIndex.load(tmp_path / "idx").size == 40


def test_an_add_on_a_stale_object_keeps_the_other_writers_items(tmp_path):
    first = small_index(tmp_path / "idx")
    second = SearchIndex.load(tmp_path / "idx")
    x = clustered_embeddings(3, seed=1)[0]
    first.add(x, ["a0", "a1", "a2"], model_id=model_meta()["model_id"])
    ids = second.add(x, ["b0", "b1", "b2"], model_id=model_meta()["model_id"])  # loaded before the first add
    assert ids == range(43, 46)
    final = SearchIndex.load(tmp_path / "idx")
    assert final.items.paths[40:] == ["a0", "a1", "a2", "b0", "b1", "b2"]


_ADDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from gce.errors import GceError
    from gce.retrieval import SearchIndex
    from helpers.retrieval_fixtures import clustered_embeddings, model_meta
    folder, tag, rounds, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    x = clustered_embeddings(3, seed=7)[0]
    Path(f"{go}.{tag}.ready").touch()  # imports done
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:  # both start together: the most overlap
        time.sleep(0.005)
    for r in range(rounds):
        paths = [f"{tag}{r}-{i}" for i in range(3)]
        try:
            SearchIndex.load(folder).add(x, paths, model_id=model_meta()["model_id"])
            print(json.dumps({"added": paths}), flush=True)
        except GceError as exc:
            print(json.dumps({"refused": str(exc)}), flush=True)
    """
)


def _adder(folder: Path, tag: str, rounds: int, go: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", _ADDER, str(folder), tag, str(rounds), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _start(procs: list[subprocess.Popen], go: Path, tags: tuple[str, ...]) -> None:
    """Let the adders go once all have imported gce (bounded wait)."""
    deadline = time.monotonic() + 90
    while not all(Path(f"{go}.{tag}.ready").exists() for tag in tags) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.02)
    go.touch()


def test_two_concurrent_adds_never_lose_one(tmp_path):
    small_index(tmp_path / "idx")
    go = tmp_path / "go"
    procs = [_adder(tmp_path / "idx", tag, 10, go) for tag in ("a", "b")]
    _start(procs, go, ("a", "b"))
    added: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        for line in out.splitlines():
            event = json.loads(line)
            if "added" in event:
                added += event["added"]
            else:  # the only acceptable failure: the other writer holds the lock
                assert "is in use by process" in event["refused"] and "\n" not in event["refused"], event
    final = SearchIndex.load(tmp_path / "idx")
    assert sorted(final.items.paths[40:]) == sorted(added) and final.size == 40 + len(added)
    assert added  # at least one add got through


def test_loading_while_another_process_adds_always_succeeds(tmp_path):
    small_index(tmp_path / "idx")
    go = tmp_path / "go"
    proc = _adder(tmp_path / "idx", "a", 40, go)
    _start([proc], go, ("a",))
    loads, failures, sizes = 0, [], []
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline and loads < 50_000:
            try:
                index = SearchIndex.load(tmp_path / "idx")
                sizes.append(index.size)
                assert len(index.items) == index.size
            except GceError as exc:
                failures.append(str(exc))
            loads += 1
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert not failures, f"{len(failures)} of {loads} loads failed, e.g. {failures[0]}"
    assert sizes == sorted(sizes) and max(sizes, default=40) > 40  # loads overlapped the adds
    assert SearchIndex.load(tmp_path / "idx").size == 40 + 3 * out.count('"added"')


def test_a_reader_whose_generation_vanished_reloads_the_new_one(tmp_path, monkeypatch):
    import gce.retrieval.index_files as index_files

    small_index(tmp_path / "idx")
    writer = SearchIndex.load(tmp_path / "idx")
    real = index_files.read_index_manifest
    raced: list[int] = []

    def read_then_race(folder):
        manifest = real(folder)
        if not raced:  # between this reader's manifest and its files, a writer publishes and cleans up
            raced.append(1)
            writer.add(clustered_embeddings(2, seed=3)[0], ["n0", "n1"], model_id=model_meta()["model_id"])
        return manifest

    monkeypatch.setattr(index_files, "read_index_manifest", read_then_race)
    assert SearchIndex.load(tmp_path / "idx").size == 42


# ------------------------------------------------------------------------ 3. bounds before work
def test_k_is_capped_at_the_index_size(tmp_path):
    index = small_index(tmp_path / "idx")
    scores, ids = index.search_arrays(index.embedding(0), 10**7)
    assert scores.shape == ids.shape == (1, 40) and ids[0, 0] == 0


def test_search_settings_are_clamped_to_what_can_matter(tmp_path):
    hnsw = small_index(tmp_path / "h", 300, "hnsw", sample=20)
    hnsw.set_search_params(ef_search=10**7)
    assert hnsw.search_params["ef_search"] == 300
    assert hnsw.search(hnsw.embedding(5), k=1)[0][0].id == 5
    ivf = small_index(tmp_path / "i", 300, "ivf", sample=20)
    ivf.set_search_params(nprobe=10**6)
    assert ivf.search_params["nprobe"] == ivf.manifest["params"]["nlist"]


@pytest.mark.parametrize(
    ("n", "index_type", "params", "message"),
    [
        (20, "ivf", {"nlist": 50}, "nlist must be an integer from 1 to 20"),
        (20, "ivfpq", {"nlist": 21}, "nlist must be an integer from 1 to 20"),
        (1, "ivfpq", None, "needs at least 2 items"),
        (20, "hnsw", {"hnsw_m": 10**6}, "hnsw_m must be an integer from 2 to 256"),
        (20, "hnsw", {"nlist": 4}, "'nlist' does not apply to hnsw"),
        (20, "flat", {"hnsw_m": 8}, "does not apply to flat"),
    ],
)
def test_build_parameters_out_of_range_are_one_line_errors(tmp_path, n, index_type, params, message):
    with pytest.raises(GceError, match=message) as err:
        small_index(tmp_path / "idx", n, index_type, params=params)
    _one_line(err)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_tiny_approximate_indexes_that_faiss_can_train_are_built(tmp_path):
    for n, index_type in ((1, "ivf"), (1, "hnsw"), (2, "ivfpq")):
        index = small_index(tmp_path / f"{index_type}{n}", n, index_type)
        assert index.search(index.embedding(0), k=5)[0][0].id == 0


def test_cli_count_options_out_of_range(store, tmp_path, capsys):
    assert main(["index", "build", str(store), "--out", str(tmp_path / "a"), "--type", "ivf", "--nlist", "9"]) == 1
    assert "nlist must be an integer from 1 to 8" in error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        main(["index", "build", str(store), "--out", str(tmp_path / "b"), "--type", "hnsw", "--hnsw-m", "100000"])
    assert exit_.value.code == 2
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").iterdir())


def test_cli_hnsw_m_bound_is_the_builders():
    from gce.commands.index import HNSW_M_MAX
    from gce.retrieval.faiss_build import MAX_HNSW_M

    assert HNSW_M_MAX == MAX_HNSW_M


def test_huge_weights_weigh_equally_instead_of_zeroing_every_score(tmp_path):
    index = small_index(tmp_path / "idx")
    q = index.embedding(3)
    plain = index.search_arrays(q, 5)
    huge = index.search_arrays(q, 5, weights=[1e308] * 4)
    np.testing.assert_array_equal(huge[1], plain[1])  # 1e308 / 1e308 = 1 exactly: the same weights, 1/4 each
    np.testing.assert_array_equal(huge[0], plain[0])
    skewed = index.search_arrays(q, 5, weights=[1e308, 0, 0, 0])
    np.testing.assert_array_equal(skewed[0], index.search_arrays(q, 5, learners=[0])[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [float("inf"), 1, 1, 1]}, "finite"),
        ({"weights": [float("nan"), 1, 1, 1]}, "finite"),
        ({"weights": ["a", 1, 1, 1]}, "must be numbers"),
        ({"weights": [True, 1, 1, 1]}, "must be numbers"),
        ({"weights": 3}, "list of numbers"),
        ({"learners": ["x"]}, "must be integers"),
        ({"learners": [1.5]}, "must be integers"),
    ],
)
def test_bad_weights_and_learners_are_one_line_errors(tmp_path, kwargs, message):
    index = small_index(tmp_path / "idx", 10)
    with pytest.raises(GceError, match=message) as err:
        index.search(np.ones((1, 32), dtype=np.float32), 3, **kwargs)
    _one_line(err)


# ------------------------------------------------------------------------ 4. what is read back is verified
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["model"].update(learner_slices=[[0, 16], [8, 24], [16, 32], [24, 32]]),  # overlapping
        lambda m: m["model"].update(learner_slices=[[0, 0], [0, 8], [8, 16], [16, 32]]),  # an empty learner
        lambda m: m.update(search_params={"nprobe": 3}),
        lambda m: m.update(size="forty"),
        lambda m: m["files"]["index"].update(name="../../etc/passwd"),
        lambda m: m.pop("manifest_sha256"),
    ],
)
def test_an_edited_manifest_is_refused_in_one_line(tmp_path, edit, capsys):
    small_index(tmp_path / "idx")
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest") as err:
        SearchIndex.load(tmp_path / "idx")
    _one_line(err)
    assert main(["index", "info", str(tmp_path / "idx")]) == 1
    error_line(capsys)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["model"].update(learner_slices=[[0, 16], [8, 24], [16, 32], [24, 32]]), "tile"),
        (lambda m: m["model"].update(learner_slices=[[0, 8], [8, 8], [8, 16], [16, 32]]), "non-empty"),
        (lambda m: m["model"].update(learner_slices=[[0, 8], [8, 16], [16, 24]]), "4 \\[start, stop\\] pairs"),
        (lambda m: m["model"].update(learner_slices=[[0, 8], [8, 16], [16, 24], [24, 30]]), "end at 30"),
        (lambda m: m.update(search_params={"nprobe": 3}), "does not apply to a flat"),
        (lambda m: m.update(size="forty"), "size must be an integer"),
        (lambda m: m.update(index_type="annoy"), "index_type must be one of"),
        (lambda m: m["files"]["items"].update(name="/etc/passwd"), "files.items.name must be 'items.0.npz'"),
        (lambda m: m["files"]["index"].update(sha256="x"), "64 hex"),
        (lambda m: m.update(size=41), "inconsistent index"),
        (lambda m: m.update(index_type="hnsw", search_params={}), "IndexFlatIP, but the manifest says hnsw"),
    ],
)
def test_manifest_content_is_validated_even_with_a_matching_checksum(tmp_path, edit, message):
    from gce.retrieval.index_files import manifest_body
    from gce.retrieval.index_manifest import write_index_manifest

    small_index(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    edit(manifest)
    write_index_manifest(
        tmp_path / "idx", {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "format")}
    )
    with pytest.raises(DatasetError, match=message) as err:
        SearchIndex.load(tmp_path / "idx")
    _one_line(err)
    assert manifest_body(manifest).keys().isdisjoint({"manifest_sha256", "files", "generation"})


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    "arrays",
    [
        {"label_codes": np.array([5, 0])},  # a label that does not exist
        {"path_offsets": np.array([0, 9, 2])},  # offsets out of order
        {"label_codes": np.array([0])},  # fewer labels than paths
        {"path_blob": np.array([1.5, 2.5])},  # not bytes
    ],
)
def test_a_damaged_item_table_is_one_line(tmp_path, arrays):
    from gce.retrieval.items import ItemTable

    good = {
        "path_blob": np.frombuffer(b"ab", dtype=np.uint8),
        "path_offsets": np.array([0, 1, 2]),
        "name_blob": np.frombuffer(b"x", dtype=np.uint8),
        "name_offsets": np.array([0, 1]),
        "label_codes": np.array([0, -1]),
    }
    _npz(tmp_path / "good.npz", **good)
    assert ItemTable.load(tmp_path / "good.npz").labels == ["x", None]
    _npz(tmp_path / "bad.npz", **{**good, **arrays})
    with pytest.raises(DatasetError, match="damaged item table") as err:
        ItemTable.load(tmp_path / "bad.npz")
    _one_line(err)


def test_info_and_search_on_damaged_or_half_written_folders_are_one_line(store, tmp_path, capsys):
    src = tmp_path / "idx"
    assert main(["index", "build", str(store), "--out", str(src), "--quiet"]) == 0
    items = src / "items.0.npz"
    cases = {
        "truncated item table": lambda d: (d / items.name).write_bytes(items.read_bytes()[:60]),
        "missing faiss file": lambda d: (d / "index.0.faiss").unlink(),
        "truncated manifest": lambda d: (d / "manifest.json").write_text((src / "manifest.json").read_text()[:50]),
        "a build killed before its manifest": lambda d: [
            (d / n).unlink() for n in ("manifest.json", "build_report.json", "items.0.npz")
        ],
        "manifest is a folder": lambda d: ((d / "manifest.json").unlink(), (d / "manifest.json").mkdir()),
    }
    import shutil

    for name, damage in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        shutil.copytree(src, folder)
        damage(folder)
        for extra in ([], ["--no-verify"]):
            assert main(["index", "info", str(folder), *extra]) == 1, name
            error_line(capsys)
        query = str(next(Path(store).parent.glob("**/*.pt")))  # any file: the index is read first
        assert main(["search", "--index", str(folder), "--checkpoint", query, query]) == 1, name
        error_line(capsys)
