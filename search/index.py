"""The FAISS index of a store: built from stored vectors, published atomically, tagged with
the store generation it reflects, and rebuilt when stale, missing or corrupt.

Files live in `<store>/index/`: `index-g<generation>.faiss` and `current.json`, a pointer
written after the index file. A crash between the two leaves the old pointer (to the old,
intact file), which is then seen as stale and rebuilt.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from indexer.atomic import publish, publish_bytes
from indexer.errors import IndexError_, StoreLockedError
from indexer.faults import crash_point
from indexer.store import Store, WriterLock
from indexer.types import FloatArray, IdArray

from .exact import flat_codes_view, flat_ids, range_inner_product, topk_inner_product

log = logging.getLogger(__name__)

INDEX_DIR = "index"
POINTER = "current.json"
DEFAULT_INDEX_TYPE = "auto"
# From benchmarks/search.py (results/search.txt): exact flat search answers a query in ~10-25 ms
# up to a few hundred thousand vectors. Above that, IVF with nlist ~ 2 sqrt(n) (2048 at 1M),
# 8-bit scalar-quantised lists and an exact re-rank of 2k candidates from a flat copy
# ("SQ8,RFlat"): at 1M, nprobe 16 gave recall@20 0.999 at 78x exact search for single
# queries and 14x for batches of 100 (nprobe 8: 0.981, 109x / 21x). IVF1024,Flat reached
# only 3x exact for batches; HNSW32 lost recall at 1M.
AUTO_FLAT_MAX = 250_000
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
RERANK_FACTOR = 2.0  # refine indexes re-rank k x this candidates with exact inner products
RANGE_MARGIN = 0.05  # range search fetches candidates this far below the threshold, then
# keeps those whose exact score reaches it; 8-bit codes of 512-d unit vectors erred by
# <= 0.0023 (synthetic clustered and random sets), so 0.05 leaves a wide margin


def choose_index_type(n: int) -> str:
    """The factory string `auto` resolves to for a collection of n vectors."""
    if n <= AUTO_FLAT_MAX:
        return "Flat"
    nlist = 1 << max(6, round(math.log2(2 * math.sqrt(n))))
    return f"IVF{nlist},SQ8,RFlat"


@dataclass(frozen=True)
class IndexInfo:
    generation: int
    ntotal: int
    dim: int
    index_type: str
    file: str
    built_at: float
    build_seconds: float
    requested: str = ""  # what the user asked for ("auto" or a factory string)

    @property
    def wanted(self) -> str:
        return self.requested or self.index_type


class VectorIndex:
    """A FAISS index whose ids are store image ids, plus what it was built from."""

    def __init__(self, index: faiss.IndexIDMap2, info: IndexInfo) -> None:
        self.index = index
        self.info = info
        self._flat_views: tuple[FloatArray, IdArray] | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IdArray]:
        """Top-k by inner product (cosine on unit vectors); ids of -1 mean 'no more results'."""
        q = _check_queries(queries, self.info.dim)
        k = max(1, min(k, max(self.ntotal, 1)))
        flat = self._flat()
        if flat is None:
            if isinstance(faiss.downcast_index(self.index.index), faiss.IndexRefine):
                # k_factor per search, not stored: faiss's IndexRefine.range_search returns
                # wrong results when the index itself has k_factor != 1 (faiss 1.15.1)
                params = faiss.IndexRefineSearchParameters()
                params.k_factor = RERANK_FACTOR
                return self.index.search(q, k, params=params)
            return self.index.search(q, k)
        if self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, rows = topk_inner_product(flat[0], q, k)
        return scores, np.where(rows >= 0, flat[1][np.maximum(rows, 0)], -1)

    def range_search(self, queries: FloatArray, threshold: float
                     ) -> list[tuple[FloatArray, IdArray]]:
        q = _check_queries(queries, self.info.dim)
        flat = self._flat()
        if flat is not None:
            if self.ntotal == 0:
                return [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in q]
            return [(sc, flat[1][rows])
                    for sc, rows in range_inner_product(flat[0], q, threshold)]
        if isinstance(faiss.downcast_index(self.index.index), faiss.IndexRefine):
            return self._refined_range(q, threshold)
        lims, dist, ids = self.index.range_search(q, float(threshold))
        out = []
        for i in range(len(q)):
            s, e = lims[i], lims[i + 1]
            order = np.argsort(-dist[s:e], kind="stable")
            out.append((dist[s:e][order], ids[s:e][order]))
        return out

    def _refined_range(self, q: FloatArray, threshold: float
                       ) -> list[tuple[FloatArray, IdArray]]:
        """Range search of a refine index: candidates from its quantised lists at a lowered
        threshold, kept by their exact inner product (faiss's own filters on quantised
        scores, so it both misses and admits vectors near the threshold)."""
        inner: Any = faiss.downcast_index(self.index.index)
        vecs, ids = flat_codes_view(self.index), flat_ids(self.index)
        lims, _, rows = inner.base_index.range_search(q, float(threshold) - RANGE_MARGIN)
        out = []
        for i in range(len(q)):
            r = rows[lims[i]:lims[i + 1]]
            sc = vecs[r] @ q[i]
            keep = sc >= threshold
            r, sc = r[keep], sc[keep]
            order = np.argsort(-sc, kind="stable")
            out.append((sc[order].astype(np.float32), ids[r[order]].astype(np.int64)))
        return out

    def _flat(self) -> tuple[FloatArray, IdArray] | None:
        """(vectors, ids) views of a flat index, searched with clipdex's exact kernel, which
        beats faiss's flat search on this hardware (benchmarks/search.py); None otherwise."""
        if self._flat_views is None and isinstance(
                faiss.downcast_index(self.index.index), faiss.IndexFlat):
            self._flat_views = (flat_codes_view(self.index), flat_ids(self.index))
        return self._flat_views

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the recall/speed knobs of approximate indexes (ignored by flat ones)."""
        inner = faiss.downcast_index(self.index.index)
        if nprobe is not None and "IVF" in self.info.index_type:
            faiss.extract_index_ivf(inner).nprobe = int(nprobe)
        if ef_search is not None and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(ef_search)

    def ids(self) -> IdArray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)


def _check_queries(queries: FloatArray, dim: int) -> FloatArray:
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != dim:
        raise IndexError_(f"query has dimension {q.shape[1]}, index has {dim}")
    if not np.isfinite(q).all():
        raise IndexError_("query vector has NaN or infinite values")
    return q


def index_dir(store: Store) -> str:
    return os.path.join(store.path, INDEX_DIR)


def make_index(dim: int, index_type: str) -> faiss.IndexIDMap2:
    """IndexIDMap2 over the factory's index (flat by default), inner-product metric."""
    try:
        inner = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexError_(f"bad --index-type {index_type!r}: {err}") from err
    return faiss.IndexIDMap2(inner)


def _train(index: faiss.IndexIDMap2, vecs: FloatArray, index_type: str) -> None:
    if index.is_trained:
        return
    inner = faiss.downcast_index(index.index)
    nlist = getattr(faiss.extract_index_ivf(inner), "nlist", 0) if "IVF" in index_type else 0
    if nlist and len(vecs) < nlist:
        raise IndexError_(f"{index_type} needs at least {nlist} vectors to train, the store has "
                          f"{len(vecs)}; use a smaller nlist or the default Flat index")
    rng = np.random.default_rng(0)  # seeded sample: the same store gives the same index
    sample = vecs if len(vecs) <= 256 * max(nlist, 1) else vecs[
        np.sort(rng.choice(len(vecs), 256 * nlist, replace=False))]
    index.train(sample)


def build_index(store: Store, index_type: str = DEFAULT_INDEX_TYPE) -> VectorIndex:
    """Build from one consistent snapshot of the store's vectors."""
    t0 = time.perf_counter()
    gen, ids, vecs = store.snapshot()
    dim = store.identity().dim
    resolved = choose_index_type(len(ids)) if index_type == "auto" else index_type
    index = make_index(dim, resolved)
    if len(ids):
        _train(index, vecs, resolved)
        index.add_with_ids(vecs, ids)
    info = IndexInfo(generation=gen, ntotal=int(index.ntotal), dim=dim, index_type=resolved,
                     file="", built_at=time.time(), build_seconds=time.perf_counter() - t0,
                     requested=index_type)
    vindex = VectorIndex(index, info)
    vindex.tune(nprobe=DEFAULT_NPROBE, ef_search=DEFAULT_EF_SEARCH)  # saved with the index
    return vindex


def save_index(store: Store, vindex: VectorIndex) -> IndexInfo:
    """Publish `vindex` (file first, then the pointer); callers hold the store's writer lock."""
    folder = index_dir(store)
    os.makedirs(folder, exist_ok=True)
    name = f"index-g{vindex.info.generation}-{time.time_ns()}.faiss"

    def write(tmp: str) -> None:
        faiss.write_index(vindex.index, tmp)
        crash_point("during_index_write")

    publish(os.path.join(folder, name), write)
    crash_point("before_index_pointer")
    info = IndexInfo(**{**asdict(vindex.info), "file": name})
    publish_bytes(os.path.join(folder, POINTER), json.dumps(asdict(info), indent=1).encode())
    vindex.info = info
    # Older index files, and temp files of a publisher that was killed mid-write.
    leftovers = glob.glob(os.path.join(folder, "index-g*.faiss")) + glob.glob(
        os.path.join(folder, ".tmp-*"))
    for old in leftovers:
        if os.path.basename(old) != name:
            _remove_quietly(old)
    return info


def save_index_locked(store: Store, vindex: VectorIndex) -> IndexInfo:
    """save_index for a read-only opener: only under the writer lock, so it never races a build
    (two publishers would delete each other's files). Raises StoreLockedError when busy."""
    if not store.readonly:
        return save_index(store, vindex)
    lock = WriterLock(store.path)
    try:
        return save_index(store, vindex)
    finally:
        lock.release()


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_pointer(store: Store) -> IndexInfo | None:
    try:
        with open(os.path.join(index_dir(store), POINTER), encoding="utf-8") as f:
            return IndexInfo(**json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        log.warning("index pointer unreadable (%s); will rebuild", err)
        return None


def load_index(store: Store, mmap: bool = False) -> VectorIndex:
    """Read the published index as is; raise IndexError_ when missing or unreadable."""
    info = read_pointer(store)
    if info is None:
        raise IndexError_(f"no published index in {index_dir(store)}")
    path = os.path.join(index_dir(store), info.file)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(path, flags)
    except RuntimeError as err:
        raise IndexError_(f"index file {path} is corrupt or truncated: {err}") from err
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexError_(f"index file {path} is a {type(index).__name__}, not an IndexIDMap2")
    if index.ntotal != info.ntotal or index.d != info.dim:
        raise IndexError_(f"index file {path} holds {index.ntotal}x{index.d}, pointer says "
                          f"{info.ntotal}x{info.dim}")
    return VectorIndex(index, info)


def open_index(store: Store, index_type: str | None = None, persist: bool = True) -> VectorIndex:
    """The index for the store's current generation: loaded if fresh, else rebuilt.

    A rebuilt index is published when `persist` and the index folder is writable; a
    read-only reader keeps it in memory only.
    """
    try:
        vindex = load_index(store)
        fresh = vindex.info.generation == store.generation() and (
            index_type is None or index_type == vindex.info.wanted)
        if fresh:
            return vindex
        log.info("index is stale (generation %d, store %d); rebuilding",
                 vindex.info.generation, store.generation())
        index_type = index_type or vindex.info.wanted
    except IndexError_ as err:
        log.info("%s; rebuilding from the store", err)
    vindex = build_index(store, index_type or DEFAULT_INDEX_TYPE)
    if persist and os.access(store.path, os.W_OK):
        try:
            save_index_locked(store, vindex)
        except StoreLockedError:
            log.info("a build holds the store; using the rebuilt index in memory")
        except (OSError, RuntimeError) as err:  # faiss reports write errors as RuntimeError
            log.warning("could not publish rebuilt index (%s); using it in memory", err)
    return vindex
