"""Limits and options of ``gce serve`` as one typed, validated object (no global state)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """What the service accepts and how much it may spend per request.

    The byte and pixel limits bound the memory one request can claim: an upload is read into memory
    whole (at most ``max_upload_bytes``), and a decoded image takes 3-4 bytes per pixel (briefly 8
    while a 16-bit image is scaled down), and only ``max_parallel_decodes`` are decoded at a time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted upload (bytes)")
    max_pixels: int = Field(
        16_000_000, ge=1, description="largest accepted image (width x height): the decompression-bomb guard"
    )
    max_k: int = Field(100, ge=1, description="most neighbours one query may ask for")
    default_k: int = Field(10, ge=1, description="k when a request does not give one")
    max_batch: int = Field(
        32, ge=1, description="most queued queries answered by one model call / index scan (1: one at a time)"
    )
    max_parallel_decodes: int = Field(4, ge=1, description="uploads decoded and embedded at the same time")
    thumbnail_size: int = Field(160, ge=16, le=1024, description="longest side of a thumbnail (pixels)")
    thumbnail_cache: int = Field(
        1024, ge=0, description="thumbnails kept in memory (LRU; PNG, 160 px: about 20-60 KB each)"
    )
    device: str = "cpu"
