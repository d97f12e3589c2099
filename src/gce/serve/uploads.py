"""Turning untrusted upload bytes into an RGB image, or a one-line 4xx :class:`RequestError`.

Checks, cheapest first: size in bytes, the declared content type, the format (only common raster
formats; Pillow's other plugins, e.g. EPS which calls Ghostscript, are never tried), the pixel count
from the header (before a single pixel is decoded: the decompression-bomb guard), then a full decode
(a truncated file only fails here). The bytes stay in memory: no temporary file is ever written.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from gce.data.images import dimension_problem, to_rgb
from gce.serve.errors import RequestError

#: Pillow formats an upload may have.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

#: Declared part content types accepted besides ``image/*``: what clients send for unknown files.
GENERIC_CONTENT_TYPES = frozenset({"", "application/octet-stream"})


def check_content_type(content_type: str | None) -> None:
    """Refuse a part that says it is something other than an image (HTTP 415)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind in GENERIC_CONTENT_TYPES:
        return
    raise RequestError(
        415, f"unsupported content type {kind!r} for the image: send an image ({', '.join(ACCEPTED_FORMATS)})"
    )


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully into an upright 8-bit RGB image (transparency onto white)."""
    if not data:
        raise RequestError(400, "the uploaded image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise RequestError(413, f"upload of {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(
                        413,
                        f"image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels",
                    )
                problem = dimension_problem(width, height)  # the training data's rule (aspect ratio)
                if problem is not None:
                    raise RequestError(400, f"image: {problem}")
                image.load()  # lazy open: truncation only shows when the pixels are decoded
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception:  # a malformed EXIF block should not cost a readable image
                    upright = image
                return to_rgb(upright)
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard fired first, when opening
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"image of {claimed.group(1)} pixels" if claimed else "image"
        # Pillow fires above twice its MAX_IMAGE_PIXELS: that, if lower than ours, is the limit passed.
        limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels
        raise RequestError(413, f"{size} is over the limit of {limit} pixels") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"not an image file (accepted: {', '.join(ACCEPTED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        detail = str(exc).strip() or type(exc).__name__
        raise RequestError(400, f"truncated or corrupt image ({detail})") from None
