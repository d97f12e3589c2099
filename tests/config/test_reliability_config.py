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
    (["data.dataset=imagenet"], "bad value for 'data.dataset': Input should be 'cub', 'cars196'"),
    (["data.options.tst_fraction=0.5"], "dataset 'folder' has no option 'tst_fraction'"),
    (["data.root=/nonexistent/gce-data"], "dataset root /nonexistent/gce-data does not exist"),
    (
        ["model.num_learners=4"],
        ("model.num_learners=4 needs at least 8 training classes (2 per learner); the training split has 6"),
    ),
    (
        ["sampler.classes_per_batch=4"],
        (
            "sampler.classes_per_batch=4 is larger than the 3 classes of the smallest learner subset "
            "(6 training classes split evenly over model.num_learners=2)"
        ),
    ),
    (["sampler.classes_per_batch=4", "metaclass.strategy=random"], "sampler.classes_per_batch=4 is larger than the 3"),
    # Edge values that gave tracebacks before (issue 10): seeds, crop vs resize, resource sizes.
    (["train.seed=-1"], "bad value for 'train.seed': a seed must be from 0 to 2**32-1"),
    (["train.seed=4294967296"], "bad value for 'train.seed': a seed must be from 0 to 2**32-1"),
    (["train.seed=18446744073709551616"], "bad value for 'train.seed'"),
    (["data.options.seed=-5"], "bad value for 'data.options.seed'"),
    (["data.options.seed=99999999999"], "bad value for 'data.options.seed'"),
    (["data.options.seed=abc"], "bad value for 'data.options.seed': a seed must be an integer"),
    (["data.image_size=64"], "data.test_resize=32 is smaller than data.image_size=64"),
    (
        ["data.image_size=100000", "data.test_resize=100000"],
        "bad value for 'data.image_size': 100000 is above the limit",
    ),
    (["eval.batch_size=1000000000"], "bad value for 'eval.batch_size'"),
    (["data.workers=100000"], "bad value for 'data.workers'"),
    (["sampler.batches_per_epoch=1000000000000"], "bad value for 'sampler.batches_per_epoch'"),
    (["model.embedding_dim=1000000000", "model.num_learners=2"], "bad value for 'model.embedding_dim'"),
    (["sampler.classes_per_batch=1000", "sampler.samples_per_class=1000"], "is a batch of 1000000 images"),
    (["eval.recall_ks=[1, 100000000000]"], "bad value for 'eval.recall_ks.1'"),
    (["optim.lr=1e400"], "bad value for 'optim.lr': must be a finite number"),
    (["loss.margin=.inf"], "bad value for 'loss.margin': must be a finite number"),
    (["train.out_dir="], "bad value for 'train.out_dir'"),
    (["train.out_dir=''"], "bad value for 'train.out_dir': the path is empty"),
    (["data.root=''"], "bad value for 'data.root': the path is empty"),
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
        (
            "data:\n\tdataset: folder\n",
            "not valid YAML (found character '\\t' that cannot start any token at line 2, column 1)",
            True,
        ),
        (
            "data: {dataset: folder\n",
            "not valid YAML (expected ',' or '}', but got '<stream end>' at line 2, column 1)",
            True,
        ),
        ("- a\n- b\n", "the top level must be a mapping of sections", True),
        (b"\xff\xfe data", "not a UTF-8 text file", True),
        (
            "data: {dataset: folder, root: x}\nsampler: {clases_per_batch: 3}\n",
            "unknown config key 'sampler.clases_per_batch'",
            False,
        ),
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
    with pytest.warns(
        UserWarning, match=r"subset has only \d classes, fewer than classes_per_batch=4; its batches use all"
    ):
        assert main(["train", str(config), "--quiet", "sampler.classes_per_batch=4", "metaclass.balanced=false"]) == 0


# ------------------------------------------------------------------------------ output folder
@pytest.mark.parametrize(
    "where, reason",
    [
        ("under_a_file", "a_file is not a folder, so nothing can be created below it"),
        ("is_a_file", "a_file is a file, not a folder"),
        ("proc", ": cannot create files in /proc (No such file or directory)"),
    ],
)
def test_unwritable_output_folder_is_detected_before_training(config, tmp_path, capsys, where, reason):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"under_a_file": a_file / "sub", "is_a_file": a_file, "proc": Path("/proc/gce-reliability-test")}[where]
    started = time.perf_counter()
    assert main(["train", str(config), "--quiet", f"train.out_dir={out}"]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"gce: error: output folder {out}")
    assert err.endswith(reason)
    assert time.perf_counter() - started < 10


def test_full_disk_is_detected_before_training(config, capsys, monkeypatch):
    import gce.io.paths as paths

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(paths.os, "fsync", no_space)  # the 1 MiB probe of check_run_folder
    assert main(["train", str(config), "--quiet"]) == 1
    assert one_line_error(capsys).endswith("is not writable: No space left on device")


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(config, tmp_path, capsys, monkeypatch):
    import gce.training.checkpoint as checkpoint

    out = tmp_path / "run"
    assert main(["train", str(config), "--quiet", "sampler.batches_per_epoch=1"]) == 0
    real_fsync = checkpoint.os.fsync  # os.fsync itself: the probe of check_run_folder uses it too

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


@pytest.mark.parametrize(
    "layout, extra, message",
    [
        ("empty_root", [], "has no class folders"),
        ("empty_classes", [], "folder: 2 class folders contain no images"),
        ("empty_classes", ["--skip-bad"], "found 0 class(es); a class-disjoint train/test split needs at least 2"),
        ("one_image", [], "found 1 class(es); a class-disjoint train/test split needs at least 2"),
        ("one_image_per_class", [], "the test split has 1 readable image; retrieval evaluation needs at least 2"),
        ("one_image_per_class", ["--split", "train"], "the train split has 1 readable image"),
        ("csv_header_only", [], "found 0 class(es)"),
    ],
)
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
        code = main(
            [
                "eval",
                "--backbone",
                "raw",
                "--dataset",
                dataset,
                "--root",
                str(root),
                "--workers",
                "0",
                "--quiet",
                *extra,
            ]
        )
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
    assert (
        main(
            [
                "train",
                str(config),
                "--quiet",
                "--resume",
                "train.epochs=2",
                "model.embedding_dim=32",
                "sampler.samples_per_class=3",
            ]
        )
        == 1
    )
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
    """Files that pass their checksum but do not hold what gce writes: one line each, never a
    traceback (before: a 'model' that is not a mapping raised AttributeError)."""
    from gce.config import ModelConfig
    from gce.io import write_checksum
    from gce.models import build_model
    from gce.training.checkpoint import _FORMAT

    def save(name: str, blob) -> Path:
        torch.save(blob, tmp_path / name)
        write_checksum(tmp_path / name)  # what is tested here is the content, not the checksum
        return tmp_path / name

    model = build_model(
        ModelConfig(
            backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False, freeze_bn=False
        )
    )
    from gce.config import load_config

    (tmp_path / "c.yaml").write_text(CONFIG.format(root=tmp_path / "data", out=tmp_path / "run"))
    cfg = load_config(tmp_path / "c.yaml").to_dict()
    other = {**cfg, "model": {**cfg["model"], "embedding_dim": 32}}
    weights = model.state_dict()
    cases = {
        save(
            "other_model.pt", {"format": _FORMAT, "state": {"config": other, "model": weights}}
        ): "weights do not fit the model in its config",
        save(
            "no_config.pt", {"format": _FORMAT, "state": {"model": {}}}
        ): "not a gce checkpoint of this version (missing config)",
        save(
            "bad_config.pt",
            {"format": _FORMAT, "state": {"config": {**cfg, "model": {"backbone": "vgg"}}, "model": {}}},
        ): "bad value for 'model.backbone'",
        save("a_list.pt", [1, 2, 3]): "not a gce checkpoint",
        save("state_a_list.pt", {"format": _FORMAT, "state": [1, 2]}): "not a gce checkpoint",
        save(
            "config_a_list.pt", {"format": _FORMAT, "state": {"config": [1], "model": weights}}
        ): "not a gce checkpoint ('config' should be a mapping of config sections, found list)",
        save(
            "model_a_list.pt", {"format": _FORMAT, "state": {"config": cfg, "model": [1, 2]}}
        ): "not a gce checkpoint ('model' should be a mapping of parameter names to tensors, found list)",
        save(
            "model_of_numbers.pt", {"format": _FORMAT, "state": {"config": cfg, "model": {"w": 3}}}
        ): "'model' should be a mapping of parameter names to tensors",
        save("other_format.pt", {"format": 99, "state": {"config": cfg, "model": weights}}): "not a gce checkpoint",
        save(
            "seed_out_of_range.pt",
            {"format": _FORMAT, "state": {"config": {**cfg, "train": {**cfg["train"], "seed": -1}}, "model": weights}},
        ): "bad value for 'train.seed'",
    }
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage" * 20)
    write_checksum(tmp_path / "garbage.pt")
    cases[tmp_path / "garbage.pt"] = "cannot be read (refused by the weights-only loader: "
    (tmp_path / "empty.pt").write_bytes(b"")
    write_checksum(tmp_path / "empty.pt")
    cases[tmp_path / "empty.pt"] = "cannot be read ("
    torch.save({"format": _FORMAT, "state": {"config": cfg, "model": weights}}, tmp_path / "no_checksum.pt")
    cases[tmp_path / "no_checksum.pt"] = "no checksum file no_checksum.pt.sha256 beside it, so it cannot be verified"
    for path, message in cases.items():
        assert main(["eval", "--checkpoint", str(path), "--quiet"]) == 1
        err = one_line_error(capsys)
        assert message in err, err
        assert str(path) in err
        assert "weights_only` set to `False`" not in err  # never advise loading untrusted pickles


@pytest.mark.parametrize("name", ["model.pt", "best.pt"])
def test_model_files_are_verified_on_load(tmp_path, capsys, name):
    """Before: model.pt had no checksum; 100 KB of flipped bytes loaded silently and changed MAP@R."""
    from gce.config import ModelConfig, load_config
    from gce.models import build_model
    from gce.training.checkpoint import save_model_only

    (tmp_path / "c.yaml").write_text(CONFIG.format(root=tmp_path / "data", out=tmp_path / "run"))
    cfg = load_config(tmp_path / "c.yaml")
    model = build_model(
        ModelConfig(
            backbone="resnet18", head="gce", num_learners=2, embedding_dim=16, pretrained=False, freeze_bn=False
        )
    )
    path = tmp_path / name
    save_model_only(model, cfg, path)
    assert (tmp_path / f"{name}.sha256").exists()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 100_000] = bytes(b ^ 0xFF for b in data[middle : middle + 100_000])
    path.write_bytes(bytes(data))  # still a loadable zip: the flipped bytes are inside a tensor
    assert main(["eval", "--checkpoint", str(path), "--quiet"]) == 1
    assert f"{path}: checksum mismatch with {name}.sha256" in one_line_error(capsys)
    (tmp_path / f"{name}.sha256").unlink()
    assert main(["eval", "--checkpoint", str(path), "--quiet"]) == 1
    assert "cannot be verified" in one_line_error(capsys)


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


# ----------------------------------------------------------------------------- edge arguments
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-1"], "argument --seed: must be at least 0"),
        (["--seed", "4294967296"], "argument --seed: must be below 2**32"),
        (["--image-size", "100000"], "argument --image-size: must be at most"),
        (["--batch-size", "10000000000"], "argument --batch-size: must be at most"),
        (["--root", ""], "argument --root: the path is empty"),
    ],
)
def test_eval_edge_arguments_are_usage_errors(tmp_path, capsys, extra, message):
    base = ["eval", "--backbone", "raw", "--dataset", "folder", "--root", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        main([*base, *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_eval_crop_larger_than_resize_is_one_line_before_work(tmp_path, capsys, shape_folder):
    """Before: --image-size 64 --test-resize 32 gave a ValueError traceback from the transform."""
    assert (
        main(
            [
                "eval",
                "--backbone",
                "raw",
                "--dataset",
                "folder",
                "--root",
                str(shape_folder),
                "--image-size",
                "64",
                "--test-resize",
                "32",
                "--quiet",
            ]
        )
        == 1
    )
    assert "--test-resize=32 is smaller than the crop size 64" in one_line_error(capsys)


ABLATION = "base: tiny.yaml\nout_dir: {out}\nseeds: {seeds}\nvariants: {variants}\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ("tab", "not valid YAML (found character '\\t' that cannot start any token"),
        ("binary", "not a UTF-8 text file"),
        ("directory", "is a folder; expected a YAML ablation file"),
        ("missing", "ablation file not found"),
        ("a_list", "the top level must be a mapping"),
        ("negative_seed", "'seeds.0': Input should be greater than or equal to 0"),
        ("huge_seed", "'seeds.1': Input should be less than 4294967296"),
        ("duplicate_seed", "'seeds' lists a seed twice"),
        ("variant_escapes", "variant name '../elsewhere' cannot be a folder name"),
        ("base_is_a_folder", "is a folder; expected a YAML config file"),
    ],
)
def test_ablate_on_broken_files_is_one_line_before_any_training(config, tmp_path, capsys, content, message):
    path = tmp_path / "ablation.yaml"
    good = {"out": tmp_path / "ab", "seeds": "[0]", "variants": "{a: []}"}
    if content == "tab":
        path.write_text("base: tiny.yaml\nvariants:\n\ta: []\n")
    elif content == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    elif content == "directory":
        path.mkdir()
    elif content == "a_list":
        path.write_text("- 1\n- 2\n")
    elif content == "negative_seed":
        path.write_text(ABLATION.format(**{**good, "seeds": "[-1]"}))
    elif content == "huge_seed":
        path.write_text(ABLATION.format(**{**good, "seeds": "[0, 4294967296]"}))
    elif content == "duplicate_seed":
        path.write_text(ABLATION.format(**{**good, "seeds": "[1, 1]"}))
    elif content == "variant_escapes":
        path.write_text(ABLATION.format(**{**good, "variants": "{'../elsewhere': []}"}))
    elif content == "base_is_a_folder":
        (tmp_path / "folder.yaml").mkdir()
        path.write_text(ABLATION.format(**good).replace("tiny.yaml", "folder.yaml"))
    assert main(["ablate", str(path), "--quiet"]) == 1
    err = one_line_error(capsys)
    assert message in err, err
    assert not (tmp_path / "ab").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
@pytest.mark.parametrize("command", ["train", "ablate"])
def test_config_that_is_a_pipe_or_device_is_refused_without_blocking(tmp_path, capsys, kind, command):
    path = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        os.symlink("/dev/zero", path)  # reading it would never end
    assert main([command, str(path)]) == 1
    assert f"{path}: not a regular file (a pipe, socket or device)" in one_line_error(capsys)


@pytest.mark.parametrize("signal_kind", ["checkpoint", "abort"])
@pytest.mark.parametrize("command", ["ablate", "demo"])
def test_ctrl_c_in_ablate_and_demo_exits_130_with_the_command_to_continue(
    config, tmp_path, capsys, monkeypatch, command, signal_kind
):
    """Before: Ctrl-C in a run of `gce ablate` or `gce demo` ended as `gce: error: interrupted ...`, exit 1."""
    from gce.training.trainer import Trainer, TrainingInterrupted

    def interrupted(self):
        if signal_kind == "abort":
            raise KeyboardInterrupt
        raise TrainingInterrupted(f"interrupted: checkpoint written to {tmp_path / 'run' / 'last.pt'}")

    monkeypatch.setattr(Trainer, "run", interrupted)
    if command == "ablate":
        ablation = tmp_path / "ab.yaml"
        ablation.write_text(f"base: tiny.yaml\nout_dir: {tmp_path / 'ab'}\nseeds: [0]\nvariants: {{a: []}}\n")
        argv, again = ["ablate", str(ablation), "--quiet"], f"continue with: gce ablate {ablation}"
    else:
        argv, again = (
            ["demo", str(config), "--quiet", "--out", str(tmp_path / "demo")],
            f"continue with: gce demo {config}",
        )
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "gce: error" not in err
    assert err.splitlines()[-1].startswith(again), err
