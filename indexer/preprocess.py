"""open_clip's inference transform in Pillow + numpy: same pixels, no torch in decode workers.

open_clip's eval transform for the common configs is Resize(shortest side) -> CenterCrop ->
to float / 255 -> Normalize (or Resize to the exact size for ``resize_mode="squash"``). Run
through torchvision it needs `import torch` + `import open_clip` in every decode worker: ~4 s
of start-up and ~750 MiB per process on the 2-core dev box, all while the model waits for its
first batch. `ClipPreprocess` does the same float32 operations in the same order, so its output
is bit-identical (tests/test_preprocess.py compares the two over many sizes and shapes). Configs
it does not cover (``resize_mode="longest"``, non-square "shortest", other colour modes) keep
open_clip's own transform: `supported()` says which.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .types import FloatArray

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _square_side(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return None


def supported(pcfg: dict[str, Any]) -> bool:
    """Whether `ClipPreprocess` reproduces open_clip's eval transform for this preprocess cfg."""
    return (
        pcfg.get("mode", "RGB") == "RGB"
        and pcfg.get("resize_mode", "shortest") in ("shortest", "squash")
        and _square_side(pcfg.get("size")) is not None
        and pcfg.get("interpolation", "bicubic") in _RESAMPLE
        and len(pcfg.get("mean", ())) == 3
        and len(pcfg.get("std", ())) == 3
    )


class ClipPreprocess:
    """PIL RGB image -> float32 CHW array, as open_clip's `image_transform_v2(cfg, False)`."""

    def __init__(self, pcfg: dict[str, Any]) -> None:
        if not supported(pcfg):
            raise ValueError(f"ClipPreprocess does not cover preprocess config {pcfg}")
        side = _square_side(pcfg["size"])
        assert side is not None
        self.side = side
        self.squash = pcfg.get("resize_mode", "shortest") == "squash"
        self.resample = _RESAMPLE[pcfg.get("interpolation", "bicubic")]
        # float32 throughout, as torchvision's ToTensor (uint8 -> float / 255) + Normalize
        self.mean = np.asarray(pcfg["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pcfg["std"], np.float32).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> FloatArray:
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = self._resize(image)
        if not self.squash:
            image = self._center_crop(image)
        chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        x = chw.astype(np.float32) / np.float32(255)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.squash:
            new_w = new_h = self.side
        else:  # torchvision's Resize(int): the shorter side becomes `side`, the other truncates
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.side * long / short)
            new_w, new_h = (self.side, new_long) if w <= h else (new_long, self.side)
        if (new_w, new_h) == (w, h):
            return image
        return image.resize((new_w, new_h), self.resample)

    def _center_crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if (w, h) == (self.side, self.side):
            return image
        top = int(round((h - self.side) / 2.0))
        left = int(round((w - self.side) / 2.0))
        return image.crop((left, top, left + self.side, top + self.side))
