"""Bad data: every malformed input of tests/helpers/malformed.py loads correctly or fails with a clear
message naming the file and the problem; skip_bad skips and counts; nothing crashes or hangs."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from gce.cli import main
from gce.data import load_dataset
from gce.data.images import check_records, load_rgb
from gce.data.records import ImageRecords
from gce.errors import BadImageError, DatasetError, GceError
from helpers.malformed import Case, make_malformed_cases

# Written once at collection (about 0.5 s): the parametrisation needs the cases' names.
_ROOT = Path(tempfile.mkdtemp(prefix="gce-malformed-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
CASES = make_malformed_cases(_ROOT)
IMAGE_CASES = [c for c in CASES if c.kind == "image"]
DATASET_CASES = [c for c in CASES if c.kind == "dataset"]
CASE_TIMEOUT_S = 20


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (instead of hanging the suite) if a case blocks, e.g. reading a pipe or /dev/zero."""

    def on_alarm(signum, frame):  # signal handler signature
        raise TimeoutError(f"no result after {CASE_TIMEOUT_S} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_generator_covers_the_faults():
    assert len(CASES) >= 100
    names = " ".join(c.name for c in CASES)
    for fault in (
        "truncated_jpg",
        "truncated_png",
        "zero_bytes",
        "png_named.jpg",
        "text_named.jpg",
        "random_bytes",
        "gray16",
        "palette_transparent",
        "cmyk",
        "exif_orientation_8",
        "bomb_header",
        "name_unicode",
        "folder_empty_class",
        "folder_single_image_class",
        "cub_images_missing_column",
        "sop_extra_column",
        "inshop_missing_column",
        "csv_row_extra_cell",
        "non_integer",
        "root_missing",
        "root_is_a_file",
    ):
        assert fault in names, fault
    assert sum(c.bad for c in IMAGE_CASES) >= 50 and sum(not c.bad for c in IMAGE_CASES) >= 40


# ------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_image_case(case: Case):
    if not case.bad:
        image = load_rgb(case.path)
        assert image.mode == "RGB"
        if case.check is not None:
            case.check(image)
        return
    with pytest.raises(BadImageError) as info:
        load_rgb(case.path)
    error = info.value
    assert error.path == str(case.path)
    assert str(error) == f"{case.path}: {error.reason}"  # names the file, then the problem
    assert re.fullmatch(case.expected, error.reason.split(" (")[0]), error.reason
    assert "\n" not in str(error)


def _bad_and_good(cases: list[Case]) -> tuple[set[str], set[str]]:
    return {str(c.path) for c in cases if c.bad}, {str(c.path) for c in cases if not c.bad}


def test_skip_bad_counts_every_unreadable_image_and_keeps_every_good_one():
    records = ImageRecords(
        paths=[str(c.path) for c in IMAGE_CASES],
        labels=np.arange(len(IMAGE_CASES)) % 4,
        class_names=[f"class{c}" for c in range(4)],
    )
    bad, good = _bad_and_good(IMAGE_CASES)
    with pytest.raises(DatasetError) as info:
        check_records(records, skip_bad=False, progress=False)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{len(bad)} of {len(IMAGE_CASES)} images in the split split cannot be read")
    assert len(lines) == 1 + 5 + 1 and lines[-1] == f"  ... and {len(bad) - 5} more"
    with pytest.warns(UserWarning, match=rf"skipped {len(bad)} unreadable images of {len(IMAGE_CASES)}"):
        kept = check_records(records, skip_bad=True, progress=False, workers=2)
    assert set(kept.paths) == good  # no silent drop, no bad image kept
    assert len(kept) + len(bad) == len(records)


def test_folder_dataset_of_all_cases_through_the_loader_and_the_cli(tmp_path, capsys):
    """The image cases as one class folder of a dataset: the loader lists every file with an image
    extension, decoding finds the bad ones; gce eval fails naming them, or skips and counts them."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    os.symlink(IMAGE_CASES[0].path.parent, root / "train" / "everything")  # followed by the loader
    for name, color in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        for k in range(3):
            from helpers.data_fixtures import write_image

            write_image(root / "test" / name / f"{k}.png", color)
            write_image(root / "train" / f"plain_{name}" / f"{k}.png", color)
    splits = load_dataset("folder", root)
    listed = set(splits.train.paths)
    on_disk = [c for c in IMAGE_CASES if c.path.name in {Path(p).name for p in listed}]
    # Only what is not a file with an image name is not listed: a folder named .jpg, a missing file;
    # and one_pixel.png, listed already through link_to_valid.png (one file is one image).
    assert {c.name for c in IMAGE_CASES} - {c.name for c in on_disk} == {
        "folder_named.jpg",
        "missing_file.jpg",
        "one_pixel.png",
    }
    bad = [c for c in on_disk if c.bad]
    with pytest.warns(UserWarning, match=rf"skipped {len(bad)} unreadable images of {len(listed)} in the split"):
        kept = check_records(splits.train, skip_bad=True, progress=False)
    assert len(kept) == len(listed) - len(bad)

    capsys.readouterr()
    base = [
        "eval",
        "--backbone",
        "raw",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--split",
        "train",
        "--workers",
        "0",
        "--quiet",
        "--no-clustering",
        "--image-size",
        "16",
    ]
    assert main(base) == 1
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert first.startswith(f"gce: error: {len(bad)} of {len(listed)} images in the train split cannot be read")
    assert rest and all(line.startswith("  ") for line in rest)  # the first few files, indented
    with pytest.warns(UserWarning, match=rf"skipped {len(bad)} unreadable images"):
        assert main([*base, "--skip-bad"]) == 0
    assert f"({len(listed) - len(bad)} images" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- datasets
def _image_files(root: Path) -> set[str]:
    from gce.data.images import is_image_file

    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files if is_image_file(f)}


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.name)
def test_dataset_case(case: Case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            splits = load_dataset(case.dataset, case.path)
            error = None
        except GceError as exc:
            splits, error = None, exc
    messages = [str(w.message) for w in caught]
    if not case.bad:
        assert error is None, error
        assert len(splits.train) and len(splits.test)
        if case.warning:
            assert any(re.search(case.warning, m) for m in messages), messages
    else:
        assert isinstance(error, DatasetError), error
        text = str(error)
        assert re.search(case.expected, text), text
        if case.names_path:
            assert str(case.path) in text  # names the root or the index file under it
        if case.skipped is None:
            assert "\n" not in text
        else:  # a count, then the first files: "  <index>, line N: <path> (file not found)"
            assert all(line.startswith("  ") for line in text.splitlines()[1:])

    # skip_bad: skips and counts what it can (missing files, empty class folders); a malformed
    # index or root stays an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            skipped = load_dataset(case.dataset, case.path, skip_bad=True)
            error_skip = None
        except GceError as exc:
            skipped, error_skip = None, exc
    if case.skipped is None:
        assert (error_skip is None) == (error is None)
        if error is not None:
            assert str(error_skip) == str(error)
        return
    assert error_skip is None, error_skip
    counts = [int(m.group(1)) for w in caught if (m := re.search(r"skipped (\d+) ", str(w.message)))]
    assert counts == [case.skipped], [str(w.message) for w in caught]
    loaded = set(skipped.train.paths) | set(skipped.test.paths)
    assert loaded == _image_files(case.path)  # everything on disk is used: no silent drop


# ------------------------------------------------------------------------------- through the CLI
def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


CLI_CASES = [
    ("folder", "folder_root_missing"),
    ("folder", "folder_root_is_a_file"),
    ("folder", "folder_empty_class"),
    ("folder", "folder_one_class"),
    ("cub", "cub_images_missing_column"),
    ("cub", "cub_images_non_integer_id"),
    ("sop", "sop_extra_column"),
    ("inshop", "inshop_count_mismatch"),
    ("csv", "csv_bad_split"),
    ("csv", "csv_not_utf8"),
]


@pytest.mark.parametrize("dataset, name", CLI_CASES, ids=[n for _, n in CLI_CASES])
def test_cli_eval_on_malformed_dataset_is_one_line(dataset, name, capsys):
    case = _case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            ["eval", "--backbone", "raw", "--dataset", dataset, "--root", str(case.path), "--workers", "0", "--quiet"]
        )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1 and captured.err.startswith("gce: error: "), captured.err
    assert re.search(case.expected, captured.err)
    assert captured.out == ""


def test_cli_subprocess_truncated_image_one_error_line_no_traceback(tmp_path):
    """A real process (warnings, DataLoader, interpreter exit included): exit 1, one error line."""
    signal.alarm(150)  # importing torch in a new process takes longer than a case on a loaded machine
    from helpers.data_fixtures import truncate, write_image, write_noise

    root = tmp_path / "photos dir"  # a space in the root
    for split, names in (("train", ("a", "b")), ("test", ("c", "d"))):
        for name in names:
            for k in range(2):
                write_image(root / split / name / f"{k}.jpg", (k * 90, 20, 200))
    truncate(write_noise(root / "train" / "a" / "ünïcødé broken.jpg", side=64), keep=0.5)
    truncate(write_noise(root / "train" / "b" / "broken.png", side=64), keep=0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "gce",
            "eval",
            "--backbone",
            "raw",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--split",
            "train",
            "--workers",
            "0",
            "--quiet",
            "--no-clustering",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    lines = process.stderr.splitlines()
    assert lines[0] == (
        "gce: error: 2 of 6 images in the train split cannot be read"
        " (fix or delete them, or set skip_bad to leave them out):"
    )
    assert len(lines) == 3 and all(line.startswith("  ") for line in lines[1:]), process.stderr
    assert re.search(r"ünïcødé broken\.jpg: truncated or corrupt image \(", lines[1])
    assert re.search(r"broken\.png: truncated or corrupt image \(", lines[2])
