"""The torch-free preprocessing must give open_clip's pixels, bit for bit, and keep torch out
of the decode workers."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from indexer.decode import DecodeLimits
from indexer.embed import OpenClipEmbedder, TorchPreprocess, _eval_transform
from indexer.preprocess import ClipPreprocess, supported
from indexer.scan import scan
from indexer.types import Failure, ScanEntry
from indexer.workers import DecodePool, WorkerConfig

VIT_B_32 = {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
            "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}
# SigLIP-style tag config: squash to the exact size, bilinear, mean/std 0.5
SQUASH = {**VIT_B_32, "size": (256, 256), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "interpolation": "bilinear", "resize_mode": "squash"}

SIZES = [(224, 224), (225, 224), (224, 300), (1, 1), (3, 500), (500, 3), (640, 480),
         (1023, 767), (100, 50), (448, 448), (300, 224), (5000, 10), (256, 256), (257, 255)]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 1200, 2)) for _ in range(20)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("pcfg", [VIT_B_32, SQUASH], ids=["shortest-bicubic", "squash-bilinear"])
def test_same_pixels_as_open_clip_transform(pcfg):
    ours, theirs = ClipPreprocess(pcfg), TorchPreprocess(_eval_transform(pcfg))
    for img in _images():
        a, b = ours(img), theirs(img)
        assert a.dtype == np.float32 and a.shape == b.shape, img.size
        np.testing.assert_array_equal(a, b, err_msg=str(img.size))


def test_non_rgb_input_is_converted_like_open_clip():
    pcfg = VIT_B_32
    grey = Image.fromarray(np.arange(300 * 200, dtype=np.uint32).reshape(200, 300).astype(np.uint8))
    np.testing.assert_array_equal(ClipPreprocess(pcfg)(grey),
                                  TorchPreprocess(_eval_transform(pcfg))(grey))


def test_configs_it_does_not_reproduce_are_refused():
    assert supported(VIT_B_32) and supported(SQUASH)
    for bad in ({**VIT_B_32, "resize_mode": "longest"}, {**VIT_B_32, "size": (224, 256)},
                {**VIT_B_32, "interpolation": "lanczos"}, {**VIT_B_32, "mode": "L"}):
        assert not supported(bad)
        with pytest.raises(ValueError):
            ClipPreprocess(bad)


def test_open_clip_embedder_uses_it_and_falls_back(tiny_spec, monkeypatch):
    emb = OpenClipEmbedder(tiny_spec)
    assert isinstance(emb.preprocess, ClipPreprocess)
    monkeypatch.setattr("indexer.embed.preprocess_supported", lambda cfg: False)
    assert isinstance(OpenClipEmbedder(tiny_spec).preprocess, TorchPreprocess)


def _modules_probe(entry: ScanEntry, cfg: WorkerConfig, known) -> Failure:
    """A worker task that reports which heavy modules the worker process has imported."""
    from indexer.decode import load_image

    cfg.preprocess(load_image(entry.path, cfg.limits)[0])  # the real work first
    heavy = sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules)
    return Failure(entry.path, "probe", ",".join(heavy) or "none")


def test_decode_workers_never_import_torch(tiny_spec, tmp_path):
    from .conftest import scene

    scene(1).save(tmp_path / "a.png")
    emb = OpenClipEmbedder(tiny_spec)
    cfg = WorkerConfig(emb.preprocess, DecodeLimits(), None, task=_modules_probe)
    entries = [e for e in scan([str(tmp_path)]) if isinstance(e, ScanEntry)]
    (result,) = DecodePool(cfg, 1).map(entries)
    assert isinstance(result, Failure) and result.reason == "probe"
    assert result.message == "none"
