"""Safe decoding of untrusted image files into fully loaded 8-bit RGB images.

Every failure becomes a `DecodeError` whose `reason` is a stable quarantine code:
``io_error``, ``too_large``, ``unidentified``, ``format_not_allowed``,
``decompression_bomb``, ``truncated``, ``corrupt``. See /work/shared/RELIABILITY.md.

`warnings.catch_warnings` is process-global state, so decode in worker processes (or one
thread); the explicit width*height check does not depend on it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from indexer.errors import DecodeError
from indexer.types import ImageMeta

logger = logging.getLogger(__name__)

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# Pillow's JPEG opener returns an "MPO" image for multi-picture JPEGs (phone cameras).
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Formats Pillow cannot open but that we still want to name in a quarantine record.
_EXTRA_MAGIC = ((b"%PDF-", "PDF"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"))
_SNIFF_BYTES = 16  # what Image.open hands to each plugin's _accept()
_READ_CHUNK = 8 * 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

_ORIENTATION_TAG = 0x0112
# The table ImageOps.exif_transpose uses; applied to the converted image instead, so that a
# failure can only come from reading the tag.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_U16_MAX = 65535


@dataclass(frozen=True)
class DecodeLimits:
    """What an untrusted file may cost before it is rejected."""

    max_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 89_478_485  # Pillow's MAX_IMAGE_PIXELS; its 1x-2x warning zone is refused
    formats: tuple[str, ...] = ALLOWED_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.formats, str):
            raise ValueError(f"formats must be a tuple of names, got {self.formats!r}")
        formats = tuple(self.formats)
        Image.init()
        # Beyond the default allow-list, a user may opt in to another Pillow decoder
        # (e.g. TIFF for scanned archives), knowing it is riskier.
        unknown = [name for name in formats if name not in Image.OPEN]
        if not formats or unknown:
            raise ValueError(
                f"formats must be non-empty upper-case Pillow format names (default "
                f"{ALLOWED_FORMATS}), got {formats!r}"
            )
        object.__setattr__(self, "formats", formats)


def read_file(path: str, limits: DecodeLimits) -> bytes:
    """Read a regular file of at most `limits.max_bytes` bytes.

    The scanner owns the symlink policy, so links are followed; O_NONBLOCK keeps a FIFO from
    blocking the open, and fstat() on the opened descriptor refuses FIFOs, devices and
    directories. Raises DecodeError("io_error" | "too_large").
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise DecodeError("io_error", f"cannot open: {_os_text(exc)}", path) from exc
    try:
        _check_stat(os.fstat(fd), limits, path)
        data = _read_at_most(fd, limits.max_bytes + 1)
    except OSError as exc:
        raise DecodeError("io_error", f"cannot read: {_os_text(exc)}", path) from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:  # the file grew after fstat()
        raise DecodeError("too_large", f"more than {limits.max_bytes} bytes", path)
    return data


def decode_bytes(
    data: bytes, limits: DecodeLimits, min_side: int | None = None, sha256: str | None = None
) -> tuple[Image.Image, ImageMeta]:
    """Decode untrusted bytes into a loaded mode-"RGB" image and its metadata.

    `meta.width`/`meta.height` are the original size after EXIF orientation. With
    `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, and any image may then be
    box-reduced by an integer factor, but never so small that its shorter side drops below
    `min_side` (1.5 x `min_side` for the box reduce). A caller that already hashed `data`
    passes `sha256` so the bytes are not hashed twice. Raises DecodeError; never anything
    else for bad data.
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    if not data:
        raise DecodeError("unidentified", "empty file")
    if len(data) > limits.max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes > limit {limits.max_bytes}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, meta = _decode(data, limits, min_side, sha256)
    except DecodeError:
        raise
    except Exception as exc:  # Pillow raises far more than OSError on hostile input
        raise _classify(exc) from exc
    for warning in caught:
        logger.debug("decoder warning: %s", warning.message)
    return image, meta


def load_image(
    path: str, limits: DecodeLimits, min_side: int | None = None
) -> tuple[Image.Image, ImageMeta]:
    """read_file + decode_bytes; a DecodeError carries `path`."""
    try:
        return decode_bytes(read_file(path, limits), limits, min_side)
    except DecodeError as exc:
        exc.path = path
        raise


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB image; wide modes are rescaled, alpha is composited on white.

    Rescaling rule: I;16* and "I" with all values in 0..65535 map v -> round(v * 255 / 65535);
    other "I" images are min-max stretched to 0..255. "F" in [0, 1] maps v -> round(v * 255),
    other "F" images are min-max stretched over their finite values; NaN/inf become 0.
    """
    if image.mode in _WIDE_MODES:
        image = _wide_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    if image.mode == "RGB":
        return image.copy()
    return image.convert("RGB")


# A box reduce is a cruder filter than the JPEG draft's DCT scaling: it keeps this much more
# than min_side. Reducing PNG/WebP wallpapers to >= 448 px moved one ViT-B-32 embedding (a
# high-frequency bump-map texture) to cosine 0.9969 of the full-size one; at >= 672 px the
# minimum over the benchmark's large images was 0.99999.
_REDUCE_MARGIN = 1.5


def _reduced_rgb(image: Image.Image, min_side: int | None) -> Image.Image:
    """`to_rgb`, shrunk by the largest integer box factor that keeps the shorter side >=
    1.5 x `min_side`: the counterpart of the JPEG draft for PNG, WebP and the rest. The
    model's resize to 224 px then starts from ~3x its size instead of, say, 5120x2880
    (benchmarks/results/build_throughput.txt: time and cosine to the full-size embedding)."""
    factor = int(min(image.size) // (min_side * _REDUCE_MARGIN)) if min_side else 1
    if factor < 2:
        return to_rgb(image)
    if image.mode in ("RGB", "L"):  # reduce() returns a new image: no full-size copy
        return to_rgb(image.reduce(factor))
    return to_rgb(image).reduce(factor)


def _decode(
    data: bytes, limits: DecodeLimits, min_side: int | None, sha256: str | None
) -> tuple[Image.Image, ImageMeta]:
    with _open(data, limits) as image:
        fmt = _check_format(image, limits)
        width, height = _check_pixels(image.size, limits)
        if fmt == "PNG":
            _verify_png(data)
        if min_side is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
            image.draft("RGB", (min_side, min_side))
        image.load()
        orientation, notes = _orientation(image)
        rgb = _reduced_rgb(image, min_side)
        animated, more_notes = _is_animated(image, fmt)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if orientation in _SWAPS_AXES:
        width, height = height, width
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    meta = ImageMeta(sha256, width, height, fmt, len(data), animated, notes + more_notes)
    return rgb, meta


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=limits.formats)
    except UnidentifiedImageError:
        raise _unidentified(data, limits) from None


def _unidentified(data: bytes, limits: DecodeLimits) -> DecodeError:
    """Name what Pillow refused, by magic bytes only: a disallowed format is never parsed."""
    sniffed = _sniff(data[:_SNIFF_BYTES], limits)
    if sniffed is None:
        return DecodeError("unidentified", "not a recognised image format")
    if sniffed in limits.formats:
        return DecodeError("corrupt", f"has {sniffed} magic bytes but a malformed header")
    return DecodeError(
        "format_not_allowed", f"{sniffed} is not one of {', '.join(limits.formats)}"
    )


def _sniff(prefix: bytes, limits: DecodeLimits) -> str | None:
    Image.init()
    order = [*limits.formats, *(name for name in Image.OPEN if name not in limits.formats)]
    for name in order:
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        if accept is not None and _accepts(accept, prefix):
            return name
    return next((name for magic, name in _EXTRA_MAGIC if prefix.startswith(magic)), None)


def _accepts(accept: Callable[[bytes], object], prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except Exception:  # some _accept() functions index short prefixes blindly
        return False


def _check_format(image: Image.Image, limits: DecodeLimits) -> str:
    fmt = str(image.format)
    if _FORMAT_ALIASES.get(fmt, fmt) not in limits.formats:
        raise DecodeError("format_not_allowed", f"{fmt} is not one of {limits.formats}")
    return fmt


def _check_pixels(size: tuple[int, int], limits: DecodeLimits) -> tuple[int, int]:
    width, height = size
    if width < 1 or height < 1:
        raise DecodeError("corrupt", f"header claims an empty {width}x{height} image")
    if width * height > limits.max_pixels:
        raise DecodeError(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels > limit {limits.max_pixels}",
        )
    return width, height


def _verify_png(data: bytes) -> None:
    """Check every chunk CRC (load() skips IDAT CRCs) on a separate, never-loaded object."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as probe:
        probe.verify()


def _orientation(image: Image.Image) -> tuple[int, tuple[str, ...]]:
    """The EXIF orientation 1..8; unreadable or invalid -> 1 plus a warning, never an error."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        orientation = int(value)
        if orientation != value or not 1 <= orientation <= 8:
            raise ValueError(f"orientation {value!r}")
    except Exception as exc:
        logger.debug("ignoring EXIF orientation: %s: %s", type(exc).__name__, exc)
        return 1, ("exif_orientation_failed",)
    return orientation, ()


def _is_animated(image: Image.Image, fmt: str) -> tuple[bool, tuple[str, ...]]:
    if fmt == "MPO":  # extra pictures of one shot (previews, stereo), not an animation
        return False, ()
    try:
        return bool(getattr(image, "is_animated", False)), ()
    except Exception as exc:  # a broken later frame; frame 0 is already decoded
        logger.debug("animation probe failed: %s: %s", type(exc).__name__, exc)
        return False, ("animation_probe_failed",)


def _wide_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        return Image.fromarray(_float_to_u8(values.astype(np.float64)))
    return Image.fromarray(_int_to_u8(values.astype(np.int64)))


def _int_to_u8(values: np.ndarray) -> np.ndarray:
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= _U16_MAX:
        return ((values * 255 + _U16_MAX // 2) // _U16_MAX).astype(np.uint8)
    return _stretch(values.astype(np.float64), low, high)


def _float_to_u8(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255).astype(np.uint8)
    return np.where(finite, _stretch(values, low, high), 0).astype(np.uint8)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = max(high - low, 1e-12)
    return np.rint((values - low) * (255.0 / span)).clip(0, 255).astype(np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _classify(exc: Exception) -> DecodeError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return DecodeError("decompression_bomb", str(exc))
    if isinstance(exc, MemoryError):
        return DecodeError("decompression_bomb", f"out of memory while decoding ({text})")
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return DecodeError("truncated", text)
    return DecodeError("corrupt", text)


def _check_stat(info: os.stat_result, limits: DecodeLimits, path: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "directory" if stat.S_ISDIR(info.st_mode) else "FIFO, socket or device"
        raise DecodeError("io_error", f"not a regular file ({kind})", path)
    if info.st_size > limits.max_bytes:
        raise DecodeError("too_large", f"{info.st_size} bytes > limit {limits.max_bytes}", path)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _os_text(exc: OSError) -> str:
    return exc.strerror or f"{type(exc).__name__}: {exc}"
