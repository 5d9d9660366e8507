"""indexer.decode: each test states an invariant that would break without the code under test."""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, TiffImagePlugin

from indexer.decode import (
    ALLOWED_FORMATS,
    DecodeLimits,
    decode_bytes,
    load_image,
    read_file,
    to_rgb,
)
from indexer.errors import DecodeError
from tests.reliability.corpus import (
    animated,
    ascii_orientation_exif,
    bomb_png,
    corrupt_chunk_crc,
    encode,
    exif_bytes,
    marked_canvas,
    rgb16_png,
)

LIMITS = DecodeLimits()
REASONS = {
    "unidentified", "format_not_allowed", "decompression_bomb", "truncated", "corrupt",
    "too_large", "io_error",
}


def reason_of(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_bytes(data, limits)
    return caught.value.reason


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


# ---- limits ----


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_bytes": 0},
        {"max_pixels": -1},
        {"max_pixels": True},
        {"formats": ()},
        {"formats": ("jpeg",)},
        {"formats": ("NOTAFORMAT",)},
        {"formats": "JPEG"},
    ],
)
def test_limits_reject_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DecodeLimits(**kwargs)  # type: ignore[arg-type]


def test_limits_default_to_the_allow_list_and_store_a_tuple() -> None:
    assert LIMITS.formats == ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    assert DecodeLimits(formats=["PNG"]).formats == ("PNG",)  # type: ignore[arg-type]


# ---- identification ----


@pytest.mark.parametrize("data", [b"", b"\x00" + bytes(range(255)) * 8, b"hello, world\n" * 9])
def test_non_images_are_unidentified(data: bytes) -> None:
    assert reason_of(data) == "unidentified"


@pytest.mark.parametrize("fmt", ["TIFF", "PDF", "ICO"])
def test_disallowed_formats_are_named_not_decoded(fmt: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_bytes(encode(Image.new("RGB", (16, 16)), fmt), LIMITS)
    assert caught.value.reason == "format_not_allowed"
    assert fmt in caught.value.message


def test_opted_in_format_decodes() -> None:
    data = encode(Image.new("RGB", (16, 16), (255, 0, 0)), "TIFF")
    image, meta = decode_bytes(data, DecodeLimits(formats=(*ALLOWED_FORMATS, "TIFF")))
    assert meta.format == "TIFF" and image.getpixel((0, 0)) == (255, 0, 0)


def test_tiff_parser_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (16, 16)), "TIFF")

    def boom(self: object) -> None:
        raise AssertionError("TIFF header parsed")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", boom)
    assert reason_of(data) == "format_not_allowed"


def test_limits_formats_narrow_the_allow_list() -> None:
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    assert reason_of(jpeg, DecodeLimits(formats=("PNG",))) == "format_not_allowed"


def test_multi_picture_jpeg_counts_as_jpeg_and_is_not_animated() -> None:
    frame = Image.new("RGB", (8, 8), (0, 200, 0))
    data = encode(frame, "MPO", save_all=True, append_images=[frame])
    image, meta = decode_bytes(data, DecodeLimits(formats=("JPEG",)))
    assert (meta.format, meta.animated, image.mode) == ("MPO", False, "RGB")


# ---- bombs ----


def test_header_bomb_is_refused_before_any_pixel_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: object) -> None:
        raise AssertionError("load() called on a bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert reason_of(bomb_png(30000, 30000)) == "decompression_bomb"
    assert reason_of(bomb_png(10000, 10000)) == "decompression_bomb"  # Pillow only warns here


def test_own_pixel_limit_applies_below_pillows() -> None:
    data = png(Image.new("RGB", (20, 20)))
    assert reason_of(data, DecodeLimits(max_pixels=399)) == "decompression_bomb"
    assert decode_bytes(data, DecodeLimits(max_pixels=400))[1].width == 20


def test_global_pillow_state_is_left_alone() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    reason_of(bomb_png(10000, 10000))
    decode_bytes(png(Image.new("RGB", (4, 4))), LIMITS)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, warnings.filters) == before
    assert before[1] is False


# ---- damaged files ----


def test_jpeg_cut_in_half_is_truncated_not_grey() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    assert reason_of(data[: len(data) // 2]) == "truncated"


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])  # Pillow never checks IEND's CRC
def test_png_with_bad_crc_is_corrupt(chunk: bytes) -> None:
    assert reason_of(corrupt_chunk_crc(png(Image.new("RGB", (8, 8), 9)), chunk)) == "corrupt"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (AssertionError("load after verify"), "corrupt"),
        (SyntaxError("broken"), "corrupt"),
        (ValueError("odd"), "corrupt"),
        (MemoryError(), "decompression_bomb"),
        (Image.DecompressionBombError("big"), "decompression_bomb"),
        (EOFError(), "truncated"),
    ],
)
def test_any_exception_maps_to_a_reason(
    monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    def fail(self: object) -> None:
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(DecodeError) as caught:
        decode_bytes(png(Image.new("RGB", (4, 4))), LIMITS)
    assert caught.value.reason == reason
    assert type(error).__name__ in caught.value.message or reason == "decompression_bomb"


# ---- orientation ----


@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [(1, (20, 10), (1, 1)), (3, (20, 10), (18, 8)), (6, (10, 20), (8, 1)), (8, (10, 20), (1, 18))],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], red_at: tuple[int, int]
) -> None:
    data = encode(marked_canvas(), "JPEG", exif=exif_bytes(orientation), quality=95)
    image, meta = decode_bytes(data, LIMITS)
    assert image.size == (meta.width, meta.height) == size
    red, green, blue = image.getpixel(red_at)  # type: ignore[misc]
    assert red > 200 and blue < 60
    assert meta.warnings == ()


def test_unreadable_exif_embeds_unrotated_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object) -> None:
        raise SyntaxError("malformed EXIF")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    image, meta = decode_bytes(encode(marked_canvas(), "JPEG", exif=exif_bytes(6)), LIMITS)
    assert image.size == (20, 10) and meta.warnings == ("exif_orientation_failed",)


def test_invalid_orientation_value_warns() -> None:
    data = encode(marked_canvas(), "JPEG", exif=ascii_orientation_exif())
    image, meta = decode_bytes(data, LIMITS)
    assert image.size == (20, 10) and meta.warnings == ("exif_orientation_failed",)


# ---- modes ----


def test_16_bit_grey_png_is_rescaled_not_clipped() -> None:
    data = png(Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)))
    image, _ = decode_bytes(data, LIMITS)
    assert pixels(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_16_bit_rgb_png_keeps_its_range() -> None:
    image, _ = decode_bytes(rgb16_png([(65535, 32768, 0)]), LIMITS)
    assert pixels(image)[0, 0].tolist() == [255, 128, 0]


def test_16_bit_big_endian_mode_is_rescaled() -> None:
    raw = np.array([[65535, 32768]], dtype=">u2").tobytes()
    image = to_rgb(Image.frombytes("I;16B", (2, 1), raw))
    assert pixels(image)[0, :, 0].tolist() == [255, 128]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 32768, 65535], [0, 128, 255]),  # I within 16-bit range: scaled as 16-bit
        ([-100, 0, 155], [0, 100, 255]),  # I outside it: min-max stretch
    ],
)
def test_i_mode_rule(values: list[int], expected: list[int]) -> None:
    image = to_rgb(Image.fromarray(np.array([values], dtype=np.int32)))
    assert pixels(image)[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0, float("nan")], [0, 128, 255, 0]),  # F in [0, 1]: times 255
        ([-2.0, 0.0, 2.0, float("inf")], [0, 128, 255, 0]),  # otherwise min-max stretch
    ],
)
def test_f_mode_rule(values: list[float], expected: list[int]) -> None:
    image = to_rgb(Image.fromarray(np.array([values], dtype=np.float32)))
    assert image.mode == "RGB" and pixels(image)[0, :, 0].tolist() == expected


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    image, _ = decode_bytes(data, LIMITS)
    red, green, blue = pixels(image)[8, 8]
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_transparent_red_becomes_white_and_half_alpha_blends_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    image, _ = decode_bytes(png(rgba), LIMITS)
    assert pixels(image)[0].tolist() == [[255, 255, 255], [127, 127, 127]]


def test_la_is_composited_on_white() -> None:
    image, _ = decode_bytes(png(Image.new("LA", (2, 2), (0, 0))), LIMITS)
    assert pixels(image).min() == 255


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_red_index_becomes_white(fmt: str) -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    image, _ = decode_bytes(encode(palette, fmt, transparency=0), LIMITS)
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_one_bit_becomes_black_and_white_rgb() -> None:
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    image, _ = decode_bytes(encode(bits, "BMP"), LIMITS)
    assert pixels(image)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


# ---- animation, odd sizes ----


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame_and_flag(fmt: str) -> None:
    image, meta = decode_bytes(animated(fmt), LIMITS)
    red, green, _ = pixels(image)[8, 8]
    assert meta.animated and red > 200 and green < 60


def test_still_gif_is_not_animated() -> None:
    assert decode_bytes(encode(Image.new("RGB", (4, 4)), "GIF"), LIMITS)[1].animated is False


@pytest.mark.parametrize("size", [(1, 1), (10000, 10)])
def test_extreme_shapes_decode(size: tuple[int, int]) -> None:
    image, meta = decode_bytes(png(Image.new("RGB", size, (3, 4, 5))), LIMITS, min_side=448)
    assert image.size == size == (meta.width, meta.height) and image.mode == "RGB"


# ---- draft ----


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)
    return encode(Image.fromarray(np.tile(gradient, (3000, 1))).convert("RGB"), "JPEG")


def test_draft_keeps_shorter_side_at_least_min_side(big_jpeg: bytes) -> None:
    image, meta = decode_bytes(big_jpeg, LIMITS, min_side=448)
    assert 448 <= min(image.size) < 3000
    assert (meta.width, meta.height) == (4000, 3000)


@pytest.mark.parametrize(("min_side", "expected"), [(None, (4000, 3000)), (3001, (4000, 3000))])
def test_no_draft_without_min_side_or_when_too_small(
    big_jpeg: bytes, min_side: int | None, expected: tuple[int, int]
) -> None:
    assert decode_bytes(big_jpeg, LIMITS, min_side=min_side)[0].size == expected


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_formats_are_box_reduced_to_at_least_min_side(fmt: str) -> None:
    rng = np.random.default_rng(3)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).resize(
        (3000, 1800), Image.Resampling.BICUBIC)
    data = encode(smooth, fmt) if fmt == "PNG" else encode(smooth, fmt, lossless=True)
    image, meta = decode_bytes(data, LIMITS, min_side=448)
    assert image.size == (1500, 900) and image.mode == "RGB"  # 1800 // (1.5 x 448) = 2
    assert (meta.width, meta.height) == (3000, 1800)
    full, _ = decode_bytes(data, LIMITS)
    assert full.size == (3000, 1800)
    # a box reduce keeps 1.5 x min_side: 1300 // 672 = 1, so this one stays as it is
    assert decode_bytes(encode(smooth.resize((2000, 1300)), "PNG"), LIMITS,
                        min_side=448)[0].size == (2000, 1300)
    # what the model sees is the same picture: preprocessed pixels agree closely
    from indexer.preprocess import ClipPreprocess

    pre = ClipPreprocess({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert np.abs(pre(image) - pre(full)).mean() < 0.01


def test_reduce_composites_alpha_first() -> None:
    rgba = Image.new("RGBA", (2800, 1400), (255, 0, 0, 0))  # fully transparent red
    image, _ = decode_bytes(png(rgba), LIMITS, min_side=448)
    assert image.size == (2800 // 2, 1400 // 2) and image.mode == "RGB"
    assert pixels(image)[10, 10].tolist() == [255, 255, 255]


def test_min_side_must_be_positive() -> None:
    with pytest.raises(ValueError):
        decode_bytes(b"x", LIMITS, min_side=0)


# ---- meta ----


def test_meta_records_hash_size_and_format() -> None:
    data = png(Image.new("RGB", (5, 3)))
    _, meta = decode_bytes(data, LIMITS)
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert (meta.size, meta.format, meta.width, meta.height) == (len(data), "PNG", 5, 3)


# ---- files ----


def test_read_file_returns_the_bytes(tmp_path: Path) -> None:
    target = tmp_path / "a.png"
    target.write_bytes(b"abc")
    assert read_file(str(target), LIMITS) == b"abc"


def test_oversize_file_is_rejected_before_reading(tmp_path: Path) -> None:
    target = tmp_path / "big.jpg"
    target.write_bytes(b"x" * 11)
    with pytest.raises(DecodeError) as caught:
        read_file(str(target), DecodeLimits(max_bytes=10))
    assert caught.value.reason == "too_large"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_fifo_is_io_error_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def attempt() -> None:
        try:
            read_file(str(fifo), LIMITS)
        except DecodeError as exc:
            outcome.append(exc.reason)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert outcome == ["io_error"]


def test_load_image_sets_path_on_errors(tmp_path: Path) -> None:
    target = tmp_path / "text.jpg"
    target.write_text("not an image")
    with pytest.raises(DecodeError) as caught:
        load_image(str(target), LIMITS)
    assert (caught.value.reason, caught.value.path) == ("unidentified", str(target))
    with pytest.raises(DecodeError) as missing:
        load_image(str(tmp_path / "gone.jpg"), LIMITS)
    assert (missing.value.reason, missing.value.path) == ("io_error", str(tmp_path / "gone.jpg"))


# ---- fuzz: mutated valid files never escape as anything but DecodeError ----

SEEDS = {
    "PNG": png(Image.new("RGBA", (12, 9), (9, 99, 199, 128))),
    "JPEG": encode(Image.new("RGB", (12, 9), (9, 99, 199)), "JPEG"),
    "GIF": animated("GIF"),
    "BMP": encode(Image.new("P", (12, 9), 3), "BMP"),
    "WEBP": animated("WEBP"),
}


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10**6),
)
def test_mutated_files_fail_only_with_a_reason(
    fmt: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(SEEDS[fmt])
    for at, value in edits:
        data[at % len(data)] = value
    data = data[: max(1, cut % (len(data) + 1))]
    try:
        image, meta = decode_bytes(bytes(data), LIMITS, min_side=4)
    except DecodeError as exc:
        assert exc.reason in REASONS
    else:
        assert image.mode == "RGB" and image.size[0] > 0 and meta.size == len(data)
