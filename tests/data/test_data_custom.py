"""Folder-per-class and CSV loaders, and the load_dataset registry."""

from __future__ import annotations

import os
import warnings

import pytest

from gce.data import DATASETS, dataset_options, load_csv, load_dataset, load_folder
from gce.errors import ConfigError, DatasetError
from helpers.data_fixtures import make_folder, write_image


def assert_disjoint_and_contiguous(splits) -> None:
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    for records in (splits.train, splits.test):
        assert sorted(set(records.labels.tolist())) == list(range(records.num_classes))


# ---------------------------------------------------------------- folder


def test_folder_seeded_class_split(tmp_path):
    root = make_folder(tmp_path / "data")
    splits = load_folder(root)
    assert splits.name == "folder"
    assert (splits.train.num_classes, splits.test.num_classes) == (3, 3)
    assert (len(splits.train), len(splits.test)) == (6, 6)
    assert_disjoint_and_contiguous(splits)
    for records in (splits.train, splits.test):
        for path, label in zip(records.paths, records.labels, strict=True):
            assert os.path.basename(os.path.dirname(path)) == records.class_names[label]
    again = load_folder(root)
    assert again.test.class_names == splits.test.class_names  # same seed, same split
    others = {tuple(load_folder(root, seed=s).test.class_names) for s in range(6)}
    assert len(others) > 1  # the seed matters
    assert load_folder(root, test_fraction=0.2).test.num_classes == 1


def test_folder_official_train_test_folders(tmp_path):
    make_folder(tmp_path / "train", classes=("ant", "bee"))
    make_folder(tmp_path / "test", classes=("cat", "dog", "eel"))
    splits = load_folder(tmp_path)
    assert splits.train.class_names == ["ant", "bee"]
    assert splits.test.class_names == ["cat", "dog", "eel"]


def test_folder_overlapping_official_split_warns(tmp_path):
    make_folder(tmp_path / "train", classes=("ant", "bee"))
    make_folder(tmp_path / "test", classes=("bee", "cat"))
    with pytest.warns(UserWarning, match="1 classes appear in both train and test"):
        load_folder(tmp_path)


def test_folder_ignores_hidden_and_counts_non_image_files(tmp_path):
    root = make_folder(tmp_path, classes=("ant", "bee"))
    (root / "ant" / "notes.txt").write_text("x")
    (root / "README.md").write_text("x")
    (root / ".DS_Store").write_text("x")
    (root / "ant" / ".hidden.jpg").write_text("x")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "x.jpg")
    write_image(root / "bee" / "UPPER.JPEG")
    write_image(root / "bee" / "nested" / "deep.png")
    with pytest.warns(UserWarning, match="ignored 2 files"):
        splits = load_folder(root)
    every = splits.train.paths + splits.test.paths
    assert len(every) == 6
    assert not any(os.path.basename(p).startswith(".") or p.endswith((".txt", ".md")) for p in every)
    assert any(p.endswith("UPPER.JPEG") for p in every) and any(p.endswith("deep.png") for p in every)


def test_folder_empty_class_folder(tmp_path):
    root = make_folder(tmp_path, classes=("ant", "bee", "cat"))
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"1 class folders contain no images: .*dog"):
        load_folder(root)
    with (
        pytest.warns(UserWarning, match=r"skipped 1 class folders without images: .*dog"),
        pytest.warns(UserWarning, match="ignored 1 files"),
    ):
        splits = load_folder(root, skip_bad=True)
    assert "dog" not in splits.train.class_names + splits.test.class_names


def test_folder_single_image_classes_warn(tmp_path):
    root = make_folder(tmp_path, classes=("ant", "bee", "cat", "dog"), per_class=1)
    with pytest.warns(UserWarning, match="2 of 2 training classes have a single image"):
        splits = load_folder(root)
    assert len(splits.train) == 2


def test_folder_needs_two_classes_and_class_folders(tmp_path):
    make_folder(tmp_path / "one", classes=("ant",))
    with pytest.raises(DatasetError, match="found 1 class"):
        load_folder(tmp_path / "one")
    write_image(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DatasetError, match=r"flat has no class folders"):
        load_folder(tmp_path / "flat")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_folder_bad_test_fraction(tmp_path, fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        load_folder(make_folder(tmp_path), test_fraction=fraction)


# ---------------------------------------------------------------- csv


def write_csv(folder, text: str, name: str = "labels.csv"):
    path = folder / name
    path.write_text(text)
    return path


def csv_images(folder, labels=("ant", "bee", "cat", "dog"), per_class: int = 2) -> list[str]:
    rows = []
    for label in labels:
        for k in range(per_class):
            write_image(folder / "img" / f"{label}{k}.png")
            rows.append(f"img/{label}{k}.png,{label}")
    return rows


def test_csv_without_split_column_is_split_by_class(tmp_path):
    rows = csv_images(tmp_path)
    path = write_csv(tmp_path, "path,label\n" + "\n".join(rows) + "\n")
    for root in (path, tmp_path):  # the file itself or its folder
        splits = load_csv(root, seed=3)
        assert (splits.train.num_classes, splits.test.num_classes) == (2, 2)
        assert_disjoint_and_contiguous(splits)
        assert all(p.startswith(str(tmp_path)) and os.path.exists(p) for p in splits.train.paths)


def test_csv_with_split_and_query_gallery_columns(tmp_path):
    csv_images(tmp_path)
    text = """path,label,split,is_query,is_gallery,comment
img/ant0.png,ant,train,0,0,x
img/ant1.png,ant,train,0,0,x
img/bee0.png,bee,TRAIN,,,x
img/bee1.png,bee,train,,,x
img/cat0.png,cat,test,1,0,x
img/cat1.png,cat,test,false,true,x
img/dog0.png,dog,test,true,False,x
img/dog1.png,dog,test,0,1,x
"""
    splits = load_csv(write_csv(tmp_path, text, "index.csv"))
    assert splits.train.class_names == ["ant", "bee"] and len(splits.train) == 4
    assert splits.test.is_query.tolist() == [True, False, True, False]
    assert splits.test.is_gallery.tolist() == [False, True, False, True]
    assert splits.test.labels.tolist() == [0, 0, 1, 1]


def test_csv_only_is_query_column_means_all_gallery(tmp_path):
    csv_images(tmp_path)
    text = "path,label,split,is_query\n" + "\n".join(
        f"img/{c}{k}.png,{c},{s},{k}" for c, s in [("ant", "train"), ("bee", "test")] for k in range(2)
    )
    splits = load_csv(write_csv(tmp_path, text))
    assert splits.test.is_query.tolist() == [False, True]
    assert splits.test.is_gallery.tolist() == [True, True]


def test_csv_missing_required_column(tmp_path):
    path = write_csv(tmp_path, "path,class\nimg/a.png,a\n")
    with pytest.raises(DatasetError, match=r"labels\.csv, line 1: missing required column 'label'"):
        load_csv(path)


def test_csv_row_errors_name_the_line(tmp_path):
    rows = csv_images(tmp_path)
    cases = {
        "path,label\n" + "\n".join(rows[:3]) + "\nimg/x.png,a,extra\n": r"line 5: expected 2 columns, found 3",
        "path,label\n" + rows[0] + "\nimg/ant1.png,\n": r"line 3: empty 'label'",
        "path,label,split\n" + rows[0] + ",valid\n": r"line 2: split must be train or test, found 'valid'",
        "path,label,split,is_query\n"
        + rows[0]
        + ",test,maybe\n": r"line 2: is_query must be 0/1/true/false, found 'maybe'",
    }
    for text, pattern in cases.items():
        with pytest.raises(DatasetError, match=r"labels\.csv, " + pattern):
            load_csv(write_csv(tmp_path, text))


def test_csv_listed_file_missing(tmp_path):
    rows = csv_images(tmp_path)
    path = write_csv(tmp_path, "path,label\n" + "\n".join(rows) + "\nimg/gone.png,ant\n")
    with pytest.raises(DatasetError) as info:
        load_csv(path)
    assert "labels.csv, line 10" in str(info.value) and "gone.png (file not found)" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 listed images"):
        assert len(load_csv(path, skip_bad=True).train) == 4


def test_csv_folder_without_labels_csv(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv not found"):
        load_csv(tmp_path)


# ---------------------------------------------------------------- registry


def test_registry_names_and_options():
    assert set(DATASETS) == {"cub", "cars196", "sop", "inshop", "folder", "csv", "emoji"}
    assert dataset_options("folder") == ["test_fraction", "seed", "skip_bad"]
    assert dataset_options("cub") == ["skip_bad"]


def test_load_dataset_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'; valid names: cub, cars196, sop"):
        load_dataset("imagenet", tmp_path)


def test_load_dataset_unknown_option(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset 'cub' has no option 'seed'; its options are: skip_bad"):
        load_dataset("cub", tmp_path, seed=1)


def test_load_dataset_bad_roots(tmp_path):
    with pytest.raises(DatasetError, match=r"folder: dataset root .*missing does not exist"):
        load_dataset("folder", tmp_path / "missing")
    afile = write_image(tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match=r"folder: dataset root .*a\.jpg is a file, not a folder"):
        load_dataset("folder", afile)
    with pytest.raises(DatasetError, match=r"csv: dataset root .*nope\.csv does not exist"):
        load_dataset("csv", tmp_path / "nope.csv")


def test_load_dataset_passes_options(tmp_path):
    root = make_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_dataset("folder", root, test_fraction=1 / 3, seed=5)
    assert splits.test.num_classes == 2


def test_load_dataset_unreadable_root(tmp_path, monkeypatch):
    # chmod 000 does not stop root (tests may run as root), so fake the permission check.
    import gce.data._common as common

    root = make_folder(tmp_path / "data")
    monkeypatch.setattr(common.os, "access", lambda path, mode: False)
    with pytest.raises(DatasetError, match=r"folder: cannot read dataset root .*data \(permission denied\)"):
        load_dataset("folder", root)
