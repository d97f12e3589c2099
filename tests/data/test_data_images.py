"""Image decoding, bad-file detection, check_records and ImageDataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gce.data.images import ImageDataset, check_records, load_rgb, scan_images, to_rgb
from gce.data.records import ImageRecords
from gce.errors import BadImageError, DatasetError
from helpers.data_fixtures import truncate, write_image, write_noise


def pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


# ---------------------------------------------------------------- conversions to RGB


def test_rgb_jpeg_loads_as_rgb(tmp_path):
    image = load_rgb(write_image(tmp_path / "a.jpg", (10, 200, 30)))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.allclose(pixel(image, (4, 4)), (10, 200, 30), atol=6)


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 0)) == (255, 0, 0)


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    Image.new("RGBA", (1, 1), (0, 0, 0, 128)).save(tmp_path / "a.png")
    value = pixel(load_rgb(tmp_path / "a.png"))
    assert all(abs(v - 127) <= 1 for v in value)


def test_la_transparent_pixel_becomes_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "a.png", transparency=1)
    palette.save(tmp_path / "a.gif", transparency=1)
    for name in ("a.png", "a.gif"):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB"
        assert pixel(image, (0, 0)) == (255, 0, 0), name
        assert pixel(image, (1, 0)) == (255, 255, 255), name


def test_palette_without_transparency(tmp_path):
    palette = Image.new("P", (1, 1))
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(tmp_path / "a.png")
    assert pixel(load_rgb(tmp_path / "a.png")) == (0, 0, 255)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "a.png")
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    assert pixel(load_rgb(tmp_path / "a.png")) == (77, 77, 77)
    assert pixel(load_rgb(tmp_path / "b.png")) == (255, 255, 255)


def test_cmyk_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    cmyk.save(tmp_path / "a.tif")
    cmyk.save(tmp_path / "a.jpg", quality=100)
    image = load_rgb(tmp_path / "a.tif")
    assert image.mode == "RGB"
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 0)) == (255, 0, 0)
    assert load_rgb(tmp_path / "a.jpg").mode == "RGB"


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert [pixel(image, (x, 0))[0] for x in range(4)] == [0, 255, 128, 1]


def test_32_bit_integer_mode_is_converted():
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert [pixel(to_rgb(wide), (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    narrow = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert pixel(to_rgb(narrow), (1, 0)) == (200, 200, 200)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "a.png", exif=exif)
    upright = load_rgb(tmp_path / "a.png")
    assert upright.size == (2, 4)
    assert pixel(upright, (1, 0)) == (255, 0, 0)  # the old top-left corner is now top-right


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (4, 2), (9, 9, 9)).save(tmp_path / "a.jpg", exif=exif)
    assert load_rgb(tmp_path / "a.jpg").size == (2, 4)


# ---------------------------------------------------------------- bad files


def assert_bad(path, reason_part: str) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert path.name in str(info.value)
    assert reason_part in str(info.value)
    assert info.value.path == str(path) and reason_part in info.value.reason
    return info.value


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_detected(tmp_path, suffix):
    path = truncate(write_noise(tmp_path / f"cut{suffix}"))
    assert_bad(path, "truncated or corrupt image")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert_bad(path, "zero-byte file")


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "nowhere.jpg", "file not found")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    assert_bad(path, "not an image file")


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert_bad(tmp_path / "dir.jpg", "is a folder")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > 2 x 100: Pillow refuses
    assert_bad(path, "decompression-bomb limit")


def test_bad_image_error_pickles_with_path_and_reason():
    error = pickle.loads(pickle.dumps(BadImageError("/d/x.jpg", "zero-byte file")))
    assert (error.path, error.reason, str(error)) == ("/d/x.jpg", "zero-byte file", "/d/x.jpg: zero-byte file")


def test_scan_images_reports_only_bad_files_in_order(tmp_path):
    good = str(write_image(tmp_path / "good.jpg"))
    empty = tmp_path / "empty.jpg"
    empty.touch()
    cut = str(truncate(write_noise(tmp_path / "cut.png")))
    paths = [good, str(empty), good, cut]
    for workers in (0, 2):
        bad = scan_images(paths, workers=workers, progress=False)
        assert [p for p, _ in bad] == [str(empty), cut]
        assert bad[0][1] == "zero-byte file" and "truncated" in bad[1][1]


# ---------------------------------------------------------------- check_records


def records_with_bad_files(tmp_path) -> ImageRecords:
    paths = [write_image(tmp_path / f"c{c}_{k}.jpg") for c in range(3) for k in range(2)]
    paths[1].write_bytes(b"")
    truncate(write_noise(paths[4]))
    return ImageRecords([str(p) for p in paths], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])


def test_check_records_fails_naming_files_and_reasons(tmp_path):
    records = records_with_bad_files(tmp_path)
    with pytest.raises(DatasetError) as info:
        check_records(records, skip_bad=False, progress=False, split="train")
    message = str(info.value)
    first, *rest = message.splitlines()
    assert "2 of 6 images" in first and "train" in first
    assert "c0_1.jpg: zero-byte file" in rest[0]
    assert "c2_0.jpg: truncated or corrupt image" in rest[1]


def test_check_records_skips_bad_files_with_warning(tmp_path):
    records = records_with_bad_files(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
        kept = check_records(records, skip_bad=True, progress=False)
    assert len(kept) == 4
    assert not any(p.endswith(("c0_1.jpg", "c2_0.jpg")) for p in kept.paths)
    assert kept.labels.tolist() == [0, 1, 1, 2] and kept.class_names == ["a", "b", "c"]


def test_check_records_returns_clean_records_unchanged(tmp_path):
    records = ImageRecords([str(write_image(tmp_path / "a.jpg"))], [0], ["a"])
    assert check_records(records, skip_bad=False, progress=False) is records


def test_check_records_rejects_empty_split():
    with pytest.raises(DatasetError, match="test split has no images"):
        check_records(ImageRecords([], [], []), skip_bad=True, progress=False, split="test")


def test_check_records_rejects_split_with_only_bad_files(tmp_path):
    (tmp_path / "a.jpg").touch()
    records = ImageRecords([str(tmp_path / "a.jpg")], [0], ["a"])
    with (
        pytest.warns(UserWarning, match="skipped 1 unreadable images"),
        pytest.raises(DatasetError, match="no readable images"),
    ):
        check_records(records, skip_bad=True, progress=False)


# ---------------------------------------------------------------- ImageDataset


def test_image_dataset_returns_tensor_and_int_label(tmp_path):
    records = ImageRecords([str(write_image(tmp_path / "a.png", (255, 0, 0)))], [0], ["a"])
    image, label = ImageDataset(records)[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8)
    assert type(label) is int and label == 0
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    transformed, _ = ImageDataset(records, transform=lambda im: im.size)[0]
    assert transformed == (8, 8)


def test_dataloader_worker_reraises_bad_image_error_with_path(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    records = ImageRecords([str(good), str(bad)], [0, 1], ["a", "b"])
    loader = torch.utils.data.DataLoader(ImageDataset(records), batch_size=2, num_workers=1)
    with pytest.raises(BadImageError) as info:
        next(iter(loader))
    assert str(bad) in str(info.value) and "zero-byte file" in str(info.value)
    assert info.value.path == str(bad) and info.value.reason == "zero-byte file"
