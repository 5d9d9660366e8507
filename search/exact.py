"""Exact (brute-force) inner-product search over a float32 matrix, faster than faiss IndexFlatIP.

The score matrix is computed block by block with numpy's BLAS (``block @ queries.T``) into a
small reused tile, and candidates are picked from the tile while it is still in cache:

* a per-chunk maximum (``_CHUNK`` rows) is compared with each query's current limit, so only
  the few chunks that can hold a result are looked at element by element;
* after the first block the limit is the query's current k-th best score, which rises quickly,
  so later blocks yield almost no candidates;
* candidates are merged into the running top-k with one ``np.lexsort`` per merge, which gives
  the pinned order: score descending, ties broken by the lower row.

faiss's flat search is slower here because it ships an old OpenBLAS (0.3.15, Zen kernels) for
batches and runs a single query on one thread; numpy's OpenBLAS is newer (AVX-512 kernels) and
its GEMV uses every core, so a single query runs at memory bandwidth.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.types import FloatArray, IdArray

__all__ = [
    "flat_codes_view",
    "flat_ids",
    "range_inner_product",
    "topk_inner_product",
]

# Rows per chunk for the chunk-maximum prefilter: small enough that a chunk rarely holds a
# candidate once the limit has settled, large enough that the maxima are a small array.
_CHUNK = 64
# The score tile (block_rows x queries) is kept near 1 MiB so it is still in L2 when scanned.
_TILE_FLOATS = 1 << 18
_MIN_BLOCK_ROWS = 1024
_MAX_BLOCK_ROWS = 1 << 16
# Queries are searched in groups so the tile stays small; each extra group re-reads the
# database once, which costs a few percent of the GEMM time at this size.
_QUERY_GROUP = 256
# Up to this many queries go through one whole-matrix product instead of the blocked scan.
_FEW_QUERIES = 8


def topk_inner_product(
    db: FloatArray, queries: FloatArray, k: int, *, block_rows: int | None = None
) -> tuple[FloatArray, IdArray]:
    """Return the k rows of ``db`` with the largest inner product with each query.

    ``db`` is an [n, d] float32 matrix (a read-only view or ``np.memmap`` is fine; it is never
    copied as a whole). ``queries`` is [m, d]; a float dtype other than float32 is converted.
    Returns ``(scores, rows)`` of shape [m, min(k, n)]: float32 scores in descending order and
    int64 row numbers, ties broken by the lower row. ``block_rows`` overrides the number of
    database rows scored per step (default: sized so the score tile fits in L2).

    Raises ValueError for non-2D input, a dtype other than float32 for ``db``, a dimension
    mismatch, ``k < 1``, or a query holding NaN or infinity (faiss silently returns -1 labels
    for NaN queries). Rows of ``db`` are assumed finite, as the store guarantees; a row whose
    score is NaN is never returned, and if fewer than min(k, n) rows have a usable score the
    remaining slots hold score -inf and row -1.
    """
    db, q = _checked(db, queries)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, db.shape[0])
    scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    rows = np.full((q.shape[0], k), -1, dtype=np.int64)
    if k == 0:
        return scores, rows
    if q.shape[0] <= _FEW_QUERIES and block_rows is None:
        return _topk_few(db, q, k)
    for lo in range(0, q.shape[0], _QUERY_GROUP):
        group = q[lo : lo + _QUERY_GROUP]
        scores[lo : lo + len(group)], rows[lo : lo + len(group)] = _topk_group(
            db, group, k, block_rows
        )
    return scores, rows


def _topk_few(db: FloatArray, q: FloatArray, k: int) -> tuple[FloatArray, IdArray]:
    """A handful of queries: one multi-threaded GEMV/GEMM over all of db, then a partition.

    The [n, m] score matrix is small here (4 MiB per query at 1M rows), and a single pass at
    memory bandwidth beats the blocked scan, whose per-block bookkeeping dominates at m=1.
    """
    m = q.shape[0]
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    rows = np.full((m, k), -1, dtype=np.int64)
    all_scores = db @ q.T  # [n, m]
    for j in range(m):
        col = all_scores[:, j]
        col = np.where(np.isnan(col), np.float32(-np.inf), col)
        kth = np.partition(col, len(col) - k)[len(col) - k]
        cand = np.flatnonzero(col >= kth)  # ties at the k-th score included, then cut by row
        order = np.lexsort((cand, -col[cand]))[:k]
        keep = cand[order][np.isfinite(col[cand[order]])]
        scores[j, : len(keep)], rows[j, : len(keep)] = col[keep], keep
    return scores, rows


def range_inner_product(
    db: FloatArray, queries: FloatArray, threshold: float, *, block_rows: int | None = None
) -> list[tuple[FloatArray, IdArray]]:
    """Return, for each query, every row with score >= ``threshold``, best first.

    Each list entry is ``(scores, rows)`` for one query, sorted by score descending and then by
    row. Input rules and errors are those of ``topk_inner_product``; a NaN threshold is refused.
    The result size is not bounded: a low threshold returns most of the database per query.
    """
    db, q = _checked(db, queries)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    limit = _float32_at_least(threshold)
    results: list[tuple[FloatArray, IdArray]] = []
    for lo in range(0, q.shape[0], _QUERY_GROUP):
        group = q[lo : lo + _QUERY_GROUP]
        results.extend(_range_group(db, group, limit, block_rows))
    return results


def flat_codes_view(index: Any) -> FloatArray:
    """Return the [ntotal, d] float32 vectors of a faiss flat index without copying them.

    ``index`` is a ``faiss.IndexFlat`` (IndexFlatIP, any metric), an ``IndexRefineFlat`` (its
    exact copy) or an ``IndexIDMap``/``IndexIDMap2`` wrapping either; an index read with
    ``faiss.IO_FLAG_MMAP_IFC`` gives a view of the mapped file. The view is read-only and keeps
    ``index`` alive, but it is only valid until vectors are added to or removed from the index
    (the storage may move).
    """
    import faiss

    flat = _inner_flat(index)
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.empty((0, d), dtype=np.float32)
    view = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    return _borrowed(view, owner=index)


def flat_ids(index: Any) -> IdArray:
    """Return the external id of each row of ``flat_codes_view(index)`` (int64, read-only).

    For an ``IndexIDMap``/``IndexIDMap2`` this is a view of its ``id_map``, with the same
    validity rule as ``flat_codes_view``; for a bare flat index the ids are the row numbers.
    """
    import faiss

    flat = _inner_flat(index)
    n = int(flat.ntotal)
    if flat is index or n == 0:
        ids = np.arange(n, dtype=np.int64)
        ids.flags.writeable = False
        return ids
    return _borrowed(faiss.rev_swig_ptr(index.id_map.data(), n), owner=index)


# --- selection ---------------------------------------------------------------------------


class _TopK:
    """Running top-k per query, merged in batches of pending candidates."""

    def __init__(self, m: int, k: int) -> None:
        self.k = k
        self.scores = np.full((m, k), -np.inf, dtype=np.float32)
        self.rows = np.full((m, k), -1, dtype=np.int64)
        self._pending: list[tuple[IdArray, FloatArray, IdArray]] = []
        self._npending = 0
        # Merging costs a sort of m*k + pending items, so wait until pending is about that big.
        self._merge_at = max(m * k, 4096)

    def limit(self) -> FloatArray:
        """Smallest score a later (higher) row needs to enter: strictly above the k-th best."""
        return np.nextafter(self.scores[:, -1], np.float32(np.inf))

    def add(self, q: IdArray, s: FloatArray, r: IdArray, *, merge: bool = False) -> None:
        if len(q):
            self._pending.append((q, s, r))
            self._npending += len(q)
        if merge or self._npending >= self._merge_at:
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        m, k = self.scores.shape
        q = np.concatenate([np.repeat(np.arange(m), k), *(p[0] for p in self._pending)])
        s = np.concatenate([self.scores.ravel(), *(p[1] for p in self._pending)])
        r = np.concatenate([self.rows.ravel(), *(p[2] for p in self._pending)])
        self._pending, self._npending = [], 0
        order = np.lexsort((r, -s, q))
        counts = np.bincount(q, minlength=m)  # every query has at least its k current entries
        take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]
        self.scores, self.rows = s[take], r[take]


def _topk_group(
    db: FloatArray, q: FloatArray, k: int, block_rows: int | None
) -> tuple[FloatArray, IdArray]:
    """Top-k for one group of queries: one pass over ``db``."""
    best = _TopK(len(q), k)
    blocks = _Blocks(db, q, max(k, _block_rows(block_rows, len(q))))
    for start, tile in blocks:
        if start == 0:
            # Seed the limit with the first block's k-th best (ties included, so >=).
            kth = np.partition(tile[: blocks.rows_in(start)], -k, axis=0)[-k]
            limit = np.where(np.isnan(kth), np.float32(-np.inf), kth)
            best.add(*_scan(tile, start, limit), merge=True)
        else:
            best.add(*_scan(tile, start, best.limit()))
    best.merge()
    return best.scores, best.rows


def _range_group(
    db: FloatArray, q: FloatArray, limit: np.float32, block_rows: int | None
) -> list[tuple[FloatArray, IdArray]]:
    """Range search for one group of queries: one pass over ``db``."""
    m = len(q)
    limits = np.full(m, limit, dtype=np.float32)
    found = [
        _scan(tile, start, limits) for start, tile in _Blocks(db, q, _block_rows(block_rows, m))
    ]
    qi = np.concatenate([np.empty(0, np.int64), *(f[0] for f in found)])
    s = np.concatenate([np.empty(0, np.float32), *(f[1] for f in found)])
    r = np.concatenate([np.empty(0, np.int64), *(f[2] for f in found)])
    order = np.lexsort((r, -s, qi))
    bounds = np.cumsum(np.bincount(qi, minlength=m))[:-1]
    return [(s[o], r[o]) for o in np.split(order, bounds)]


def _scan(tile: FloatArray, start: int, limit: FloatArray) -> tuple[IdArray, FloatArray, IdArray]:
    """Return (query, score, row) of every tile entry with score >= limit[query]."""
    nchunks, m = tile.shape[0] // _CHUNK, tile.shape[1]
    chunks = tile.reshape(nchunks, _CHUNK, m)
    # fmax ignores NaN (padding rows, or a NaN row), so one cannot hide a chunk's real maximum.
    chunk_hit, query = np.nonzero(np.fmax.reduce(chunks, axis=1) >= limit)
    sub = chunks[chunk_hit, :, query]  # [hits, _CHUNK]
    hit, offset = np.nonzero(sub >= limit[query, None])
    rows = start + chunk_hit[hit] * _CHUNK + offset
    return query[hit].astype(np.int64), sub[hit, offset], rows.astype(np.int64)


class _Blocks:
    """Iterate (start_row, score_tile) over ``db``; the tile is reused between steps.

    The tile is [block_rows rounded up to _CHUNK, m]; rows past the end of a short last block
    are NaN, which every comparison rejects.
    """

    def __init__(self, db: FloatArray, q: FloatArray, block_rows: int) -> None:
        self.db, self.qt, self.n = db, q.T, db.shape[0]
        self.block_rows = min(block_rows, max(self.n, 1))
        padded = -(-self.block_rows // _CHUNK) * _CHUNK
        self.tile = np.empty((padded, len(q)), dtype=np.float32)

    def rows_in(self, start: int) -> int:
        return min(self.block_rows, self.n - start)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for start in range(0, self.n, self.block_rows):
            b = self.rows_in(start)
            np.matmul(self.db[start : start + b], self.qt, out=self.tile[:b])
            self.tile[b:] = np.nan
            yield start, self.tile


# --- input checks and helpers ------------------------------------------------------------


def _checked(db: FloatArray, queries: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Validate inputs; return db as a plain ndarray view and queries as C-contiguous float32."""
    db = np.asarray(db)  # an np.memmap becomes a plain view of the same memory
    queries = np.asarray(queries)
    if db.ndim != 2 or queries.ndim != 2:
        raise ValueError(f"db and queries must be 2-D, got {db.ndim}-D and {queries.ndim}-D")
    if db.dtype != np.float32:
        raise ValueError(f"db must be float32, got {db.dtype}")
    if not np.issubdtype(queries.dtype, np.floating):
        raise ValueError(f"queries must be a float array, got {queries.dtype}")
    if queries.shape[1] != db.shape[1]:
        raise ValueError(
            f"dimension mismatch: db has d={db.shape[1]}, queries d={queries.shape[1]}"
        )
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise ValueError(f"queries must be finite; rows {bad[:10].tolist()} hold NaN or inf")
    return db, q


def _block_rows(block_rows: int | None, m: int) -> int:
    if block_rows is None:
        rows = _TILE_FLOATS // max(m, 1)
        return min(max(rows, _MIN_BLOCK_ROWS), _MAX_BLOCK_ROWS)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return block_rows


def _float32_at_least(threshold: float) -> np.float32:
    """The smallest float32 t with t >= threshold, so ``score >= t`` matches exactly."""
    t = np.float32(threshold)
    if float(t) < threshold:
        t = np.nextafter(t, np.float32(np.inf))
    return t


class _Borrowed:
    """Exposes a read-only view of foreign memory and keeps the memory's owner alive."""

    def __init__(self, view: npt.NDArray[Any], owner: Any) -> None:
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], True)
        self.__array_interface__ = interface
        self._owner = owner


def _borrowed(view: npt.NDArray[Any], owner: Any) -> npt.NDArray[Any]:
    return np.asarray(_Borrowed(view, owner))


def _inner_flat(index: Any) -> Any:
    """The IndexFlat holding the vectors of ``index``: itself, or the one an IDMap wraps, or
    the exact copy an IndexRefineFlat re-ranks with."""
    import faiss

    flat = index
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        flat = faiss.downcast_index(index.index)
    if isinstance(flat, faiss.IndexRefine):
        flat = faiss.downcast_index(flat.refine_index)
    if not isinstance(flat, faiss.IndexFlat):
        raise ValueError(
            f"expected a faiss IndexFlat or an IDMap of one, got {type(index).__name__}"
        )
    return flat
