"""Shared fixtures: isolated data dirs, a fake embedder, a tiny real open_clip model, images."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.embed import FakeEmbedder, ModelSpec

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = str(ROOT / "tests" / "fixtures" / "clipdex-tiny.json")
SHARED_DATA = Path(os.environ.get("CLIPDEX_SHARED_DATA", ROOT.parent / "shared" / "data"))
CLIPDEX_BIN = str(Path(sys.executable).with_name("clipdex"))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the user's store or the network-facing model cache."""
    monkeypatch.setenv("CLIPDEX_STORE", str(tmp_path / "default.clipdex"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPDEX_WEIGHTS", raising=False)
    monkeypatch.delenv("CLIPDEX_MODEL_CONFIG", raising=False)


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder(dim=16)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(name="clipdex-tiny", pretrained=None, random_init=True,
                     model_config=TINY_CONFIG, device="cpu")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real checkpoint file for the tiny model (random values, but a file with a sha256)."""
    import open_clip
    import torch

    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(1234)
    model = open_clip.create_model("clipdex-tiny", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "clipdex-tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def scene(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A distinct synthetic picture: a coloured background with a few seeded shapes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
    return img


def near_copy(img: Image.Image) -> Image.Image:
    """What a re-upload does to a picture: downscaled and re-encoded as lossy JPEG."""
    import io

    small = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=70)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Eight distinct PNG/JPEG scenes in a nested tree."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        folder = root / "sub" if i % 2 else root
        scene(i).save(folder / f"scene{i}.{'png' if i % 3 else 'jpg'}")
    return root


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "test.clipdex")
