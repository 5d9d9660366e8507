"""A seeded corpus of hostile and awkward image files, generated into a directory.

Everything is made with Pillow, numpy or raw bytes: no binary fixtures. `expected` is "ok"
or the DecodeError reason that `indexer.decode.load_image` must give (RELIABILITY.md).
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 1234
_EPOCH = time.gmtime(946684800)  # 2000-01-01
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION_TAG = 0x0112
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class CorpusCase:
    """One generated file and the state it must end in."""

    filename: str
    expected: str  # "ok" or a DecodeError reason code
    note: str


# ---- byte-level builders (also used by tests/test_decode.py) ----


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk; a wrong `crc` makes a structurally corrupt file."""
    value = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", value & 0xFFFFFFFF)


def crafted_png(width: int, height: int, depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG whose IHDR says exactly what we ask, whatever `rows` really holds."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG header claiming width x height, with one row of real data."""
    return crafted_png(width, height, 8, 0, b"\x00" + bytes(min(width, 1024)))


def rgb16_png(pixels: list[tuple[int, int, int]]) -> bytes:
    """A one-row 16-bit-per-channel RGB PNG (Pillow cannot save these itself)."""
    row = b"\x00" + b"".join(struct.pack(">3H", *pixel) for pixel in pixels)
    return crafted_png(len(pixels), 1, 16, 2, row)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def corrupt_chunk_crc(data: bytes, kind: bytes) -> bytes:
    """Flip the CRC of the first `kind` chunk."""
    at = data.index(kind)
    length = struct.unpack(">I", data[at - 4 : at])[0]
    crc_at = at + 4 + length
    return data[:crc_at] + bytes([data[crc_at] ^ 0xFF]) + data[crc_at + 1 :]


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def ascii_orientation_exif() -> bytes:
    """A little-endian TIFF IFD whose Orientation is the ASCII string "666"."""
    entry = struct.pack("<HHI4s", ORIENTATION_TAG, 2, 4, b"666\x00")
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + b"\x00" * 4


def marked_canvas() -> Image.Image:
    """20x10 blue canvas with a red 5x5 block in its top-left corner."""
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 5, 5))
    return image


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(noise)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


# ---- the corpus ----

Maker = Callable[[np.random.Generator], bytes]


def _bytes_cases() -> list[tuple[str, str, str, Maker]]:
    grey16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return [
        ("empty.jpg", "unidentified", "zero bytes", lambda r: b""),
        ("random.jpg", "unidentified", "seeded random bytes", lambda r: _random_bytes(r)),
        ("text.jpg", "unidentified", "plain text", lambda r: b"not an image\n" * 50),
        ("html.png", "unidentified", "HTML page", lambda r: b"<html><body>hi</body></html>"),
        ("tiff.jpg", "format_not_allowed", "TIFF", lambda r: encode(_small(r), "TIFF")),
        ("pdf.jpg", "format_not_allowed", "PDF",  # fixed dates: the bytes must not vary
         lambda r: encode(_small(r), "PDF", creationDate=_EPOCH, modDate=_EPOCH)),
        ("ico.png", "format_not_allowed", "ICO", lambda r: encode(_small(r), "ICO")),
        ("psd.jpg", "format_not_allowed", "PSD magic", lambda r: b"8BPS\x00\x01" + bytes(40)),
        ("eps.jpg", "format_not_allowed", "EPS magic", lambda r: b"%!PS-Adobe-3.0 EPSF-3.0\n"),
        ("bomb.png", "decompression_bomb", "30000x30000 IHDR", lambda r: bomb_png(30000, 30000)),
        ("bomb_1x_2x.png", "decompression_bomb", "100 MP: Pillow only warns",
         lambda r: bomb_png(10000, 10000)),
        ("truncated.jpg", "truncated", "JPEG cut in half",
         lambda r: _half(encode(photo_like(r, 200, 200), "JPEG"))),
        ("truncated.png", "truncated", "PNG cut in half",
         lambda r: _half(encode(photo_like(r, 64, 64), "PNG"))),
        ("bad_idat_crc.png", "corrupt", "IDAT CRC flipped (load() skips it)",
         lambda r: corrupt_chunk_crc(encode(_small(r), "PNG"), b"IDAT")),
        ("bad_ihdr_crc.png", "corrupt", "IHDR CRC flipped",
         lambda r: corrupt_chunk_crc(encode(_small(r), "PNG"), b"IHDR")),
        ("exif3.jpg", "ok", "orientation 3",
         lambda r: encode(marked_canvas(), "JPEG", exif=exif_bytes(3))),
        ("exif6.jpg", "ok", "orientation 6",
         lambda r: encode(marked_canvas(), "JPEG", exif=exif_bytes(6))),
        ("exif8.jpg", "ok", "orientation 8",
         lambda r: encode(marked_canvas(), "JPEG", exif=exif_bytes(8))),
        ("exif_garbage.jpg", "ok", "EXIF that is not TIFF",
         lambda r: encode(marked_canvas(), "JPEG", exif=b"Exif\x00\x00garbage-garbage")),
        ("exif_ascii_orientation.jpg", "ok", "Orientation stored as text: warning only",
         lambda r: encode(marked_canvas(), "JPEG", exif=ascii_orientation_exif())),
        ("grey16.png", "ok", "16-bit grey", lambda r: encode(Image.fromarray(grey16), "PNG")),
        ("rgb16.png", "ok", "16-bit RGB",
         lambda r: rgb16_png([(65535, 32768, 0), (0, 0, 65535)])),
        ("cmyk.jpg", "ok", "CMYK JPEG",
         lambda r: encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")),
        ("palette.png", "ok", "P mode", lambda r: encode(palette, "PNG")),
        ("palette_trns.gif", "ok", "P with transparent index",
         lambda r: encode(palette, "GIF", transparency=1)),
        ("onebit.bmp", "ok", "1-bit BMP", lambda r: encode(Image.new("1", (9, 9), 1), "BMP")),
        ("rgba.png", "ok", "RGBA, transparent red",
         lambda r: encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")),
        ("la.png", "ok", "LA", lambda r: encode(Image.new("LA", (8, 8), (0, 0)), "PNG")),
        ("animated.gif", "ok", "2-frame GIF", lambda r: animated("GIF")),
        ("animated.webp", "ok", "2-frame WebP", lambda r: animated("WEBP")),
        ("mpo.jpg", "ok", "multi-picture JPEG (Pillow format MPO)",
         lambda r: encode(_small(r), "MPO", save_all=True, append_images=[_small(r)])),
        ("one_pixel.png", "ok", "1x1", lambda r: encode(Image.new("RGB", (1, 1)), "PNG")),
        ("strip.png", "ok", "10000x10", lambda r: encode(photo_like(r, 10000, 10), "PNG")),
    ]


def _random_bytes(rng: np.random.Generator) -> bytes:
    # A fixed first byte keeps 2-byte magics ("BM", "P6") from matching by chance.
    return b"\x00" + rng.integers(0, 256, 4095, dtype=np.uint8).tobytes()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _small(rng: np.random.Generator) -> Image.Image:
    return photo_like(rng, 24, 16)


def _special_cases(root: Path) -> list[CorpusCase]:
    """Things that are not regular files, or too big to write for real."""
    oversize = root / "oversize.jpg"
    with open(oversize, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0")
        handle.truncate(DEFAULT_MAX_BYTES + 1)  # sparse: no disk space used
    (root / "directory.jpg").mkdir()
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    cases = [
        CorpusCase("oversize.jpg", "too_large", "sparse file one byte over 100 MiB"),
        CorpusCase("directory.jpg", "io_error", "a directory with an image name"),
        CorpusCase("loop_a.jpg", "io_error", "symlink loop"),
        CorpusCase("missing.jpg", "io_error", "vanished before reading"),
    ]
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.jpg")
        cases.append(CorpusCase("fifo.jpg", "io_error", "FIFO with no writer: must not block"))
    return cases


def build_corpus(directory: str | os.PathLike[str], seed: int = SEED) -> list[CorpusCase]:
    """Write every case into `directory` (which must exist) and return what each must give."""
    root = Path(directory)
    rng = np.random.default_rng(seed)
    cases = []
    for filename, expected, note, make in _bytes_cases():
        (root / filename).write_bytes(make(rng))
        cases.append(CorpusCase(filename, expected, note))
    return cases + _special_cases(root)
