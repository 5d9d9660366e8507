"""The search-and-detection service behind `clipdex serve`: one store, one model, one thread.

Every method here touches LMDB, FAISS, torch or Pillow, and the server calls them all from a
single worker thread: decode_bytes's warning filters are process-global, the model serves one
caller at a time, and the index can be swapped between two requests without a lock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb

from indexer.decode import DecodeLimits
from indexer.embed import Embedder
from indexer.errors import ClassifierError, ClipdexError, DecodeError, IndexError_, QueryError
from indexer.store import Store
from indexer.types import FloatArray

from .index import POINTER, index_dir, load_index, open_index, read_pointer
from .query import Hit, Searcher
from .thumbs import ThumbnailCache, stored_thumbnail

log = logging.getLogger(__name__)

T = TypeVar("T")
IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # an image's opaque id is its sha256
NO_DETECTOR = "no detector trained: run `clipdex detect train` on this store"


class UnknownIdError(QueryError):
    """No indexed image has this id."""


class NoDetectorError(ClassifierError):
    """The store has no usable trained detector."""


@dataclass(frozen=True)
class Answer:
    kind: str  # "image" | "text" | "id"
    hits: list[Hit]
    generation: int  # the index generation that answered


@dataclass(frozen=True)
class Detection:
    verdict: Any  # search.detect.Verdict (imported lazily)
    neighbour_ids: list[str | None]  # opaque ids of the labelled neighbours still stored


def _stamp(path: str) -> tuple[int, int, int] | None:
    """Cheap change detector for a file published by os.replace (new inode each time)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class SearchService:
    """Answers the HTTP API's questions; the index follows `index build` without a restart."""

    def __init__(self, store: Store, embedder: Embedder, upload_limits: DecodeLimits,
                 reload_interval: float = 1.0) -> None:
        self.store = store
        self.embedder = embedder
        self.upload_limits = upload_limits
        # Stored files were admitted by the build's own limits; only the formats carry over.
        self.file_limits = DecodeLimits(formats=upload_limits.formats)
        self.reload_interval = reload_interval
        self.thumbs = ThumbnailCache()
        self._pointer = os.path.join(index_dir(store), POINTER)
        self._stamp = _stamp(self._pointer)
        self._searcher = self._make_searcher(open_index(store, persist=False))
        self._checked = time.monotonic()
        self._detector: Any = None
        self._detector_stamp: tuple[int, int, int] | None = None

    def _make_searcher(self, index: Any) -> Searcher:
        return Searcher(self.store, index, lambda: self.embedder, self.upload_limits)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one request; a reader whose map was outgrown by the writer adopts the new size."""
        try:
            return fn(*args)
        except lmdb.MapResizedError:
            self.store.env.set_mapsize(0)
            return fn(*args)

    # ---- the index follows the writer --------------------------------------------------------
    @property
    def searcher(self) -> Searcher:
        now = time.monotonic()
        if now - self._checked >= self.reload_interval:
            self._checked = now
            self._maybe_reload()
        return self._searcher

    def _maybe_reload(self) -> None:
        stamp = _stamp(self._pointer)
        if stamp is None or stamp == self._stamp:
            return
        info = read_pointer(self.store)
        if info is None or info.file == self._searcher.index.info.file:
            self._stamp = stamp
            return
        try:
            index = load_index(self.store)
        except IndexError_ as err:  # keep answering from the old index; retry next time
            log.warning("new index not loaded, keeping generation %d: %s",
                        self._searcher.index.info.generation, err)
            return
        self._searcher, self._stamp = self._make_searcher(index), stamp
        log.info("index reloaded: generation %d, %d vectors", index.info.generation,
                 index.ntotal)

    # ---- queries -----------------------------------------------------------------------------
    def search_upload(self, data: bytes, k: int, threshold: float | None) -> Answer:
        return self._answer("image", self._upload_vector(data), k, threshold)

    def search_text(self, text: str, k: int, threshold: float | None) -> Answer:
        return self._answer("text", self.searcher.text_vector(text), k, threshold)

    def search_id(self, image_id: str, k: int, threshold: float | None) -> Answer:
        """Images similar to a stored one (the image itself is left out)."""
        img = self._stored(image_id)
        vec = self.store.vector(img.id)
        if vec is None:
            raise UnknownIdError(f"no indexed image has id {image_id}")
        return self._answer("id", vec, k, threshold, exclude_id=img.id)

    def _answer(self, kind: str, vec: FloatArray, k: int, threshold: float | None,
                exclude_id: int | None = None) -> Answer:
        searcher = self.searcher
        hits = searcher.search_vector(vec, k, threshold, exclude_id)
        return Answer(kind, hits, searcher.index.info.generation)

    def _upload_vector(self, data: bytes) -> FloatArray:
        try:
            return self.searcher.data_vector(data)
        except ClipdexError:
            raise
        except Exception as err:  # hostile bytes must never become a 500
            raise DecodeError("corrupt", f"{type(err).__name__}: {err}") from err

    def _stored(self, image_id: str) -> Any:
        img = self.store.image(image_id) if IMAGE_ID.fullmatch(image_id) else None
        if img is None:
            raise UnknownIdError(f"no indexed image has id {image_id[:80]!r}")
        return img

    # ---- detection ---------------------------------------------------------------------------
    def detector(self) -> Any:
        """The store's trained detector, reloaded when `detect train` publishes a new one."""
        from .detect import POINTER as DETECTOR_POINTER
        from .detect import detector_dir, load_detector

        stamp = _stamp(os.path.join(detector_dir(self.store), DETECTOR_POINTER))
        if stamp is None:
            raise NoDetectorError(NO_DETECTOR)
        if self._detector is None or stamp != self._detector_stamp:
            self._detector = load_detector(self.store)
            self._detector_stamp = stamp
        return self._detector

    def detect_upload(self, data: bytes) -> Detection:
        detector = self.detector()
        verdict = detector.score_vectors(self._upload_vector(data)[None])[0]
        ids = [self.store.sha_for_path(n.path) for n in verdict.neighbours]
        return Detection(verdict, [i if i and self.store.has_image(i) else None for i in ids])

    # ---- store facts and pictures ------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        ident = self.store.identity()
        info = self.searcher.index.info
        try:
            has_detector = self.detector() is not None
        except (ClassifierError, ImportError):
            has_detector = False
        return {"counts": self.store.counts(), "generation": self.store.generation(),
                "index": {"generation": info.generation, "ntotal": info.ntotal,
                          "index_type": info.index_type},
                "index_fresh": info.generation == self.store.generation(),
                "model": {"name": ident.name, "pretrained": ident.pretrained, "dim": ident.dim,
                          "random_init": ident.random_init},
                "detector": has_detector}

    def thumbnail(self, image_id: str) -> bytes:
        cached = self.thumbs.get(image_id)
        if cached is not None:
            return cached
        data = stored_thumbnail(self._stored(image_id), self.file_limits)
        self.thumbs.put(image_id, data)
        return data
