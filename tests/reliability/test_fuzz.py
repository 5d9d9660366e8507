"""A seeded mutation fuzz run through the real pipeline: a few thousand mutated JPEG, PNG, GIF
and WebP files each end embedded or quarantined with a known reason; nothing escapes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import scene
from tests.reliability.corpus import encode
from tests.reliability.helpers import KNOWN_REASONS, assert_consistent, build, store_state

SEED = 987
N_FILES = int(os.environ.get("CLIPDEX_FUZZ_FILES", "4000"))


def _seeds() -> dict[str, bytes]:
    img = scene(5, (40, 30))
    frames = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "jpg": encode(img, "JPEG", quality=80),
        "png": encode(img.convert("RGBA"), "PNG"),
        "gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four of: bit flips, byte overwrites, cuts, duplicated or deleted spans."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 5))
        at = int(rng.integers(0, max(1, len(buf))))
        if op == 0 and buf:
            buf[at] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and buf:
            buf[at] = int(rng.integers(0, 256))
        elif op == 2:
            del buf[at:]
        elif op == 3:
            n = int(rng.integers(1, 64))
            buf[at:at] = buf[at:at + n]
        else:
            del buf[at:at + int(rng.integers(1, 64))]
        # headers are where parsers break: aim half of the mutations at the first 64 bytes
        if rng.random() < 0.5 and len(buf) > 8:
            buf[int(rng.integers(0, min(64, len(buf))))] = int(rng.integers(0, 256))
    return bytes(buf)


@pytest.mark.slow
def test_mutated_files_are_embedded_or_quarantined_with_a_known_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    seeds = _seeds()
    root = tmp_path / "fuzz"
    root.mkdir()
    names = list(seeds)
    for i in range(N_FILES):
        ext = names[i % len(names)]
        (root / f"m{i:05d}.{ext}").write_bytes(mutate(seeds[ext], rng))
    summary = build(str(tmp_path / "s.clipdex"), [str(root)], batch_size=64, chunk=16,
                    file_timeout=20.0)
    state = store_state(str(tmp_path / "s.clipdex"))
    every = {str(p) for p in root.iterdir()}
    assert set(state.paths) | set(state.failures) == every  # nothing escapes
    assert set(state.failures.values()) <= KNOWN_REASONS
    assert "worker_crash" not in state.failures.values()  # Pillow never took a worker down
    assert summary.embedded > 0 and len(state.failures) > 0  # the fuzz hits both outcomes
    assert_consistent(state)
