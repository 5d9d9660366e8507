"""Array aliases and the small records passed between pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ScanEntry:
    """A candidate file found by the scanner, before it is read."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Failure:
    """A file that could not be indexed, and why (reason is a stable code)."""

    path: str
    reason: str
    message: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class ImageMeta:
    """What the store keeps about one distinct image (identified by content hash)."""

    sha256: str
    width: int
    height: int
    format: str
    size: int
    animated: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decoded:
    """A file decoded and preprocessed by a worker: ready for the model."""

    entry: ScanEntry
    meta: ImageMeta
    pixels: FloatArray  # the embedder's preprocessed input, e.g. [3, 224, 224]
