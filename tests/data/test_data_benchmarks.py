"""CUB-200-2011, Cars196, SOP and In-Shop loaders on tiny trees in the official layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from gce.data import load_cars196, load_cub, load_dataset, load_inshop, load_sop
from gce.data.records import ImageRecords
from gce.errors import DatasetError
from helpers.data_fixtures import make_cars, make_cub, make_inshop, make_sop, write_image


def assert_contiguous(records: ImageRecords) -> None:
    assert sorted(set(records.labels.tolist())) == list(range(records.num_classes))


def assert_class_disjoint(splits) -> None:
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    assert_contiguous(splits.train)
    assert_contiguous(splits.test)


def class_of(records: ImageRecords, i: int) -> str:
    return records.class_names[records.labels[i]]


# ---------------------------------------------------------------- CUB-200-2011


def test_cub_split_by_class_id(tmp_path):
    splits = load_cub(make_cub(tmp_path))
    assert splits.name == "cub"
    assert splits.train.class_names == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert splits.test.class_names == ["101.Bird_101", "102.Bird_102"]
    assert (len(splits.train), len(splits.test)) == (6, 4)
    assert_class_disjoint(splits)
    for records in (splits.train, splits.test):
        for i, path in enumerate(records.paths):
            assert os.path.exists(path)
            assert os.path.basename(os.path.dirname(path)) == class_of(records, i)
        assert records.is_query is None and records.is_gallery is None


def test_cub_accepts_parent_of_cub_200_2011(tmp_path):
    splits = load_dataset("cub", make_cub(tmp_path, nested=True))
    assert splits.train.num_classes == 3


def test_cub_listed_image_missing(tmp_path):
    root = make_cub(tmp_path)
    os.remove(root / "images/002.Bird_2/Bird_2_0001.jpg")
    with pytest.raises(DatasetError) as info:
        load_cub(root)
    message = str(info.value)
    assert "1 of 10 listed images not found" in message.splitlines()[0]
    assert "images.txt, line 4" in message and "Bird_2_0001.jpg (file not found)" in message
    with (
        pytest.warns(UserWarning, match="skipped 1 listed images"),
        pytest.warns(UserWarning, match="1 of 3 training classes have a single image"),
    ):
        splits = load_cub(root, skip_bad=True)
    assert len(splits.train) == 5


def test_cub_row_with_extra_column(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    lines[2] += " extra"
    (root / "images.txt").write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"images\.txt, line 3: expected 2 columns, found 3"):
        load_cub(root)


def test_cub_bad_ids(tmp_path):
    root = make_cub(tmp_path)
    text = (root / "image_class_labels.txt").read_text()
    (root / "image_class_labels.txt").write_text(text.replace("5 3\n", "5 x3\n"))
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt, line 5: class id must be an integer, found 'x3'"):
        load_cub(root)
    (root / "image_class_labels.txt").write_text(text.replace("5 3\n", "5 150\n"))
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt, line 5: class id 150 is not in classes\.txt"):
        load_cub(root)


def test_cub_missing_index_file(tmp_path):
    root = make_cub(tmp_path)
    os.remove(root / "classes.txt")
    with pytest.raises(DatasetError, match=r"classes\.txt not found; expected the official CUB_200_2011 layout"):
        load_cub(root)


def test_cub_without_test_classes(tmp_path):
    with pytest.raises(DatasetError, match="cub: the test split has no images"):
        load_cub(make_cub(tmp_path, class_ids=(1, 2)))


def test_cub_single_image_class_is_kept_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="3 of 3 training classes have a single image"):
        splits = load_cub(make_cub(tmp_path, per_class=1))
    assert len(splits.train) == 3


# ---------------------------------------------------------------- Cars196


def test_cars196_split_by_class_id(tmp_path):
    splits = load_cars196(make_cars(tmp_path))
    assert splits.train.class_names == ["Maker Model 1 2012", "Maker Model 2 2012", "Maker Model 98 2012"]
    assert splits.test.class_names == ["Maker Model 99 2012", "Maker Model 196 2012"]
    assert (len(splits.train), len(splits.test)) == (6, 4)
    assert_class_disjoint(splits)
    assert splits.train.paths[0].endswith(os.path.join("car_ims", "000001.jpg"))


def test_cars196_missing_image(tmp_path):
    root = make_cars(tmp_path)
    os.remove(root / "car_ims" / "000003.jpg")
    with pytest.raises(DatasetError) as info:
        load_cars196(root)
    assert "cars_annos.mat, annotation 3" in str(info.value) and "000003.jpg (file not found)" in str(info.value)


def test_cars196_mat_without_annotations(tmp_path):
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"class_names": np.array(["a"], dtype=object)})
    with pytest.raises(DatasetError, match=r"cars_annos\.mat: no variable 'annotations'"):
        load_cars196(tmp_path)


def test_cars196_annotation_without_class_field(tmp_path):
    annotations = np.zeros((1, 1), dtype=[("relative_im_path", object)])
    annotations[0, 0]["relative_im_path"] = "car_ims/000001.jpg"
    names = np.array([["a"]], dtype=object)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    with pytest.raises(DatasetError, match=r"cars_annos\.mat: annotations lack the field 'class'"):
        load_cars196(tmp_path)


def test_cars196_corrupt_mat(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(DatasetError, match=r"cars_annos\.mat: cannot read MATLAB file"):
        load_cars196(tmp_path)


# ---------------------------------------------------------------- Stanford Online Products


def test_sop_official_lists(tmp_path):
    splits = load_sop(make_sop(tmp_path))
    assert (len(splits.train), splits.train.num_classes) == (6, 3)
    assert (len(splits.test), splits.test.num_classes) == (4, 2)
    assert splits.train.class_names == ["chair_final/1", "bicycle_final/2", "chair_final/3"]
    assert_class_disjoint(splits)
    assert class_of(splits.train, 0) == "chair_final/1"


def test_sop_bad_header(tmp_path):
    root = make_sop(tmp_path)
    text = (root / "Ebay_test.txt").read_text()
    (root / "Ebay_test.txt").write_text(text.replace("super_class_id ", ""))
    with pytest.raises(DatasetError, match=r"Ebay_test\.txt, line 1: expected the header"):
        load_sop(root)


def test_sop_missing_column_and_bad_class_id(tmp_path):
    root = make_sop(tmp_path)
    lines = (root / "Ebay_train.txt").read_text().splitlines()
    broken = lines.copy()
    broken[3] = " ".join(broken[3].split()[:3])
    (root / "Ebay_train.txt").write_text("\n".join(broken))
    with pytest.raises(DatasetError, match=r"Ebay_train\.txt, line 4: expected 4 columns, found 3"):
        load_sop(root)
    broken = lines.copy()
    broken[2] = broken[2].replace(" 1 ", " one ", 1)
    (root / "Ebay_train.txt").write_text("\n".join(broken))
    with pytest.raises(DatasetError, match=r"Ebay_train\.txt, line 3: class_id must be an integer, found 'one'"):
        load_sop(root)


def test_sop_overlapping_lists_are_rejected(tmp_path):
    with pytest.raises(DatasetError, match="1 classes appear in both train and test"):
        load_sop(make_sop(tmp_path, train_classes=(1, 2), test_classes=(2, 3)))


def test_sop_missing_list(tmp_path):
    root = make_sop(tmp_path)
    os.remove(root / "Ebay_test.txt")
    with pytest.raises(DatasetError, match=r"Ebay_test\.txt not found"):
        load_sop(root)


# ---------------------------------------------------------------- In-Shop


@pytest.mark.parametrize("release_layout", [False, True])
def test_inshop_query_gallery_masks_and_shared_labels(tmp_path, release_layout):
    splits = load_inshop(make_inshop(tmp_path, release_layout=release_layout))
    train, test = splits.train, splits.test
    assert (len(train), train.num_classes) == (5, 2)
    assert train.is_query is None and train.is_gallery is None
    assert (len(test), test.num_classes) == (8, 3)
    assert test.is_query.tolist() == [True, False, False, True, True, False, False, True]
    assert test.is_gallery.tolist() == [not q for q in test.is_query.tolist()]
    assert_class_disjoint(splits)
    for label in range(test.num_classes):  # each item's queries and gallery images share its label
        members = test.labels == label
        assert (members & test.is_query).any() and (members & test.is_gallery).any()
    assert test.class_names == ["id_00000003", "id_00000004", "id_00000005"]
    assert all(os.path.exists(p) for p in test.paths)


def test_inshop_count_mismatch(tmp_path):
    root = make_inshop(tmp_path)
    path = root / "list_eval_partition.txt"
    path.write_text(path.read_text().replace("13\n", "14\n", 1))
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt, line 1: declares 14 images but lists 13"):
        load_inshop(root)


def test_inshop_bad_status_and_missing_column(tmp_path):
    root = make_inshop(tmp_path)
    path = root / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    bad = lines.copy()
    bad[7] = bad[7].replace("query", "probe")
    path.write_text("\n".join(bad))
    with pytest.raises(
        DatasetError, match=r"line 8: evaluation_status must be one of train, query, gallery, found 'probe'"
    ):
        load_inshop(root)
    bad = lines.copy()
    bad[4] = bad[4].rsplit(maxsplit=1)[0]
    path.write_text("\n".join(bad))
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt, line 5: expected 3 columns, found 2"):
        load_inshop(root)


def test_inshop_missing_image(tmp_path):
    root = make_inshop(tmp_path)
    os.remove(root / "img/WOMEN/Dresses/id_00000004/02_2_front.jpg")
    with pytest.raises(DatasetError) as info:
        load_inshop(root)
    assert "list_eval_partition.txt, line 12" in str(info.value)
    assert "02_2_front.jpg (file not found)" in str(info.value)


def test_inshop_query_without_gallery_warns(tmp_path):
    root = make_inshop(tmp_path)
    path = root / "list_eval_partition.txt"
    text = path.read_text()
    path.write_text(text.replace("id_00000005      gallery", "id_00000005      query"))
    with pytest.warns(UserWarning, match="2 query images have no gallery image"):
        load_inshop(root)


# ---------------------------------------------------------------- roots


@pytest.mark.parametrize("name", ["cub", "cars196", "sop", "inshop"])
def test_missing_and_file_roots(tmp_path, name):
    with pytest.raises(DatasetError, match=f"{name}: dataset root .*nowhere does not exist"):
        load_dataset(name, tmp_path / "nowhere")
    afile = write_image(tmp_path / "afile.jpg")
    with pytest.raises(DatasetError, match=f"{name}: dataset root .*afile.jpg is a file, not a folder"):
        load_dataset(name, afile)
