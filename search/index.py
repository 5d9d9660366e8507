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
import os
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from indexer.atomic import publish, publish_bytes
from indexer.errors import IndexError_
from indexer.store import Store
from indexer.types import FloatArray, IdArray

log = logging.getLogger(__name__)

INDEX_DIR = "index"
POINTER = "current.json"
DEFAULT_INDEX_TYPE = "Flat"


@dataclass(frozen=True)
class IndexInfo:
    generation: int
    ntotal: int
    dim: int
    index_type: str
    file: str
    built_at: float
    build_seconds: float


class VectorIndex:
    """A FAISS index whose ids are store image ids, plus what it was built from."""

    def __init__(self, index: faiss.IndexIDMap2, info: IndexInfo) -> None:
        self.index = index
        self.info = info

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IdArray]:
        """Top-k by inner product (cosine on unit vectors); ids of -1 mean 'no more results'."""
        q = _check_queries(queries, self.info.dim)
        k = max(1, min(k, max(self.ntotal, 1)))
        scores, ids = self.index.search(q, k)
        return scores, ids

    def range_search(self, queries: FloatArray, threshold: float
                     ) -> list[tuple[FloatArray, IdArray]]:
        q = _check_queries(queries, self.info.dim)
        lims, dist, ids = self.index.range_search(q, float(threshold))
        out = []
        for i in range(len(q)):
            s, e = lims[i], lims[i + 1]
            order = np.argsort(-dist[s:e], kind="stable")
            out.append((dist[s:e][order], ids[s:e][order]))
        return out

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
    index = make_index(dim, index_type)
    if len(ids):
        _train(index, vecs, index_type)
        index.add_with_ids(vecs, ids)
    info = IndexInfo(generation=gen, ntotal=int(index.ntotal), dim=dim, index_type=index_type,
                     file="", built_at=time.time(), build_seconds=time.perf_counter() - t0)
    return VectorIndex(index, info)


def save_index(store: Store, vindex: VectorIndex) -> IndexInfo:
    folder = index_dir(store)
    os.makedirs(folder, exist_ok=True)
    name = f"index-g{vindex.info.generation}-{time.time_ns()}.faiss"
    publish(os.path.join(folder, name), lambda tmp: faiss.write_index(vindex.index, tmp))
    info = IndexInfo(**{**asdict(vindex.info), "file": name})
    publish_bytes(os.path.join(folder, POINTER), json.dumps(asdict(info), indent=1).encode())
    vindex.info = info
    for old in glob.glob(os.path.join(folder, "index-g*.faiss")):
        if os.path.basename(old) != name:
            _remove_quietly(old)
    return info


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
            index_type is None or index_type == vindex.info.index_type)
        if fresh:
            return vindex
        log.info("index is stale (generation %d, store %d); rebuilding",
                 vindex.info.generation, store.generation())
        index_type = index_type or vindex.info.index_type
    except IndexError_ as err:
        log.info("%s; rebuilding from the store", err)
    vindex = build_index(store, index_type or DEFAULT_INDEX_TYPE)
    if persist and os.access(store.path, os.W_OK):
        try:
            save_index(store, vindex)
        except OSError as err:
            log.warning("could not publish rebuilt index (%s); using it in memory", err)
    return vindex
