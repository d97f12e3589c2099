"""Limits and options of ``gce serve`` as one typed, validated object (no global state)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Pillow refuses images over twice its ``MAX_IMAGE_PIXELS`` (89,478,485) itself, before our check:
#: a ``max_pixels`` above this would never be reached, and its refusals would name the wrong limit.
PILLOW_PIXEL_CEILING = 178_956_970

#: The largest upload limit: a body is held in memory whole, ``max_uploads`` of them at once.
MAX_UPLOAD_CEILING = 1024 * 1024 * 1024

#: Most seconds any of the time limits may be.
MAX_TIMEOUT_S = 3600.0


class ServeSettings(BaseModel):
    """What the service accepts and how much it may spend per request.

    The byte and pixel limits bound the memory one request can claim: an upload is read into memory
    whole (at most ``max_upload_bytes``), and a decoded image takes 3-4 bytes per pixel (briefly 8
    while a 16-bit image is scaled down), and only ``max_parallel_decodes`` are decoded at a time.
    ``max_uploads`` requests with a body are held at once, and each must arrive within
    ``upload_timeout_s``; ``max_connections`` connections are open at once, and each must send its
    request line and headers within ``upload_timeout_s`` too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1, le=MAX_UPLOAD_CEILING, description="largest accepted upload (bytes)"
    )
    max_pixels: int = Field(
        16_000_000,
        ge=1,
        le=PILLOW_PIXEL_CEILING,
        description="largest accepted image (width x height): the decompression-bomb guard",
    )
    max_k: int = Field(100, ge=1, le=10_000, description="most neighbours one query may ask for")
    default_k: int = Field(10, ge=1, le=10_000, description="k when a request does not give one")
    max_batch: int = Field(
        32, ge=1, le=1024, description="most queued queries answered by one model call / index scan (1: one at a time)"
    )
    max_parallel_decodes: int = Field(4, ge=1, le=1024, description="uploads decoded and embedded at the same time")
    max_uploads: int = Field(
        32, ge=1, le=10_000, description="requests with a body (uploads, searches) read or answered at once; more: 503"
    )
    upload_timeout_s: float = Field(
        60.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description="seconds a request's headers, and then its body, may take to arrive; then 408 or closed",
    )
    max_connections: int = Field(
        512, ge=1, le=100_000, description="open connections at once; one more is answered 503 and closed"
    )
    thumbnail_size: int = Field(160, ge=16, le=1024, description="longest side of a thumbnail (pixels)")
    thumbnail_cache: int = Field(
        1024, ge=0, le=1_000_000, description="thumbnails kept in memory (LRU; PNG, 160 px: about 20-60 KB each)"
    )
    device: str = "cpu"
