"""Whether a PNG holds all of its pixel data.

Pillow decodes a PNG whose compressed stream ends early (a valid zlib stream that inflates to fewer
bytes than the header's size needs) without an error, leaving the missing rows black. Here the
IDAT stream is inflated again, counted and never kept (1 MiB at a time), and compared with the
size the header implies.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

__all__ = ["png_pixel_data_problem"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
#: Adam7 passes: (x0, y0, dx, dy).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_STEP = 1 << 20


def _rows_size(width: int, height: int, bits: int) -> int:
    """Filtered scanlines: one filter byte and ceil(width * bits / 8) bytes per row."""
    return height * (1 + (width * bits + 7) // 8) if width and height else 0


def expected_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    if not interlaced:
        return _rows_size(width, height, bits_per_pixel)
    return sum(
        _rows_size(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy)), bits_per_pixel)
        for x0, y0, dx, dy in _ADAM7
    )


def png_pixel_data_problem(path: str) -> str | None:
    """Why the PNG at ``path`` lacks pixel data (one phrase), or None when it is all there."""
    with open(path, "rb") as fh:
        if fh.read(8) != _SIGNATURE:
            return None  # not a PNG after all: Pillow's verdict stands
        head = fh.read(8)
        if len(head) < 8 or head[4:] != b"IHDR":
            return "no IHDR header"
        width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", fh.read(13))
        if color not in _CHANNELS:
            return None  # Pillow refuses those itself
        expected = expected_size(width, height, depth * _CHANNELS[color], interlace == 1)
        fh.seek(4, 1)  # CRC
        got = _inflated_idat_size(fh, expected)
    if got < expected:
        return f"pixel data ends after {got:,} of {expected:,} bytes"
    return None


def _inflated_idat_size(fh: BinaryIO, expected: int) -> int:
    """Bytes the IDAT chunks inflate to, counted up to ``expected`` (then it stops)."""
    inflater = zlib.decompressobj()
    got, seen_idat = 0, False
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return got
        length, kind = struct.unpack(">I4s", head)
        if kind != b"IDAT":
            if seen_idat:  # IDAT chunks are consecutive: the stream is over
                return got
            fh.seek(length + 4, 1)
            continue
        seen_idat = True
        left = length
        while left:
            data = fh.read(min(left, _STEP))
            if not data:
                return got
            left -= len(data)
            try:
                while data and not inflater.eof:
                    got += len(inflater.decompress(data, _STEP))
                    if got >= expected:
                        return got
                    data = inflater.unconsumed_tail
            except zlib.error:
                return got
            if inflater.eof:
                return got
        fh.seek(4, 1)  # CRC
