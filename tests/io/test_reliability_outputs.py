"""Outputs never destroy anything: every path gce writes is checked before the work, with one
line naming the path and the problem; regular files are replaced atomically, devices written
into, directories / FIFOs / sockets / the command's own inputs never replaced."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from PIL import Image

import gce.data.images
import gce.evaluation.pipeline
from gce.cli import main
from gce.errors import GceError
from gce.io import (
    OutputError,
    atomic_path,
    check_output_dir,
    check_output_file,
    write_json,
    write_text,
)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gce: error: "), err
    assert "Traceback" not in err
    return err.strip()


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A folder dataset of 4 classes x 2 images (8 px), split 2/2 by class."""
    root = tmp_path / "data"
    for c, color in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]):
        for k in range(2):
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), tuple(max(0, v - 40 * k) for v in color)).save(root / f"class{c}" / f"{k}.png")
    return root


def eval_args(root: Path, out: str) -> list[str]:
    return [
        "eval",
        "--backbone",
        "raw",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--image-size",
        "8",
        "--workers",
        "0",
        "--quiet",
        "--no-clustering",
        "--out",
        out,
    ]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the evaluation starts: the output must be refused before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output path was checked")

    # gce eval imports them when it runs, so patching their modules reaches it
    monkeypatch.setattr(gce.evaluation.pipeline, "evaluate_split", refuse)
    monkeypatch.setattr(gce.data.images, "check_records", refuse)


# --------------------------------------------------------------------------- gce eval --out
def test_out_onto_a_character_device_writes_into_it_and_never_replaces_it(tmp_path, dataset, capsys):
    """Before: `--out /dev/null` (as root) replaced /dev/null with a regular JSON file. The test
    uses a link to /dev/null (or a private copy of the device) so that it cannot harm the machine."""
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with open(device, "wb") as fh:
            fh.write(b"x")
    except OSError:  # not root, or a nodev mount
        device.unlink(missing_ok=True)
        os.symlink("/dev/null", device)
    assert main(eval_args(dataset, str(device))) == 0
    assert stat.S_ISCHR(os.stat(device).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert "metrics written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind",
    [
        "directory",
        "fifo",
        "socket",
        "below_a_file",
        "empty",
        "trailing_slash",
        "read_only_folder",
        "dataset_image",
        "inside_dataset_root",
    ],
)
def test_bad_out_is_one_line_before_any_work(tmp_path, dataset, capsys, no_work, kind):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    if kind == "directory":
        out, message = tmp_path / "adir", "is a directory, not a file"
        out.mkdir()
    elif kind == "fifo":
        out, message = tmp_path / "pipe.json", "is a FIFO (named pipe), not a file"
        os.mkfifo(out)
    elif kind == "socket":
        out, message = tmp_path / "sock.json", "is a socket, not a file"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(out))
    elif kind == "below_a_file":
        out, message = a_file / "m.json", f"{a_file} is not a folder, so nothing can be created below it"
    elif kind in ("empty", "trailing_slash"):
        text, message = ("", "the path is empty") if kind == "empty" else (f"{tmp_path}/newdir/", "names a folder")
        with pytest.raises(SystemExit) as info:  # a usage error, like any bad argument
            main(eval_args(dataset, text))
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --out: " in err and message in err, err
        assert not (tmp_path / "newdir").exists()
        return
    elif kind == "read_only_folder":
        if os.geteuid() == 0:  # root writes into chmod 555 folders; /sys is closed to everyone
            out, message = Path("/sys/gce-test/m.json"), "cannot create files in /sys ("
        else:
            folder = tmp_path / "ro"
            folder.mkdir()
            folder.chmod(0o555)
            out, message = folder / "m.json", f"cannot create files in {folder} (Permission denied)"
    elif kind == "dataset_image":
        out, message = dataset / "class0" / "0.png", "one of this command's inputs"
    else:
        out, message = dataset / "metrics.json", f"is inside {dataset}, one of this command's inputs"
    before = {p: p.read_bytes() for p in dataset.rglob("*.png")}
    assert main(eval_args(dataset, str(out))) == 1
    err = one_line_error(capsys)
    assert message in err and "--out" in err, err
    assert {p: p.read_bytes() for p in dataset.rglob("*.png")} == before
    assert a_file.read_text() == "keep me"
    assert not list(tmp_path.rglob("*.tmp*"))
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(out).st_mode)
    if kind == "socket":
        assert stat.S_ISSOCK(os.stat(out).st_mode)
        server.close()


def test_out_onto_the_evaluated_checkpoint_or_its_csv_index_is_refused(tmp_path, capsys, shape_folder):
    """Before: --out pointed at the checkpoint being evaluated (or at the CSV index) replaced it."""
    from gce.config import load_config
    from gce.models import build_model
    from gce.training.checkpoint import save_model_only

    csv = tmp_path / "labels.csv"
    images = sorted(shape_folder.rglob("*.png"))[:16]
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    cfg = load_config(
        None,
        [
            "data.dataset=csv",
            f"data.root={csv}",
            "data.image_size=16",
            "data.test_resize=16",
            "model.backbone=resnet18",
            "model.num_learners=2",
            "model.embedding_dim=8",
            "model.pretrained=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    model = build_model(cfg.model)
    checkpoint = tmp_path / "model.pt"
    save_model_only(model, cfg, checkpoint)
    link = tmp_path / "link.pt"
    os.link(checkpoint, link)  # a hard link is the same file under another name
    before = checkpoint.read_bytes(), csv.read_bytes()
    for out, named in (
        (checkpoint, checkpoint),
        (link, checkpoint),
        (csv, csv),
        (Path(f"{checkpoint}.sha256"), Path(f"{checkpoint}.sha256")),
    ):
        assert main(["eval", "--checkpoint", str(checkpoint), "--quiet", "--workers", "0", "--out", str(out)]) == 1
        err = one_line_error(capsys)
        assert "is one of this command's inputs" in err and str(named) in err, err
    assert (checkpoint.read_bytes(), csv.read_bytes()) == before
    other = tmp_path / "other.pt"  # another model file, not this command's input: still never replaced
    save_model_only(model, cfg, other)
    assert main(["eval", "--checkpoint", str(checkpoint), "--quiet", "--workers", "0", "--out", str(other)]) == 1
    assert f"--out {other} is a file gce verifies (it has other.pt.sha256)" in one_line_error(capsys)


def test_tilde_is_expanded_in_path_options(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "data")  # an unexpanded "~" would be created here
    relative = dataset.relative_to(tmp_path)
    assert (
        main(
            [
                "eval",
                "--backbone",
                "raw",
                "--dataset",
                "folder",
                "--root",
                f"~/{relative}",
                "--image-size",
                "8",
                "--workers",
                "0",
                "--quiet",
                "--no-clustering",
                "--out",
                "~/metrics.json",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["num_classes"] == 2
    assert not (tmp_path / "data" / "~").exists()


def test_undefined_metrics_are_written_as_null_not_nan(tmp_path, capsys):
    """Before: a split whose classes all have one image gave `"recall@1": NaN`, invalid JSON."""
    root = tmp_path / "single"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(root / f"c{c}" / "only.png")
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning, match="training classes have a single image"):
        assert main(eval_args(root, str(out))) == 0

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    values = json.loads(out.read_text(), parse_constant=refuse)
    assert values["recall@1"] is None and values["map@r"] is None and values["excluded_queries"] == 2


# ------------------------------------------------------------------------- the helper itself
def test_atomic_write_replaces_a_regular_file_follows_links_and_cleans_up(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    os.symlink(target, link)
    write_json(link, {"a": float("nan"), "b": [1.0, float("inf")]})
    assert link.is_symlink()  # the link stays; its target gets the new content
    assert json.loads(target.read_text()) == {"a": None, "b": [1.0, None]}

    class Boom(Exception):
        pass

    def write_half_then_fail():
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom

    with pytest.raises(Boom):
        write_half_then_fail()
    assert json.loads(target.read_text())["b"] == [1.0, None]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "t.json"]


def test_output_changed_into_a_fifo_after_the_check_is_still_not_replaced(tmp_path):
    target = tmp_path / "late.json"
    checked = check_output_file(target)
    os.mkfifo(target)
    with pytest.raises(OutputError, match="is a FIFO"):
        write_text(checked, "x")
    assert stat.S_ISFIFO(os.stat(target).st_mode)


@pytest.mark.parametrize("kind", ["file", "fifo", "below_file", "empty"])
def test_output_folders_are_checked_too(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("keep")
        message = "is a file, not a folder"
    elif kind == "fifo":
        os.mkfifo(path)
        message = "is a FIFO (named pipe), not a folder"
    elif kind == "below_file":
        path.write_text("keep")
        path = path / "sub"
        message = "is not a folder, so nothing can be created below it"
    else:
        path, message = "", "the path is empty"
    with pytest.raises(OutputError) as info:
        check_output_dir(path, what="train.out_dir")
    assert message in str(info.value) and "train.out_dir" in str(info.value)


# ------------------------------------------------------------- train, ablate, demo folders
TINY = """\
name: tiny
data: {{dataset: folder, root: {root}, image_size: 16, test_resize: 16, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, num_learners: 2, embedding_dim: 8, pretrained: false, freeze_bn: false}}
metaclass: {{strategy: random}}
sampler: {{classes_per_batch: 2, samples_per_class: 2, batches_per_epoch: 1}}
train: {{epochs: 1, out_dir: {out}, eval_test_every: 0, num_threads: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


@pytest.mark.parametrize("where", ["fifo", "dataset_root", "inside_dataset_root"])
def test_train_out_dir_is_checked_before_training(tmp_path, shape_folder, capsys, where):
    config = tmp_path / "c.yaml"
    out = {"fifo": tmp_path / "fifo", "dataset_root": shape_folder, "inside_dataset_root": shape_folder / "runs"}[where]
    if where == "fifo":
        os.mkfifo(out)
    config.write_text(TINY.format(root=shape_folder, out=out))
    assert main(["train", str(config), "--quiet"]) == 1
    err = one_line_error(capsys)
    assert "is a FIFO (named pipe), not a folder" in err if where == "fifo" else "is inside data.root" in err
    assert not (shape_folder / "runs").exists()


def test_ablate_and_demo_check_their_folders_before_training(tmp_path, shape_folder, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(TINY.format(root=shape_folder, out=tmp_path / "run"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    ablation = tmp_path / "ab.yaml"
    ablation.write_text(f"base: c.yaml\nout_dir: {a_file}\nseeds: [0]\nvariants: {{r: []}}\n")
    assert main(["ablate", str(ablation), "--quiet"]) == 1
    assert f"out_dir {a_file} is a file, not a folder" in one_line_error(capsys)
    assert main(["demo", str(config), "--quiet", "--out", str(a_file)]) == 1
    assert f"--out {a_file} is a file, not a folder" in one_line_error(capsys)
    assert a_file.read_text() == "keep" and not (tmp_path / "run").exists()


def test_gce_errors_from_outputs_are_gce_errors():
    assert issubclass(OutputError, GceError)


def test_null_metrics_in_the_logs_are_plotted_as_gaps(tmp_path):
    """Strict JSON writes undefined metrics as null; the ablation plot reads them back."""
    from gce.plots import plot_recall_curves

    runs = [{"test": [{"epoch": 0, "recall@1": None}, {"epoch": 1, "recall@1": 0.5}]}]
    path = plot_recall_curves({"a": runs}, tmp_path / "r.png")
    assert path.stat().st_size > 0


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.yaml", "my: own settings\n"),
        ("metrics.jsonl", '{"accuracy": 0.9}\n'),
        ("config.yaml", None),  # a folder named config.yaml
    ],
)
def test_a_fresh_run_never_replaces_the_users_own_files(tmp_path, shape_folder, capsys, name, content):
    """Before: train.out_dir=. in a project replaced its config.yaml and emptied its metrics.jsonl."""
    out = tmp_path / "project"
    out.mkdir()
    if content is None:
        (out / name).mkdir()
    else:
        (out / name).write_text(content)
    config = tmp_path / "c.yaml"
    config.write_text(TINY.format(root=shape_folder, out=out))
    assert main(["train", str(config), "--quiet"]) == 1
    assert f"train.out_dir {out} holds a {name} that no gce run wrote" in one_line_error(capsys)
    if content is not None:
        assert (out / name).read_text() == content


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A kill while model.pt was written left .model.pt.tmp-<pid> (a whole model) behind for good."""
    import subprocess
    import sys

    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    (tmp_path / f".model.pt.tmp-{dead}").write_bytes(b"half a model")
    (tmp_path / f".model.pt.tmp-{os.getppid()}").write_bytes(b"a live writer's")  # our parent runs
    write_text(tmp_path / "model.pt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.pt.tmp-{os.getppid()}", "model.pt"]
