"""JPEG thumbnails made with the safe decoder, for the web page and the HTML reports."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from PIL import Image

from indexer.decode import DecodeLimits, decode_bytes, read_file
from indexer.errors import DecodeError, QueryError
from indexer.store import StoredImage

THUMB_SIDE = 256
JPEG_QUALITY = 80


def thumbnail_jpeg(data: bytes, limits: DecodeLimits, side: int = THUMB_SIDE) -> bytes:
    """Untrusted image bytes -> a JPEG fitting in side x side (DecodeError on bad input)."""
    image, _ = decode_bytes(data, limits, min_side=side)
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def stored_thumbnail(img: StoredImage, limits: DecodeLimits, side: int = THUMB_SIDE) -> bytes:
    """A stored image's thumbnail, from the first of its paths that still holds its bytes.

    Only paths recorded in the store are read, and a file whose bytes changed since it was
    indexed is skipped: the thumbnail always shows the image that was embedded.
    """
    for path in img.paths:
        try:
            data = read_file(path, limits)
        except DecodeError:
            continue
        if hashlib.sha256(data).hexdigest() == img.sha256:
            return thumbnail_jpeg(data, limits, side)
    raise QueryError(f"no readable file still holds image {img.sha256[:12]}")


class ThumbnailCache:
    """A small thread-safe LRU of thumbnails by sha256 (thumbnails are a few KiB each)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            data = self._items.get(sha)
            if data is not None:
                self._items.move_to_end(sha)
            return data

    def put(self, sha: str, data: bytes) -> None:
        with self._lock:
            self._items[sha] = data
            self._items.move_to_end(sha)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
