"""OCR: read the text an image shows, with an offline engine, in crash-isolated workers.

Engines hide behind a tiny protocol (`OcrEngine.read(image) -> OcrResult`) and import their
libraries on first use. `rapidocr` (PP-OCRv4 detection + recognition ONNX models shipped inside
the `rapidocr-onnxruntime` wheel) is the default; `tesseract` (Debian `tesseract-ocr` through
`pytesseract`) is the alternative. Both run the text *detector* first and skip recognition when
it finds no text, so text-free photos cost only the detector.

An image the engine cannot read is an explicit "no text" result with a reason (`error`), never
an exception: OCR is an extra channel and must not stop a build or a detection run.
Results are keyed by the image's sha256 and the engine id (engine, version, models), so they
are computed once per image and engine and recomputed only when the engine changes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .decode import DecodeLimits
from .errors import ClipdexError, DecodeError
from .types import Failure, ScanEntry

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "rapidocr"
MAX_SIDE = 2000  # larger images are shrunk first: detection cost grows with the pixel count
Box = tuple[tuple[float, float], ...]  # corner points (x, y) in the image's pixel coordinates


@dataclass(frozen=True)
class OcrLine:
    text: str
    box: Box
    confidence: float


@dataclass(frozen=True)
class OcrResult:
    """What the engine read in one image; `error` set means it could not read it (no text)."""

    engine: str
    lines: tuple[OcrLine, ...] = ()
    seconds: float = 0.0
    error: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def has_text(self) -> bool:
        return any(line.text.strip() for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "seconds": round(self.seconds, 4), "error": self.error,
                "lines": [{"text": ln.text, "box": [list(p) for p in ln.box],
                           "confidence": round(ln.confidence, 4)} for ln in self.lines]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrResult:
        lines = tuple(OcrLine(str(x["text"]), tuple((float(p[0]), float(p[1])) for p in x["box"]),
                              float(x["confidence"])) for x in d.get("lines", ()))
        return cls(str(d["engine"]), lines, float(d.get("seconds", 0.0)), d.get("error"))


class OcrEngine(Protocol):
    @property
    def engine_id(self) -> str: ...

    def read(self, image: Image.Image) -> OcrResult: ...


def _prepare(image: Image.Image) -> tuple[Image.Image, float]:
    """RGB, at most MAX_SIDE pixels a side; returns the scale back to original coordinates."""
    image = image.convert("RGB")
    side = max(image.size)
    if side <= MAX_SIDE:
        return image, 1.0
    f = MAX_SIDE / side
    return image.resize((max(1, round(image.width * f)), max(1, round(image.height * f)))), 1 / f


class RapidOcrEngine:
    """PP-OCRv4 (detection + recognition ONNX models bundled in the wheel) on onnxruntime."""

    def __init__(self, threads: int = 1, min_confidence: float = 0.5) -> None:
        self.threads = threads
        self.min_confidence = min_confidence
        self._ocr: Any = None

    @functools.cached_property
    def engine_id(self) -> str:
        from importlib.metadata import version

        return (f"rapidocr-onnxruntime-{version('rapidocr-onnxruntime')}/ppocrv4-det-rec/"
                f"limit-max/score-{self.min_confidence}")

    def _engine(self) -> Any:
        if self._ocr is None:
            from rapidocr_onnxruntime import RapidOCR

            # det_limit_type "max": shrink large images to 960-2000 px instead of upscaling
            # small ones to 736 px on the short side (the wheel's default): 2.5x less CPU with
            # the same accuracy on our synthetic and shared-set samples.
            self._ocr = RapidOCR(intra_op_num_threads=self.threads, inter_op_num_threads=1,
                                 text_score=self.min_confidence, det_limit_type="max")
        return self._ocr

    def read(self, image: Image.Image) -> OcrResult:
        t0 = time.perf_counter()
        img, scale = _prepare(image)
        raw, _ = self._engine()(np.asarray(img)[:, :, ::-1].copy())  # the engine expects BGR
        lines = tuple(OcrLine(str(text), tuple((float(x) * scale, float(y) * scale)
                                               for x, y in box), float(conf))
                      for box, text, conf in (raw or ()) if str(text).strip())
        return OcrResult(self.engine_id, lines, time.perf_counter() - t0)


class TesseractEngine:
    """Tesseract 5 (Debian `tesseract-ocr` + `tesseract-ocr-eng`) through pytesseract."""

    def __init__(self, lang: str = "eng", min_confidence: float = 50.0) -> None:
        self.lang = lang
        self.min_confidence = min_confidence

    @functools.cached_property
    def engine_id(self) -> str:
        import pytesseract

        return f"tesseract-{pytesseract.get_tesseract_version()}/{self.lang}"

    def read(self, image: Image.Image) -> OcrResult:
        import pytesseract

        t0 = time.perf_counter()
        img, scale = _prepare(image)
        d = pytesseract.image_to_data(img, lang=self.lang, output_type=pytesseract.Output.DICT)
        lines: dict[tuple[int, int, int], list[int]] = {}
        for i, word in enumerate(d["text"]):
            if word.strip() and float(d["conf"][i]) >= self.min_confidence:
                key = (d["block_num"][i], d["par_num"][i], d["line_num"][i])
                lines.setdefault(key, []).append(i)
        return OcrResult(self.engine_id, tuple(_tess_line(d, ix, scale)
                                               for ix in lines.values()),
                         time.perf_counter() - t0)


def _tess_line(d: dict[str, list[Any]], ix: list[int], scale: float) -> OcrLine:
    x0 = min(d["left"][i] for i in ix) * scale
    y0 = min(d["top"][i] for i in ix) * scale
    x1 = max(d["left"][i] + d["width"][i] for i in ix) * scale
    y1 = max(d["top"][i] + d["height"][i] for i in ix) * scale
    conf = float(np.mean([float(d["conf"][i]) for i in ix])) / 100.0
    return OcrLine(" ".join(d["text"][i] for i in ix), ((x0, y0), (x1, y0), (x1, y1), (x0, y1)),
                   conf)


class OcrUnavailableError(ClipdexError):
    """The OCR engine's package (or program) is not installed; carries what to install."""


ENGINES: dict[str, Callable[[], OcrEngine]] = {"rapidocr": RapidOcrEngine,
                                               "tesseract": TesseractEngine}
_NEEDS = {"rapidocr": ("rapidocr_onnxruntime", "pip install 'clipdex[ocr]'"),
          "tesseract": ("pytesseract", "pip install 'clipdex[ocr]' and apt-get install "
                                       "tesseract-ocr tesseract-ocr-eng")}


def make_engine(name: str = DEFAULT_ENGINE) -> OcrEngine:
    """An engine by name; OcrUnavailableError (never "no text") when it is not installed."""
    import importlib.util
    import shutil

    if name not in ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; choose from {sorted(ENGINES)}")
    module, how = _NEEDS[name]
    if importlib.util.find_spec(module) is None or (
            name == "tesseract" and shutil.which("tesseract") is None):
        raise OcrUnavailableError(f"the {name} OCR engine is not installed: {how}")
    return ENGINES[name]()


_ENGINE_CACHE: dict[str, OcrEngine] = {}


def shared_engine(name: str = DEFAULT_ENGINE) -> OcrEngine:
    """One engine per name and process, loaded on first use (models take a second to load)."""
    engine = _ENGINE_CACHE.get(name)
    if engine is None:
        engine = _ENGINE_CACHE[name] = make_engine(name)
    return engine


def read_image(engine: OcrEngine, image: Image.Image) -> OcrResult:
    """The engine's result, or an explicit no-text result with the reason it failed."""
    t0 = time.perf_counter()
    try:
        return engine.read(image)
    except Exception as err:  # an unreadable image is "no text", never a crash
        return OcrResult(engine.engine_id, (), time.perf_counter() - t0,
                         f"ocr_failed: {type(err).__name__}: {err}")


# ---- files, in worker processes -----------------------------------------------------------
@dataclass(frozen=True)
class OcrItem:
    """One file to read; `entry.path` is the file, `sha256` its content identity."""

    entry: ScanEntry
    sha256: str


@dataclass(frozen=True)
class OcrDone:
    entry: ScanEntry
    result: OcrResult




def read_file(path: str, engine: OcrEngine, limits: DecodeLimits | None = None) -> OcrResult:
    """OCR one file through the safe decoder; a file that cannot be decoded is "no text"."""
    from .decode import decode_bytes
    from .decode import read_file as read_bytes

    limits = limits or DecodeLimits()
    try:
        image, _ = decode_bytes(read_bytes(path, limits), limits, None)
    except DecodeError as err:
        return OcrResult(engine.engine_id, (), 0.0, f"{err.reason}: {err.message}")
    return read_image(engine, image)


def ocr_task(entry: ScanEntry, cfg: Any, known: Any, engine_name: str = DEFAULT_ENGINE
             ) -> OcrDone | Failure:
    """The worker-side task for `DecodePool` (see `OcrPool`)."""
    from .workers import _test_hooks  # the reliability tests' crash/hang hooks apply here too

    _test_hooks(entry.path)
    return OcrDone(entry, read_file(entry.path, shared_engine(engine_name), cfg.limits))


@dataclass
class OcrPool:
    """Run OCR over files in crash-isolated worker processes (indexer.workers.DecodePool)."""

    engine: str = DEFAULT_ENGINE
    workers: int = 2
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    file_timeout: float = 120.0

    def map(self, items: Iterable[OcrItem]) -> Iterator[tuple[OcrItem, OcrResult]]:
        """(item, result) in input order; a crashed or hung reader gives a no-text result."""
        from .workers import DecodePool, WorkerConfig

        engine_id = shared_engine(self.engine).engine_id
        pending: dict[str, list[OcrItem]] = {}

        def entries() -> Iterator[ScanEntry]:
            for item in items:
                pending.setdefault(item.entry.path, []).append(item)
                yield item.entry

        cfg = WorkerConfig(_no_preprocess, self.limits, None, None,
                           task=functools.partial(ocr_task, engine_name=self.engine))
        pool = DecodePool(cfg, self.workers, chunk=1, file_timeout=self.file_timeout)
        for res in pool.map(entries()):
            path = res.path if isinstance(res, Failure) else res.entry.path
            item = pending[path].pop(0)
            if isinstance(res, OcrDone):
                yield item, res.result
            else:
                reason = getattr(res, "reason", "worker_failed")
                yield item, OcrResult(engine_id, (), 0.0,
                                      f"{reason}: {getattr(res, 'message', '')}")


def _no_preprocess(image: Image.Image) -> Any:
    raise NotImplementedError("OCR workers do not preprocess for the model")
