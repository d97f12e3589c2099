"""Bad configuration and environment: one line on stderr naming the key, exit 1, before any work.

Everything goes through the ``gce`` command line (in-process ``gce.cli.main``; the subprocess
cases are in test_reliability_data.py and test_reliability_kill.py).
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from gce.cli import main
from gce.training.checkpoint import LAST, load_checkpoint

CONFIG = """\
name: tiny
data: {{dataset: folder, root: {root}, image_size: 32, test_resize: 32, workers: 0,
        options: {{test_fraction: 0.25, seed: 0}}}}
model: {{backbone: resnet18, head: gce, num_learners: 2, embedding_dim: 16, pretrained: false, freeze_bn: false}}
metaclass: {{strategy: class_proxy, update_every: 1}}
sampler: {{classes_per_batch: 3, samples_per_class: 2, batches_per_epoch: 2}}
optim: {{name: adam, lr: 1.0e-3}}
train: {{epochs: 1, seed: 0, out_dir: {out}, eval_test_every: 0, num_threads: 1}}
eval: {{batch_size: 16, clustering: false}}
"""


@pytest.fixture
def config(tmp_path, shape_folder) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.format(root=shape_folder, out=tmp_path / "run"))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gce: error: "), err
    assert "Traceback" not in err
    return err.strip()


def nothing_written(out: Path) -> bool:
    return not (out / "metrics.jsonl").exists() and not (out / LAST).exists() and not (out / "config.yaml").exists()


# shape_folder: 8 classes; test_fraction 0.25 leaves 6 training classes, 3 per learner with K=2.
BAD_OVERRIDES = [
    (["modle.backbone=resnet18"], "unknown config key 'modle'"),
    (["model.num_learner=2"], "unknown config key 'model.num_learner'"),
    (["model.embedding_dim=abc"], "bad value for 'model.embedding_dim'"),
    (["train.epochs=1.5"], "bad value for 'train.epochs'"),
    (["optim.lr=fast"], "bad value for 'optim.lr'"),
    (["model.pretrained=maybe"], "bad value for 'model.pretrained'"),
    (["data.image_size=[32]"], "bad value for 'data.image_size'"),
    (["model=5"], "bad value for 'model'"),
    (["eval.recall_ks=[1, 0]"], "bad value for 'eval.recall_ks.1'"),
    (["data.options=3"], "bad value for 'data.options'"),
    (["model.embedding_dim=15"], "model.embedding_dim=15 is not divisible by model.num_learners=2"),
    (["train.epochs=0"], "bad value for 'train.epochs'"),
    (["sampler.batches_per_epoch=0"], "bad value for 'sampler.batches_per_epoch'"),
    (["sampler.classes_per_batch=1"], "bad value for 'sampler.classes_per_batch'"),
    (["optim.lr=0"], "bad value for 'optim.lr'"),
    (["train.num_threads=0"], "bad value for 'train.num_threads'"),
    (["data.crop_scale=[0.9, 0.1]"], "data.crop_scale=[0.9, 0.1] must satisfy"),
    (["train.device=gpu"], "bad value for 'train.device': 'gpu' is not a torch device"),
    (["train.device=cuda:7"], "train.device=cuda:7, but"),
    (["data.dataset=imagenet"], "unknown dataset 'imagenet'; valid names: cub"),
    (["data.options.tst_fraction=0.5"], "dataset 'folder' has no option 'tst_fraction'"),
    (["data.root=/nonexistent/gce-data"], "dataset root /nonexistent/gce-data does not exist"),
    (["model.num_learners=4"], "model.num_learners=4 needs at least 8 training classes (2 per learner); "
                               "the training split has 6"),
    (["sampler.classes_per_batch=4"],
     "sampler.classes_per_batch=4 is larger than the 3 classes of the smallest learner subset (6 training classes "
     "split evenly over model.num_learners=2)"),
    (["sampler.classes_per_batch=4", "metaclass.strategy=random"], "sampler.classes_per_batch=4 is larger than the 3"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_setting_is_one_line_before_any_work(config, tmp_path, capsys, overrides, message):
    if overrides == ["train.device=cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    started = time.perf_counter()
    assert main(["train", str(config), "--quiet", *overrides]) == 1
    assert message in one_line_error(capsys)
    assert nothing_written(tmp_path / "run")
    assert time.perf_counter() - started < 30  # no epoch was trained


def test_cuda_requested_without_a_gpu(config, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", str(config), "--quiet", "train.device=cuda"]) == 1
    assert one_line_error(capsys) == "gce: error: train.device=cuda, but no CUDA GPU is available here; use cpu"
    assert main(["eval", "--backbone", "raw", "--dataset", "folder", "--root", str(tmp_path), "--device", "cuda"]) == 1
    assert "--device=cuda, but no CUDA GPU" in one_line_error(capsys)


@pytest.mark.parametrize(
    "text, message, names_file",
    [
        ("data:\n\tdataset: folder\n", "not valid YAML (found character '\\t' that cannot start any token at line 2, column 1)", True),
        ("data: {dataset: folder\n", "not valid YAML (expected ',' or '}', but got '<stream end>' at line 2, column 1)", True),
        ("- a\n- b\n", "the top level must be a mapping of sections", True),
        (b"\xff\xfe data", "not a UTF-8 text file", True),
        ("data: {dataset: folder, root: x}\nsampler: {clases_per_batch: 3}\n", "unknown config key 'sampler.clases_per_batch'", False),
        ("model: {}\n", "missing config key 'data'", False),
    ],
    ids=["tab", "unclosed", "list", "binary", "typo-in-file", "no-data"],
)
def test_broken_config_file(tmp_path, capsys, text, message, names_file):
    path = tmp_path / "broken.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", str(path)]) == 1
    err = one_line_error(capsys)
    assert message in err
    assert (str(path) in err) == names_file  # a bad key is named by its key, the file is the one given


def test_subsets_smaller_than_classes_per_batch_fall_back_with_a_warning_when_unbalanced(config, capsys):
    """With unbalanced subsets the sizes are only known after clustering: the sampler then uses all
    classes of a short subset and warns (documented in gce.data.samplers and docs/reliability.md)."""
    with pytest.warns(UserWarning, match=r"subset has only \d classes, fewer than classes_per_batch=4; its batches use all"):
        assert main(["train", str(config), "--quiet", "sampler.classes_per_batch=4", "metaclass.balanced=false"]) == 0


# ------------------------------------------------------------------------------ output folder
@pytest.mark.parametrize("where, reason", [
    ("under_a_file", "Not a directory"),
    ("is_a_file", "File exists"),
    ("proc", None),
])
def test_unwritable_output_folder_is_detected_before_training(config, tmp_path, capsys, where, reason):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"under_a_file": a_file / "sub", "is_a_file": a_file, "proc": Path("/proc/gce-reliability-test")}[where]
    started = time.perf_counter()
    assert main(["train", str(config), "--quiet", f"train.out_dir={out}"]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"gce: error: output folder {out} is not writable: ")
    if reason:
        assert err.endswith(reason)
    assert time.perf_counter() - started < 10


def test_full_disk_is_detected_before_training(config, capsys, monkeypatch):
    import gce.runtime as runtime

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runtime.os, "fsync", no_space)  # the 1 MiB probe of check_writable
    assert main(["train", str(config), "--quiet"]) == 1
    assert one_line_error(capsys).endswith("is not writable: No space left on device")


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(config, tmp_path, capsys, monkeypatch):
    import gce.training.checkpoint as checkpoint

    out = tmp_path / "run"
    assert main(["train", str(config), "--quiet", "sampler.batches_per_epoch=1"]) == 0
    real_fsync = checkpoint.os.fsync  # os.fsync itself: the probe of check_writable uses it too

    def no_space(fd):
        if os.fstat(fd).st_size > 20_000_000:  # a checkpoint (~150 MB), not the 1 MiB probe
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2", "sampler.batches_per_epoch=1"]) == 1
    err = one_line_error(capsys)
    assert f"cannot write a checkpoint to {out}: No space left on device; the previous checkpoint is kept" in err
    state, path = load_checkpoint(out)
    assert path.name == LAST and state["epoch"] == 1
    assert not [p for p in os.listdir(out) if ".tmp" in p]


# ----------------------------------------------------------------------------- eval datasets
def _image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


@pytest.mark.parametrize("layout, extra, message", [
    ("empty_root", [], "has no class folders"),
    ("empty_classes", [], "folder: 2 class folders contain no images"),
    ("empty_classes", ["--skip-bad"], "found 0 class(es); a class-disjoint train/test split needs at least 2"),
    ("one_image", [], "found 1 class(es); a class-disjoint train/test split needs at least 2"),
    ("one_image_per_class", [], "the test split has 1 readable image; retrieval evaluation needs at least 2"),
    ("one_image_per_class", ["--split", "train"], "the train split has 1 readable image"),
    ("csv_header_only", [], "found 0 class(es)"),
])
def test_eval_on_an_empty_or_one_image_dataset(tmp_path, capsys, layout, extra, message):
    root = tmp_path / "data"
    root.mkdir()
    dataset = "folder"
    if layout == "empty_classes":
        (root / "a").mkdir()
        (root / "b").mkdir()
    elif layout == "one_image":
        _image(root / "a" / "x.png")
    elif layout == "one_image_per_class":
        _image(root / "a" / "x.png")
        _image(root / "b" / "y.png", (0, 0, 200))
    elif layout == "csv_header_only":
        dataset = "csv"
        (root / "labels.csv").write_text("path,label\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-image-class warning
        code = main(["eval", "--backbone", "raw", "--dataset", dataset, "--root", str(root), "--workers", "0",
                     "--quiet", *extra])
    assert code == 1
    err = one_line_error(capsys)
    assert message in err and str(root) in err


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--workers", "-1"), ("--image-size", "0")])
def test_eval_bad_numbers_are_usage_errors(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--backbone", "raw", "--dataset", "folder", "--root", str(tmp_path), option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"gce eval: error: argument {option}: must be at least" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- checkpoints
def test_resume_with_another_model_config_says_what_differs(config, capsys):
    assert main(["train", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2", "model.embedding_dim=32",
                 "sampler.samples_per_class=3"]) == 1
    err = one_line_error(capsys)
    assert "checkpoint was written with another configuration" in err
    assert "model.embedding_dim: checkpoint 16, config 32" in err
    assert "sampler.samples_per_class: checkpoint 2, config 3" in err
    # Changing only what does not touch the model or its training is allowed (epochs, workers).
    assert main(["train", str(config), "--quiet", "--resume", "train.epochs=2", "data.workers=0"]) == 0


def test_resume_without_a_checkpoint(config, tmp_path, capsys):
    assert main(["train", str(config), "--quiet", "--resume"]) == 1
    assert one_line_error(capsys) == f"gce: error: no checkpoint in {tmp_path / 'run'} (expected last.pt)"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_eval_of_damaged_or_foreign_checkpoints(tmp_path, capsys):
    from gce.models import build_model
    from gce.training.checkpoint import _FORMAT

    def save(name: str, blob) -> Path:
        torch.save(blob, tmp_path / name)
        return tmp_path / name

    model = build_model(backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False,
                        freeze_bn=False)
    from gce.config import load_config

    (tmp_path / "c.yaml").write_text(CONFIG.format(root=tmp_path, out=tmp_path / "run"))
    cfg = load_config(tmp_path / "c.yaml").to_dict()
    other = {**cfg, "model": {**cfg["model"], "embedding_dim": 32}}
    cases = {
        save("other_model.pt", {"format": _FORMAT, "state": {"config": other, "model": model.state_dict()}}):
            "weights do not fit the model in its config",
        save("no_config.pt", {"format": _FORMAT, "state": {"model": {}}}):
            "not a gce checkpoint of this version (missing config)",
        save("bad_config.pt", {"format": _FORMAT, "state": {"config": {**cfg, "model": {"backbone": "vgg"}},
                                                             "model": {}}}): "bad value for 'model.backbone'",
        save("a_list.pt", [1, 2, 3]): "not a gce checkpoint",
    }
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage" * 20)
    cases[tmp_path / "garbage.pt"] = "cannot be read (refused by the weights-only loader: "
    (tmp_path / "empty.pt").write_bytes(b"")
    cases[tmp_path / "empty.pt"] = "cannot be read ("
    for path, message in cases.items():
        assert main(["eval", "--checkpoint", str(path), "--quiet"]) == 1
        err = one_line_error(capsys)
        assert message in err, err
        assert "weights_only` set to `False`" not in err  # never advise loading untrusted pickles


def test_checkpoints_are_loaded_with_the_weights_only_unpickler(tmp_path, monkeypatch):
    """The refusal of a pickled callable is tested in test_checkpoint.py; this pins the setting."""
    import gce.training.checkpoint as checkpoint

    real_load, seen = torch.load, []

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    checkpoint.save_checkpoint({"epoch": 1}, tmp_path)
    monkeypatch.setattr(checkpoint.torch, "load", recording_load)
    assert checkpoint.load_checkpoint(tmp_path)[0]["epoch"] == 1
    assert seen == [True]
