"""Queries against a store: by image file (indexed or not), by stored path, or by text."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from indexer.decode import DecodeLimits, read_file
from indexer.embed import Embedder
from indexer.errors import ClipdexError, DecodeError, QueryError
from indexer.store import Store
from indexer.types import FloatArray
from indexer.vectors import normalize_rows

from .index import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    sha256: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class QueryResult:
    query: str
    kind: str  # "image" | "path" | "text" | "vector"
    hits: list[Hit] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Searcher:
    """Answers queries; the model is loaded only when a query needs it (lazy `embedder`)."""

    def __init__(self, store: Store, index: VectorIndex,
                 embedder: Callable[[], Embedder] | None = None,
                 limits: DecodeLimits | None = None) -> None:
        self.store = store
        self.index = index
        self._embedder_factory = embedder
        self._embedder: Embedder | None = None
        self.limits = limits or DecodeLimits()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            if self._embedder_factory is None:
                raise QueryError("this query needs the model, and none was given")
            try:
                self._embedder = self._embedder_factory()
            except ClipdexError:
                raise
            except Exception as err:  # open_clip/torch fail in many types: this query fails,
                # the queries that need no model (stored paths and bytes) are still answered
                first = str(err).splitlines()[0][:300] if str(err) else ""
                raise QueryError(f"cannot load the store's model: {type(err).__name__}: "
                                 f"{first}") from err
        return self._embedder

    # ---- vectors for each kind of query -------------------------------------------------------
    def image_vector(self, path: str) -> FloatArray:
        """A file's vector: the stored one when its bytes are indexed, else embedded now."""
        return self.data_vector(read_file(path, self.limits))

    def data_vector(self, data: bytes) -> FloatArray:
        """Untrusted bytes' vector: the stored one when they are indexed, else embedded now."""
        sha = hashlib.sha256(data).hexdigest()
        stored = self.store.image(sha)
        if stored is not None:
            vec = self.store.vector(stored.id)
            if vec is not None:
                return vec
        return self.bytes_vector(data)

    def bytes_vector(self, data: bytes) -> FloatArray:
        from indexer.decode import decode_bytes

        emb = self.embedder
        image, _ = decode_bytes(data, self.limits, min_side=2 * emb.input_side)
        raw = emb.embed_pixels(emb.preprocess(image)[None])
        return self._validated(raw)

    def text_vector(self, text: str) -> FloatArray:
        if not text.strip():
            raise QueryError("empty text query")
        return self._validated(self.embedder.embed_texts([text]))

    def path_vector(self, path: str) -> FloatArray:
        sha = self.store.sha_for_path(path)
        stored = self.store.image(sha) if sha else None
        vec = self.store.vector(stored.id) if stored else None
        if vec is None:
            raise QueryError(f"{path} is not in the store")
        return vec

    def _validated(self, raw: FloatArray) -> FloatArray:
        vecs, reasons = normalize_rows(raw, self.index.info.dim)
        if reasons[0] is not None:
            raise QueryError(f"query embedding refused: {reasons[0]}")
        return vecs[0]

    # ---- answering ---------------------------------------------------------------------------
    def search_vector(self, vec: FloatArray, k: int, threshold: float | None = None,
                      exclude_id: int | None = None) -> list[Hit]:
        scores, ids = self.index.search(vec[None], k + (1 if exclude_id is not None else 0))
        hits: list[Hit] = []
        for score, image_id in zip(scores[0], ids[0], strict=True):
            if image_id < 0 or image_id == exclude_id:
                continue
            if threshold is not None and score < threshold:
                break
            img = self.store.image_by_id(int(image_id))
            if img is None:  # index one generation behind a prune: skip, never crash
                continue
            hits.append(Hit(len(hits) + 1, float(score), int(image_id), img.sha256, img.paths))
            if len(hits) == k:
                break
        return hits

    def query(self, kind: str, query: str, k: int, threshold: float | None = None
              ) -> QueryResult:
        """One query; its failure is reported in the result, never raised."""
        try:
            vec = self._vector_for(kind, query)
            return QueryResult(query, kind, self.search_vector(vec, k, threshold))
        except DecodeError as err:
            return QueryResult(query, kind, error=f"{err.reason}: {err.message}")
        except ClipdexError as err:
            return QueryResult(query, kind, error=str(err))

    def _vector_for(self, kind: str, query: str) -> FloatArray:
        if kind == "image":
            if not os.path.exists(query):
                raise QueryError(f"no such file: {query}")
            return self.image_vector(query)
        if kind == "path":
            return self.path_vector(query)
        if kind == "text":
            return self.text_vector(query)
        raise QueryError(f"unknown query kind {kind!r}")


def as_unit(vec: FloatArray) -> FloatArray:
    return (vec / np.linalg.norm(vec)).astype(np.float32)
