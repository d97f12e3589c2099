"""Decoding images robustly, scanning a dataset for bad files, and the torch ``Dataset``.

Every failure to read an image becomes a :class:`~gce.errors.BadImageError` that names the file
and the problem, so a corrupt file deep inside a benchmark is reported as one readable line rather
than a Pillow traceback from inside a DataLoader worker.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import to_tensor
from tqdm.auto import tqdm

from gce.data.png_pixels import png_pixel_data_problem
from gce.data.records import ImageRecords
from gce.errors import BadImageError, DatasetError

#: File extensions treated as images when a folder is scanned (compared lower-cased).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: How many bad files a :class:`DatasetError` lists before summarising the rest.
MAX_LISTED = 5

_WHITE = (255, 255, 255)

#: Longest side / shortest side accepted. Resizing scales the short side to the crop size, so a
#: 1 x 1,000,000 strip (a 3 KB PNG) would become 32 x 32,000,000 pixels: refused before decoding.
#: Panoramas (about 10:1) pass; at 100:1 a 256-pixel resize is 256 x 25,600 pixels (20 MB).
MAX_ASPECT_RATIO = 100

#: Decoded pixels accepted (width x height), below Pillow's own decompression-bomb limit
#: (about 179 M): a 100-megapixel photo passes, a header claiming more is refused before decoding.
MAX_PIXELS = 128_000_000


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return it as an 8-bit RGB image, upright per its EXIF tag.

    Grayscale, palette, CMYK and 16-bit images are converted; anything with transparency is
    composited onto white. Raises :class:`BadImageError` naming the file and the problem.
    """
    path = os.fspath(path)
    with _open_decoded(path) as image:
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block should not cost us a readable image
            upright = image
        try:
            return to_rgb(upright)
        except (OSError, ValueError) as err:
            raise BadImageError(path, f"cannot convert {upright.mode} image to RGB ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB, transparency onto white."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA", "P") or "transparency" in image.info:
        return _composite_on_white(image.convert("RGBA"))
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, LAB, ...


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit int / float) grayscale to 8 bits instead of clipping at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.size and values.max() > 255):
        values = values / 257.0  # 65535 -> 255 exactly
    elif image.mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0  # float images are usually in [0, 1]
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


class _open_decoded:
    """Context manager: open ``path`` with Pillow and decode every pixel, or raise BadImageError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        path = self.path
        _check_file(path)
        try:
            with warnings.catch_warnings():  # sizes are checked below, with a one-line reason
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.image = Image.open(path)
            _check_dimensions(self.image.size)  # from the header: before decoding any pixel
            self.image.load()  # Image.open is lazy: truncation only shows when pixels are decoded
            # Pillow fills a PNG whose zlib stream ends early with black rows, without an error.
            problem = png_pixel_data_problem(path) if self.image.format == "PNG" else None
            if problem is not None:
                raise BadImageError(path, f"truncated or corrupt image ({problem})")
            return self.image
        except BadImageError:
            self._close()
            raise
        except _HostileSize as err:
            self._close()
            raise BadImageError(path, str(err)) from None
        except Image.DecompressionBombError as err:
            self._close()
            raise BadImageError(path, "exceeds Pillow's decompression-bomb limit") from err
        except UnidentifiedImageError as err:
            self._close()
            raise BadImageError(path, "not an image file") from err
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
            self._close()
            raise BadImageError(path, f"truncated or corrupt image ({_describe(err)})") from err

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None


class _HostileSize(Exception):
    """A valid image whose size would exhaust memory once resized."""


def dimension_problem(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused before decoding, or None: an
    extreme aspect ratio or too many pixels (the limits above). Shared with ``gce serve``'s uploads."""
    try:
        _check_dimensions((width, height))
    except _HostileSize as err:
        return str(err)
    return None


def _check_dimensions(size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise _HostileSize(f"empty image ({width} x {height} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise _HostileSize(
            f"extreme aspect ratio ({width} x {height} pixels; at most 1:{MAX_ASPECT_RATIO} is accepted)"
        )
    if width * height > MAX_PIXELS:
        raise _HostileSize(
            f"too large ({width} x {height} = {width * height:,} pixels; at most {MAX_PIXELS:,} are accepted)"
        )


def _check_file(path: str) -> None:
    """Reject paths that cannot hold an image before Pillow sees them (clearer messages)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as err:
        raise BadImageError(path, "file not found") from err
    except OSError as err:
        raise BadImageError(path, f"cannot read file ({err.strerror or err})") from err
    if os.path.isdir(path):
        raise BadImageError(path, "is a folder, not an image file")
    if size == 0:
        raise BadImageError(path, "zero-byte file")
    if not os.access(path, os.R_OK):
        raise BadImageError(path, "cannot read file (permission denied)")


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return text if text else type(err).__name__


def check_image(path: str | os.PathLike) -> str | None:
    """Decode ``path`` fully; return the reason it is unreadable, or ``None`` if it is fine."""
    try:
        with _open_decoded(os.fspath(path)):
            return None
    except BadImageError as err:
        return err.reason


def scan_images(paths: Sequence[str], workers: int = 0, progress: bool = True) -> list[tuple[str, str]]:
    """Fully decode every image and return ``(path, reason)`` for each unreadable one.

    ``workers > 0`` decodes in that many threads (Pillow releases the GIL while decoding).
    The result keeps the order of ``paths``.
    """
    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress)
    try:
        if workers > 0:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                reasons = list(_tick(pool.map(check_image, paths), bar))
        else:
            reasons = list(_tick(map(check_image, paths), bar))
    finally:
        bar.close()
    return [(str(p), r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def _tick(results: Iterable, bar: tqdm) -> Iterable:
    for result in results:
        bar.update(1)
        yield result


def check_records(
    records: ImageRecords,
    skip_bad: bool,
    progress: bool = True,
    *,
    split: str = "split",
    workers: int = 0,
) -> ImageRecords:
    """Decode every image of ``records``; fail on unreadable ones or, with ``skip_bad``, drop them.

    Raises :class:`DatasetError` when the split is empty (before or after skipping), or when bad
    images are found and ``skip_bad`` is false; the message's first line gives the count and the
    following lines name the first few files with their reasons.
    """
    if len(records) == 0:
        raise DatasetError(f"the {split} split has no images")
    bad = scan_images(records.paths, workers=workers, progress=progress)
    if not bad:
        return records
    if not skip_bad:
        raise DatasetError(bad_images_message(bad, len(records), split))
    warnings.warn(
        f"skipped {len(bad)} unreadable images of {len(records)} in the {split} split "
        f"(first: {bad[0][0]}: {bad[0][1]})",
        stacklevel=2,
    )
    bad_paths = {p for p, _ in bad}
    keep = np.array([i for i, p in enumerate(records.paths) if p not in bad_paths], dtype=np.int64)
    if keep.size == 0:
        raise DatasetError(f"the {split} split has no readable images ({len(bad)} unreadable)")
    return records.subset(keep)


def bad_images_message(bad: Sequence[tuple[str, str]], total: int, split: str) -> str:
    """A summary line, then one ``path: reason`` line for each of the first few bad images."""
    lines = [
        (
            f"{len(bad)} of {total} images in the {split} split cannot be read"
            f" (fix or delete them, or set skip_bad to leave them out):"
        )
    ]
    lines += [f"  {path}: {reason}" for path, reason in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return "\n".join(lines)


class ImageDataset(torch.utils.data.Dataset):
    """Images of one split as ``(transformed image, label)`` pairs.

    A file that cannot be read raises :class:`BadImageError` naming it, also from a DataLoader
    worker process. Without a ``transform`` the image is returned as a float tensor in [0, 1].
    """

    def __init__(self, records: ImageRecords, transform: Callable[[Image.Image], object] | None = None) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = load_rgb(self.records.paths[index])
        sample = self.transform(image) if self.transform is not None else to_tensor(image)
        return sample, int(self.records.labels[index])

    @property
    def labels(self) -> np.ndarray:
        """Per-image labels, for samplers that must not decode images."""
        return self.records.labels
