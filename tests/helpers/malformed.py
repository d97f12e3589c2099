"""Malformed inputs for the reliability tests: broken images, odd-but-valid images, broken datasets.

``make_malformed_cases(root)`` writes every input under ``root`` and returns one :class:`Case`
each. A case either loads (``expected is None``; ``check`` says what the loaded result must look
like) or fails with a message matching ``expected`` (a regular expression) that names the file.
Dataset cases also say what ``skip_bad=True`` must do (``skipped``).

Images are small (<= 64 px) so that all cases decode in well under a second.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.data_fixtures import make_cub, make_inshop, make_sop, write_image

#: Reasons load_rgb gives (docs/datasets.md).
TRUNCATED = re.escape("truncated or corrupt image")
NOT_IMAGE = re.escape("not an image file")
ZERO = re.escape("zero-byte file")
BOMB = re.escape("exceeds Pillow's decompression-bomb limit")
ASPECT = re.escape("extreme aspect ratio")
TOO_LARGE = re.escape("too large")
SAME_FILE = re.escape("the same image file appears more than once")


@dataclass(frozen=True)
class Case:
    """One malformed (or odd but valid) input.

    kind: ``image`` (``path`` is a file for ``load_rgb``) or ``dataset`` (``path`` is a root for
    ``load_dataset(dataset, path)``).
    expected: regular expression the error message must match; ``None``: the input is valid.
    check: for valid images, called with the loaded image; raises AssertionError if it is wrong.
    skipped: datasets only: with ``skip_bad=True`` loading succeeds and a warning reports this
    many skipped items; ``None``: ``skip_bad`` changes nothing (a malformed index stays an error).
    warning: regular expression of a warning that loading must give.
    names_path: the error names the root or a file under it (split-level problems name the
    dataset and the split instead: no single file is at fault).
    """

    name: str
    kind: str
    path: Path
    expected: str | None
    dataset: str | None = None
    check: Callable[[Image.Image], None] | None = field(default=None, compare=False)
    skipped: int | None = None
    warning: str | None = None
    names_path: bool = True

    @property
    def bad(self) -> bool:
        return self.expected is not None


# ------------------------------------------------------------------------------------ encoders
def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, raw_rows: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG from raw filtered scanlines (lets a header claim any size or bit depth)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw_rows)) + _chunk(b"IEND", b"")
    )


def _cut(data: bytes, cut: int | float) -> bytes:
    """First ``cut`` bytes (int > 0), all but the last ``-cut`` bytes (int < 0), or a fraction."""
    if isinstance(cut, float):
        return data[: int(len(data) * cut)]
    return data[:cut]


def _cut_name(cut: int | float) -> str:
    if isinstance(cut, float):
        return f"{round(cut * 100)}pct"
    return f"first{cut}" if cut > 0 else f"minus{-cut}"


# -------------------------------------------------------------------------------------- checks
def _size(width: int, height: int) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert image.mode == "RGB", image.mode
        assert image.size == (width, height), image.size

    return check


def _pixels(size: tuple[int, int], where: dict[tuple[int, int], tuple[int, int, int]], tol: int = 0):
    def check(image: Image.Image) -> None:
        _size(*size)(image)
        for xy, rgb in where.items():
            got = image.getpixel(xy)
            assert all(abs(int(a) - int(b)) <= tol for a, b in zip(got, rgb, strict=True)), f"{xy}: {got} != {rgb}"

    return check


# EXIF orientation -> how the stored pixels are displayed (numpy on an H x W x 3 array), from the
# EXIF specification (where row 0 / column 0 of the stored image end up), not from Pillow.
_DISPLAY = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}
_STORE = {  # the inverse of each display transform
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, -1),
}
_QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))


def upright_target(width: int = 64, height: int = 32) -> np.ndarray:
    """What every EXIF case must load as: four coloured quadrants, wider than tall."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:] = _QUADRANTS
    return a


def _upright(tol: int) -> Callable[[Image.Image], None]:
    target = upright_target()

    def check(image: Image.Image) -> None:
        assert image.mode == "RGB" and image.size == (64, 32), (image.mode, image.size)
        got = np.asarray(image).astype(int)
        for y in (8, 24):  # quadrant centres, away from JPEG block edges
            for x in (16, 48):
                assert np.abs(got[y, x] - target[y, x]).max() <= tol, (x, y, got[y, x], target[y, x])

    return check


# ----------------------------------------------------------------------------------- image cases
def _image_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes | None, expected: str | None, check=None, file_name: str | None = None):
        path = folder / (file_name or name)
        if data is not None:
            path.write_bytes(data)
        cases.append(Case(name=name, kind="image", path=path, expected=expected, check=check))

    noise = _noise()
    jpeg = _encode(noise, "JPEG", quality=90)
    progressive = _encode(noise, "JPEG", quality=90, progressive=True)
    png = _encode(noise, "PNG")

    # Truncated files (an interrupted download), at several cut points.
    for label, data in (("jpg", jpeg), ("progressive", progressive)):
        for cut in (2, 8, 100, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, -100, -20):
            # 2 bytes: only the start marker. Cut inside the header segments (tables), Pillow
            # either fails to identify the file or reports it truncated; both are right.
            expected = NOT_IMAGE if cut == 2 else f"{TRUNCATED}|{NOT_IMAGE}" if cut in (8, 100, 0.1) else TRUNCATED
            add(f"truncated_{label}_{_cut_name(cut)}.jpg", _cut(data, cut), expected)
    for cut in (2, 8, 30):  # the signature or IHDR is cut: Pillow cannot identify the file
        add(f"truncated_png_{_cut_name(cut)}.png", _cut(png, cut), NOT_IMAGE)
    for cut in (100, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98):
        add(f"truncated_png_{_cut_name(cut)}.png", _cut(png, cut), TRUNCATED)
    # Only the 12-byte IEND chunk (or part of it) is missing: every pixel is there, so it loads.
    add("png_without_iend.png", _cut(png, -12), None, _size(64, 64))
    add("png_iend_cut.png", _cut(png, -1), None, _size(64, 64))
    for fmt, ext in (("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif")):
        data = _encode(noise, fmt)
        for cut in (0.3, 0.7):
            add(f"truncated_{ext}_{_cut_name(cut)}.{ext}", _cut(data, cut), TRUNCATED)

    # Empty and non-image files.
    for ext in ("jpg", "png", "webp"):
        add(f"zero_bytes.{ext}", b"", ZERO)
    add("text_named.jpg", b"this is a text file, not a picture\n", NOT_IMAGE)
    add("html_error_page.jpg", b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n", NOT_IMAGE)
    add("svg_named.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>', NOT_IMAGE)
    add("pdf_named.jpg", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n", NOT_IMAGE)
    add("gzipped_png.png", zlib.compress(png), NOT_IMAGE)
    add("csv_named.png", b"path,label\na.jpg,cat\n", NOT_IMAGE)
    for seed, length in ((0, 1), (1, 17), (2, 1000), (3, 4096), (4, 65536)):
        add(
            f"random_bytes_{length}.jpg",
            np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes(),
            NOT_IMAGE,
        )
    # A valid header followed by garbage.
    add(
        "jpeg_header_then_garbage.jpg",
        jpeg[:200] + np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        f"{TRUNCATED}|{NOT_IMAGE}",
    )
    add("png_signature_then_garbage.png", png[:8] + b"\0" * 500, NOT_IMAGE)
    broken_crc = bytearray(png)
    broken_crc[29] ^= 0xFF  # the IHDR checksum: Pillow refuses to identify the file
    add("png_bad_ihdr_crc.png", bytes(broken_crc), NOT_IMAGE)
    corrupt_idat = bytearray(png)
    start = png.find(b"IDAT") + 10
    corrupt_idat[start : start + 30] = bytes(b ^ 0xA5 for b in corrupt_idat[start : start + 30])
    add("png_corrupt_idat.png", bytes(corrupt_idat), TRUNCATED)
    # Damaged JPEG entropy data still decodes (libjpeg conceals it): nothing can tell it apart
    # from an odd-looking image without a reference, so it loads. Documented limitation.
    concealed = bytearray(jpeg)
    middle = len(concealed) // 2
    concealed[middle : middle + 200] = b"\0" * 200
    add("jpeg_zeroed_scan_data.jpg", bytes(concealed), None, _size(64, 64))

    # Right bytes, wrong extension: the content decides, so these load.
    add("png_named.jpg", png, None, _size(64, 64))
    add("jpeg_named.png", jpeg, None, _size(64, 64))
    add("webp_named.jpg", _encode(noise, "WEBP"), None, _size(64, 64))

    # High bit depth: scaled to 8 bits (x/257), not clipped.
    gray16 = np.zeros((4, 8), dtype=np.uint16)
    gray16[0, :4] = (0, 65535, 32896, 257 * 100)
    Image.fromarray(gray16).save(folder / "gray16.png")
    add(
        "gray16.png",
        None,
        None,
        _pixels((8, 4), {(0, 0): (0, 0, 0), (1, 0): (255, 255, 255), (2, 0): (128, 128, 128), (3, 0): (100, 100, 100)}),
    )
    rows = b"".join(b"\0" + np.tile(np.array([65535, 0, 32896], dtype=">u2"), 8).tobytes() for _ in range(8))
    add(
        "rgb48.png",
        png_bytes(8, 8, rows, bit_depth=16, color_type=2),
        None,
        _pixels((8, 8), {(3, 3): (255, 0, 128)}, tol=1),
    )
    Image.new("I;16", (8, 8), 65535).save(folder / "gray16.tif")
    add("gray16.tif", None, None, _pixels((8, 8), {(0, 0): (255, 255, 255)}))
    Image.new("I", (8, 8), 257 * 50).save(folder / "int32.tif")
    add("int32.tif", None, None, _pixels((8, 8), {(0, 0): (50, 50, 50)}))
    Image.new("F", (8, 8), 0.5).save(folder / "float32.tif")
    add("float32.tif", None, None, _pixels((8, 8), {(0, 0): (128, 128, 128)}, tol=1))

    # Palette images, with and without transparency: transparent -> white.
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    palette.putpixel((0, 0), 2)
    palette.save(folder / "palette.png")
    add("palette.png", None, None, _pixels((8, 8), {(0, 0): (0, 255, 0), (1, 1): (255, 0, 0)}))
    palette.save(folder / "palette_transparent_index.png", transparency=1)
    add("palette_transparent_index.png", None, None, _pixels((8, 8), {(0, 0): (0, 255, 0), (1, 1): (255, 255, 255)}))
    palette.save(folder / "palette_alpha_table.png", transparency=bytes([255, 128, 255]))
    add("palette_alpha_table.png", None, None, _pixels((8, 8), {(1, 1): (255, 127, 127)}, tol=1))
    palette.save(folder / "palette.gif")
    add("palette.gif", None, None, _pixels((8, 8), {(0, 0): (0, 255, 0), (1, 1): (255, 0, 0)}))

    # Other modes.
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    add("cmyk.jpg", None, None, _pixels((16, 16), {(8, 8): (255, 0, 0)}, tol=12))
    Image.new("L", (16, 16), 77).save(folder / "gray.jpg")
    add("gray.jpg", None, None, _pixels((16, 16), {(8, 8): (77, 77, 77)}, tol=3))
    Image.new("1", (8, 8), 1).save(folder / "bilevel.png")
    add("bilevel.png", None, None, _pixels((8, 8), {(0, 0): (255, 255, 255)}))
    Image.new("LA", (8, 8), (10, 0)).save(folder / "gray_alpha.png")
    add("gray_alpha.png", None, None, _pixels((8, 8), {(0, 0): (255, 255, 255)}))
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(folder / "rgba_transparent.png")
    add("rgba_transparent.png", None, None, _pixels((8, 8), {(0, 0): (255, 255, 255)}))
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(folder / "rgba_transparent.webp", lossless=True)
    add("rgba_transparent.webp", None, None, _pixels((8, 8), {(0, 0): (0, 0, 255)}))
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    add("animated.gif", None, None, _pixels((8, 8), {(0, 0): (255, 0, 0)}))  # the first frame
    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "one_pixel.png")
    add("one_pixel.png", None, None, _pixels((1, 1), {(0, 0): (1, 2, 3)}))
    Image.new("RGB", (300, 1), (9, 9, 9)).save(folder / "one_row.png")
    add("one_row.png", None, ASPECT)  # 300:1 was loaded before the aspect-ratio limit (100:1)

    # EXIF orientation 1-8, JPEG and PNG: the stored pixels are the upright target transformed so
    # that displaying them per the tag gives the target back; loading must give the target.
    target = upright_target()
    for orientation in range(1, 9):
        stored = np.ascontiguousarray(_STORE[orientation](target))
        assert np.array_equal(_DISPLAY[orientation](stored), target)
        exif = Image.Exif()
        exif[0x0112] = orientation
        for ext, options, tol in (("jpg", {"quality": 95}, 40), ("png", {}, 0)):
            name = f"exif_orientation_{orientation}.{ext}"
            Image.fromarray(stored).save(folder / name, exif=exif.tobytes(), **options)
            add(name, None, None, _upright(tol))
    exif = Image.Exif()
    exif[0x0112] = 9  # not a valid orientation: ignored
    Image.fromarray(target).save(folder / "exif_orientation_invalid.jpg", exif=exif.tobytes(), quality=95)
    add("exif_orientation_invalid.jpg", None, None, _upright(40))
    exif[0x0112] = 6
    damaged = bytearray(_encode(Image.fromarray(target), "JPEG", exif=exif.tobytes(), quality=95))
    start = damaged.find(b"Exif\0\0") + 6
    damaged[start : start + 24] = np.random.default_rng(7).integers(0, 256, 24, dtype=np.uint8).tobytes()
    add("exif_block_garbage.jpg", bytes(damaged), None, _size(64, 32))  # the tag is unreadable

    # Decompression bombs: headers claiming 10^10 pixels (well over 2 x Image.MAX_IMAGE_PIXELS).
    add("bomb_header.png", png_bytes(100_000, 100_000, b"\0" * 100), BOMB)
    bomb_jpeg = bytearray(jpeg)
    sof = bomb_jpeg.find(b"\xff\xc0")
    bomb_jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    add("bomb_header.jpg", bytes(bomb_jpeg), BOMB)
    bomb_gif = bytearray(_encode(Image.new("P", (8, 8)), "GIF"))
    bomb_gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    bomb_gif[bomb_gif.find(b",") + 5 : bomb_gif.find(b",") + 9] = struct.pack("<HH", 65535, 65535)
    add("bomb_header.gif", bytes(bomb_gif), BOMB)

    # Valid but hostile sizes: a 3 KB strip of 1 x 1,000,000 pixels passed the image check, then
    # Resize asked for 32 x 32,000,000 pixels (MemoryError). Refused from the header, before decoding.
    add("aspect_1x1000000.png", png_bytes(1, 1_000_000, b"\0\xff\xff\xff" * 1_000_000), ASPECT)
    add("aspect_1000000x1.png", png_bytes(1_000_000, 1, b"\0" + b"\x80" * 3_000_000), ASPECT)
    add("aspect_101x1.png", _encode(Image.new("RGB", (101, 1), (9, 9, 9)), "PNG"), ASPECT)
    add("aspect_1x300.gif", _encode(Image.new("P", (1, 300)), "GIF"), ASPECT)
    add("aspect_2x4000.jpg", _encode(Image.new("RGB", (2, 4000), (50, 60, 70)), "JPEG"), ASPECT)
    add("aspect_100x1.png", _encode(Image.new("RGB", (100, 1), (9, 9, 9)), "PNG"), None, _size(100, 1))  # the limit
    add("aspect_2x200.webp", _encode(Image.new("RGB", (2, 200), (9, 9, 9)), "WEBP"), None, _size(2, 200))
    # Over gce's pixel limit (128 M) but under Pillow's bomb error (179 M): only the header is read.
    add("too_large_header.png", png_bytes(12_000, 11_000, b"\0" * 100), TOO_LARGE)

    # Odd but valid file names.
    small = _encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
    for name, file_name in (
        ("name_unicode.png", "ünïcødé 画像.png"),
        ("name_spaces.png", "with  two spaces .png"),
        ("name_emoji.png", "cat 🐱.png"),
        ("name_shell_chars.png", "[a] (b) 'c' \"d\" $e &f;g.png"),
        ("name_leading_dash.png", "-rf.png"),
        ("name_long.png", "x" * 240 + ".png"),
        ("name_upper_extension.PNG", "UPPER.PNG"),
    ):
        add(name, small, None, _size(8, 8), file_name=file_name)
    latin1 = os.fsdecode(b"caf\xe9 latin-1.png")  # not valid UTF-8: a surrogate-escaped str
    add("name_not_utf8.png", small, None, _size(8, 8), file_name=latin1)

    # Things that are not regular files.
    os.mkfifo(folder / "named_pipe.jpg")  # must not block: never opened (size 0)
    add("named_pipe.jpg", None, ZERO)
    os.symlink("/dev/zero", folder / "dev_zero_link.jpg")  # must not read forever
    add("dev_zero_link.jpg", None, ZERO)
    os.symlink(folder / "does-not-exist.png", folder / "broken_link.png")
    add("broken_link.png", None, re.escape("file not found"))
    os.symlink(folder / "one_pixel.png", folder / "link_to_valid.png")
    add("link_to_valid.png", None, None, _size(1, 1))
    (folder / "folder_named.jpg").mkdir()
    add("folder_named.jpg", None, re.escape("is a folder, not an image file"))
    add("missing_file.jpg", None, re.escape("file not found"))
    return cases


# --------------------------------------------------------------------------------- dataset cases
def _replace_line(path: Path, number: int, text: str | None) -> None:
    """Replace (``None``: delete) 1-based line ``number`` of a text file."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _class_folders(root: Path, classes: dict[str, int], ext: str = "png") -> Path:
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            write_image(root / name / f"{k}.{ext}", ((c * 60) % 256, 100, 200))
    return root


def _dataset_cases(base: Path) -> list[Case]:
    base.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name, dataset, root, expected, skipped=None, warning=None, names_path=True):
        cases.append(
            Case(
                name=name,
                kind="dataset",
                path=root,
                expected=expected,
                dataset=dataset,
                skipped=skipped,
                warning=warning,
                names_path=names_path,
            )
        )

    def fresh(name: str) -> Path:
        path = base / name
        path.mkdir(parents=True)
        return path

    # Roots.
    for dataset in ("folder", "cub", "sop", "inshop", "csv"):
        add(f"{dataset}_root_missing", dataset, base / "nowhere" / dataset, re.escape("does not exist"))
    a_file = base / "a_file.txt"
    a_file.write_text("not a folder\n")
    for dataset in ("folder", "cub", "sop", "inshop"):
        add(f"{dataset}_root_is_a_file", dataset, a_file, re.escape("is a file, not a folder"))
    add("csv_root_is_a_text_file", "csv", a_file, re.escape("missing required column 'path'"))

    # A folder per class.
    root = _class_folders(fresh("folder_empty_class"), {"ant": 2, "bee": 2, "cat": 2, "dog": 2})
    (root / "empty").mkdir()
    add("folder_empty_class", "folder", root, re.escape("1 class folders contain no images") + ".*empty", skipped=1)
    root = _class_folders(fresh("folder_three_empty_classes"), {"ant": 2, "bee": 2, "cat": 2})
    for name in ("e1", "e2", "e3"):
        (root / name).mkdir()
    (root / "e3" / "notes.txt").write_text("only a note\n")  # no images: still an empty class
    add("folder_three_empty_classes", "folder", root, re.escape("3 class folders contain no images"), skipped=3)
    root = fresh("folder_single_image_class")
    _class_folders(root / "train", {"ant": 1, "bee": 2, "cat": 2})
    _class_folders(root / "test", {"dog": 2, "eel": 2})
    add(
        "folder_single_image_class",
        "folder",
        root,
        None,
        warning=re.escape("1 of 3 training classes have a single image"),
    )
    root = fresh("folder_no_class_folders")
    write_image(root / "loose.png")
    add("folder_no_class_folders", "folder", root, re.escape("has no class folders"))
    root = _class_folders(fresh("folder_one_class"), {"only": 3})
    add("folder_one_class", "folder", root, re.escape("found 1 class(es)"))
    root = fresh("folder_empty_test_folder")
    _class_folders(root / "train", {"ant": 2, "bee": 2})
    (root / "test").mkdir()
    add("folder_empty_test_folder", "folder", root, re.escape("has no class folders"))
    root = fresh("folder_only_hidden")
    _class_folders(root / ".hidden", {"x": 2})
    add("folder_only_hidden", "folder", root, re.escape("has no class folders"))

    # Split integrity: links, loops, one file in two places, pre-split layouts.
    classes = {"ant": 2, "bee": 2, "cat": 2, "dog": 2}
    root = _class_folders(fresh("folder_symlink_loop"), classes)
    os.symlink("..", root / "ant" / "loop")  # before: walked back into the root, test images in train
    add("folder_symlink_loop", "folder", root, None, warning=re.escape("did not follow 1 links to folders"))
    root = _class_folders(fresh("folder_link_to_another_class"), classes)
    os.symlink(root / "bee", root / "ant" / "more_bees")
    add("folder_link_to_another_class", "folder", root, None, warning=re.escape("did not follow 1 links"))
    root = _class_folders(fresh("folder_link_loop_in_subfolder"), classes)
    (root / "cat" / "sub").mkdir()
    write_image(root / "cat" / "sub" / "x.png")
    os.symlink("../..", root / "cat" / "sub" / "up")
    add("folder_link_loop_in_subfolder", "folder", root, None, warning=re.escape("did not follow 1 links"))
    root = _class_folders(fresh("folder_link_to_image_in_same_class"), classes)
    os.symlink("0.png", root / "ant" / "again.png")
    add(
        "folder_link_to_image_in_same_class",
        "folder",
        root,
        None,
        warning=re.escape("listed 1 files once that a class folder reaches twice"),
    )
    root = _class_folders(fresh("folder_hard_link_in_two_classes"), classes)
    os.link(root / "ant" / "0.png", root / "bee" / "also_ant.png")
    add("folder_hard_link_in_two_classes", "folder", root, SAME_FILE)
    root = _class_folders(fresh("folder_link_to_image_of_another_class"), classes)
    os.symlink(root / "dog" / "1.png", root / "cat" / "dog.png")
    add("folder_link_to_image_of_another_class", "folder", root, SAME_FILE)
    root = _class_folders(fresh("folder_class_is_a_link_to_a_class"), classes)
    os.symlink(root / "ant", root / "emu")
    add("folder_class_is_a_link_to_a_class", "folder", root, re.escape("are the same folder (a link)"))
    root = fresh("folder_presplit_file_in_both_splits")
    _class_folders(root / "train", {"ant": 2, "bee": 2})
    _class_folders(root / "test", {"cat": 2, "dog": 2})
    os.link(root / "train" / "ant" / "0.png", root / "test" / "cat" / "leak.png")
    add("folder_presplit_file_in_both_splits", "folder", root, SAME_FILE + ".*" + re.escape("1 in both train and test"))
    root = fresh("folder_train_val_layout")  # before: two classes named "train" and "val"
    _class_folders(root / "train", {"ant": 2, "bee": 2})
    _class_folders(root / "val", {"cat": 2, "dog": 2})
    add("folder_train_val_layout", "folder", root, None, warning=re.escape("as the test split"))
    root = fresh("folder_train_val_test_layout")
    for split, names in (("train", ("ant", "bee")), ("val", ("cat", "dog")), ("test", ("eel", "fox"))):
        _class_folders(root / split, dict.fromkeys(names, 2))
    add("folder_train_val_test_layout", "folder", root, None, warning=re.escape("val/ not used"))
    root = fresh("folder_split_folders_beside_classes")  # before: the extra classes were ignored
    _class_folders(root / "train", {"ant": 2, "bee": 2})
    _class_folders(root / "test", {"cat": 2, "dog": 2})
    _class_folders(root, {"emu": 2})
    add("folder_split_folders_beside_classes", "folder", root, re.escape("beside other folders (emu)"))
    root = _class_folders(fresh("folder_lone_train_folder_among_classes"), {"ant": 2, "bee": 2, "cat": 2})
    _class_folders(root / "train", {"dog": 2})
    add("folder_lone_train_folder_among_classes", "folder", root, re.escape("looks like a split folder, not a class"))
    root = fresh("folder_train_query_gallery_layout")
    for split, names in (("train", ("ant", "bee")), ("query", ("cat", "dog")), ("gallery", ("cat", "dog"))):
        _class_folders(root / split, dict.fromkeys(names, 2))
    add("folder_train_query_gallery_layout", "folder", root, re.escape("looks like a query/gallery split"))
    root = fresh("folder_only_a_train_folder")
    _class_folders(root / "train", {"ant": 2, "bee": 2})
    add("folder_only_a_train_folder", "folder", root, re.escape("holds only train/"))

    # CUB-200-2011 index files.
    def cub(name: str) -> Path:
        return make_cub(fresh(name))

    root = cub("cub_images_missing_column")
    _replace_line(root / "images.txt", 3, "3")
    add("cub_images_missing_column", "cub", root, re.escape("images.txt, line 3: expected 2 columns, found 1"))
    root = cub("cub_images_extra_column")
    _replace_line(root / "images.txt", 2, "2 001.Bird_1/Bird_1_0001.jpg extra")
    add("cub_images_extra_column", "cub", root, re.escape("images.txt, line 2: expected 2 columns, found 3"))
    root = cub("cub_images_non_integer_id")
    _replace_line(root / "images.txt", 4, "four 002.Bird_2/Bird_2_0001.jpg")
    add(
        "cub_images_non_integer_id",
        "cub",
        root,
        re.escape("images.txt, line 4: image id must be an integer, found 'four'"),
    )
    root = cub("cub_labels_non_integer_class")
    _replace_line(root / "image_class_labels.txt", 1, "1 1.5")
    add(
        "cub_labels_non_integer_class",
        "cub",
        root,
        re.escape("image_class_labels.txt, line 1: class id must be an integer, found '1.5'"),
    )
    root = cub("cub_labels_unknown_class")
    _replace_line(root / "image_class_labels.txt", 2, "2 57")
    add("cub_labels_unknown_class", "cub", root, re.escape("line 2: class id 57 is not in classes.txt"))
    root = cub("cub_classes_out_of_range")
    _replace_line(root / "classes.txt", 1, "300 300.Nope")
    add("cub_classes_out_of_range", "cub", root, re.escape("classes.txt, line 1: class id 300 is outside 1-200"))
    root = cub("cub_duplicate_image_id")
    _replace_line(root / "images.txt", 2, "1 001.Bird_1/Bird_1_0001.jpg")
    add("cub_duplicate_image_id", "cub", root, re.escape("images.txt, line 2: image id 1 is listed twice"))
    root = cub("cub_image_without_label")
    _replace_line(root / "image_class_labels.txt", 5, None)
    add("cub_image_without_label", "cub", root, re.escape("image id 5 has no class"))
    root = cub("cub_missing_images_txt")
    (root / "images.txt").unlink()
    add(
        "cub_missing_images_txt",
        "cub",
        root,
        re.escape("images.txt not found; expected the official CUB_200_2011 layout"),
    )
    root = cub("cub_images_txt_binary")
    (root / "images.txt").write_bytes(b"1 \xff\xfe\x00garbage\n")
    add("cub_images_txt_binary", "cub", root, re.escape("images.txt: not a UTF-8 text file"))
    root = cub("cub_listed_image_missing")
    (root / "images" / "002.Bird_2" / "Bird_2_0001.jpg").unlink()
    add(
        "cub_listed_image_missing",
        "cub",
        root,
        re.escape("1 of 10 listed images not found") + "(.|\n)*Bird_2_0001.jpg",
        skipped=1,
    )
    root = cub("cub_three_listed_images_missing")
    for relative in ("001.Bird_1/Bird_1_0000.jpg", "101.Bird_101/Bird_101_0001.jpg", "102.Bird_102/Bird_102_0000.jpg"):
        (root / "images" / relative).unlink()
    add("cub_three_listed_images_missing", "cub", root, re.escape("3 of 10 listed images not found"), skipped=3)
    root = cub("cub_empty_index")
    (root / "images.txt").write_text("")
    add("cub_empty_index", "cub", root, re.escape("cub: the train split has no images"), names_path=False)

    # Stanford Online Products lists.
    def sop(name: str) -> Path:
        return make_sop(fresh(name))

    root = sop("sop_missing_column")
    _replace_line(root / "Ebay_train.txt", 2, "1 1 bicycle_final/1001_0.JPG")
    add("sop_missing_column", "sop", root, re.escape("Ebay_train.txt, line 2: expected 4 columns, found 3"))
    root = sop("sop_extra_column")
    _replace_line(root / "Ebay_test.txt", 3, "8 4 1 bicycle_final/1004_1.JPG 99")
    add("sop_extra_column", "sop", root, re.escape("Ebay_test.txt, line 3: expected 4 columns, found 5"))
    root = sop("sop_non_integer_class")
    _replace_line(root / "Ebay_train.txt", 3, "2 one 2 chair_final/1001_1.JPG")
    add(
        "sop_non_integer_class",
        "sop",
        root,
        re.escape("Ebay_train.txt, line 3: class_id must be an integer, found 'one'"),
    )
    root = sop("sop_non_integer_image_id")
    _replace_line(root / "Ebay_train.txt", 2, "1.0 1 2 chair_final/1001_0.JPG")
    add("sop_non_integer_image_id", "sop", root, re.escape("image_id must be an integer, found '1.0'"))
    root = sop("sop_bad_header")
    _replace_line(root / "Ebay_train.txt", 1, "id class super path")
    add("sop_bad_header", "sop", root, re.escape("Ebay_train.txt, line 1: expected the header"))
    root = sop("sop_missing_test_list")
    (root / "Ebay_test.txt").unlink()
    add("sop_missing_test_list", "sop", root, re.escape("Ebay_test.txt not found"))
    root = sop("sop_listed_image_missing")
    (root / "chair_final" / "1001_0.JPG").unlink()
    add("sop_listed_image_missing", "sop", root, re.escape("1 of 6 listed images not found"), skipped=1)
    root = sop("sop_class_in_both_lists")
    _replace_line(root / "Ebay_test.txt", 2, "7 1 1 bicycle_final/1004_0.JPG")
    add(
        "sop_class_in_both_lists",
        "sop",
        root,
        re.escape("sop: 1 classes appear in both train and test"),
        names_path=False,
    )

    # In-Shop partition file.
    def inshop(name: str) -> Path:
        return make_inshop(fresh(name))

    root = inshop("inshop_missing_column")
    _replace_line(root / "list_eval_partition.txt", 4, "img/WOMEN/Dresses/id_00000001/02_2_front.jpg train")
    add(
        "inshop_missing_column",
        "inshop",
        root,
        re.escape("list_eval_partition.txt, line 4: expected 3 columns, found 2"),
    )
    root = inshop("inshop_extra_column")
    _replace_line(root / "list_eval_partition.txt", 5, "img/x.jpg id_00000002 train extra")
    add("inshop_extra_column", "inshop", root, re.escape("line 5: expected 3 columns, found 4"))
    root = inshop("inshop_non_integer_count")
    _replace_line(root / "list_eval_partition.txt", 1, "twelve")
    add(
        "inshop_non_integer_count",
        "inshop",
        root,
        re.escape("line 1: the image count must be an integer, found 'twelve'"),
    )
    root = inshop("inshop_count_mismatch")
    _replace_line(root / "list_eval_partition.txt", 1, "99")
    add("inshop_count_mismatch", "inshop", root, re.escape("declares 99 images but lists 13"))
    root = inshop("inshop_bad_status")
    _replace_line(root / "list_eval_partition.txt", 3, "img/WOMEN/Dresses/id_00000001/01_1_front.jpg id_00000001 val")
    add(
        "inshop_bad_status",
        "inshop",
        root,
        re.escape("line 3: evaluation_status must be one of train, query, gallery, found 'val'"),
    )
    root = inshop("inshop_missing_header")
    _replace_line(root / "list_eval_partition.txt", 2, None)
    add("inshop_missing_header", "inshop", root, re.escape("line 2: expected the header"))
    root = inshop("inshop_listed_image_missing")
    (root / "img" / "WOMEN" / "Dresses" / "id_00000003" / "02_2_front.jpg").unlink()
    add("inshop_listed_image_missing", "inshop", root, re.escape("1 of 13 listed images not found"), skipped=1)
    root = fresh("inshop_no_partition_file")
    add("inshop_no_partition_file", "inshop", root, re.escape("list_eval_partition.txt not found"))

    # CSV index.
    def csv_case(name: str, text: str | bytes, expected: str | None, skipped=None, warning=None, images=4):
        root = fresh(name)
        for k in range(images):
            write_image(root / "img" / f"{k}.jpg", ((k * 60) % 256, 50, 50))
        data = text.encode() if isinstance(text, str) else text
        (root / "labels.csv").write_bytes(data)
        add(name, "csv", root, expected, skipped=skipped, warning=warning)

    good = "path,label,split\nimg/0.jpg,a,train\nimg/1.jpg,a,train\nimg/2.jpg,b,test\nimg/3.jpg,b,test\n"
    csv_case("csv_valid_with_bom", "\ufeff" + good, None)
    csv_case(
        "csv_missing_label_column",
        "path,split\nimg/0.jpg,train\n",
        re.escape("line 1: missing required column 'label'"),
    )
    csv_case(
        "csv_missing_path_column", "file,label\nimg/0.jpg,a\n", re.escape("line 1: missing required column 'path'")
    )
    csv_case(
        "csv_row_extra_cell",
        good.replace("img/1.jpg,a,train", "img/1.jpg,a,train,oops"),
        re.escape("labels.csv, line 3: expected 3 columns, found 4"),
    )
    csv_case(
        "csv_row_missing_cell",
        good.replace("img/2.jpg,b,test", "img/2.jpg,b"),
        re.escape("labels.csv, line 4: expected 3 columns, found 2"),
    )
    csv_case("csv_empty_label", good.replace("img/3.jpg,b,test", "img/3.jpg,,test"), re.escape("line 5: empty 'label'"))
    csv_case(
        "csv_bad_split",
        good.replace("img/0.jpg,a,train", "img/0.jpg,a,validation"),
        re.escape("line 2: split must be train or test, found 'validation'"),
    )
    csv_case(
        "csv_bad_flag",
        "path,label,split,is_query\nimg/0.jpg,a,train,\nimg/1.jpg,a,train,\nimg/2.jpg,b,test,maybe\n",
        re.escape("line 4: is_query must be 0/1/true/false, found 'maybe'"),
    )
    csv_case("csv_duplicated_column", "path,label,label\nimg/0.jpg,a,a\n", re.escape("duplicated column 'label'"))
    csv_case("csv_empty_file", "", re.escape("the file is empty"))
    csv_case("csv_not_utf8", b"path,label\nimg/0.jpg,caf\xe9\n", re.escape("not a UTF-8 text file"))
    csv_case(
        "csv_listed_image_missing",
        good + "img/missing.jpg,b,test\n",
        re.escape("1 of 5 listed images not found"),
        skipped=1,
    )
    # The same image on two rows: before, a doubled test split raised Recall@1 from 78 to 100.
    csv_case(
        "csv_duplicate_row",
        good + "img/2.jpg,b,test\n",
        re.escape("labels.csv, line 6: ") + ".*" + re.escape("is listed again (first at line 4)"),
    )
    csv_case("csv_duplicate_through_dot_path", good + "./img/../img/3.jpg,b,test\n", re.escape("(first at line 5)"))
    csv_case("csv_same_image_two_classes", good + "img/0.jpg,b,train\n", re.escape("is listed again"))
    csv_case("csv_same_image_both_splits", good + "img/1.jpg,a,test\n", re.escape("is listed again"))
    csv_case(
        "csv_unterminated_quote",
        'path,label\n"img/0.jpg,a\n',
        re.escape("labels.csv, line 2: expected 2 columns, found 1"),
    )
    return cases


def make_malformed_cases(root: Path) -> list[Case]:
    """Write every malformed input under ``root`` (created if needed) and return the cases."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cases = _image_cases(root / "images") + _dataset_cases(root / "datasets")
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
