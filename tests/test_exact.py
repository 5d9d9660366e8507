"""Exact search returns the true top-k / range results, in the pinned order, for any input shape."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from search.exact import flat_codes_view, flat_ids, range_inner_product, topk_inner_product

D = 32
TOL = 1e-5  # float32 dot products of unit vectors, summed in different orders


def unit_vectors(n: int, seed: int, d: int = D) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores; order by score descending, then row."""
    s = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def assert_true_topk(db: np.ndarray, q: np.ndarray, k: int, scores, rows) -> None:
    """Rows are distinct, scores are theirs, descending, and nothing left out scores higher."""
    exact = q.astype(np.float64) @ db.astype(np.float64).T
    assert scores.shape == rows.shape == (len(q), min(k, len(db)))
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    for i in range(len(q)):
        assert len(set(rows[i].tolist())) == rows.shape[1]
        np.testing.assert_allclose(scores[i], exact[i, rows[i]], atol=TOL)
        assert np.all(np.diff(scores[i]) <= 0)
        left_out = np.delete(exact[i], rows[i])
        if left_out.size:
            assert left_out.max() <= scores[i, -1] + TOL


@pytest.mark.parametrize("m", [1, 7, 300])  # 300 > one query group
@pytest.mark.parametrize("block_rows", [None, 1, 100, 4096])
def test_topk_is_the_true_topk(m, block_rows):
    db, q = unit_vectors(3000, 0), unit_vectors(m, 1)
    scores, rows = topk_inner_product(db, q, 20, block_rows=block_rows)
    assert_true_topk(db, q, 20, scores, rows)


def test_topk_matches_faiss_flat_ip():
    db, q = unit_vectors(5000, 2), unit_vectors(50, 3)
    index = faiss.IndexFlatIP(D)
    index.add(db)
    f_scores, f_rows = index.search(q, 10)
    scores, rows = topk_inner_product(db, q, 10)
    np.testing.assert_allclose(scores, f_scores, atol=TOL)
    # Same rows unless two scores are within rounding of each other.
    gaps = np.abs(np.diff(f_scores, axis=1)).min(axis=1)
    clear = gaps > 10 * TOL
    assert clear.sum() > 40
    np.testing.assert_array_equal(rows[clear], f_rows[clear])


@pytest.mark.parametrize("k", [5, 6, 50])
def test_k_at_or_above_n_returns_every_row_sorted(k):
    db, q = unit_vectors(6, 4), unit_vectors(3, 5)
    scores, rows = topk_inner_product(db, q, k)
    assert rows.shape == (3, min(k, 6))
    assert_true_topk(db, q, k, scores, rows)
    if k >= 6:
        assert all(sorted(r) == list(range(6)) for r in rows.tolist())


def test_ties_are_broken_by_lower_row_across_blocks():
    # Integer-valued vectors make every score exact, so ties are real ties.
    rng = np.random.default_rng(6)
    db = rng.integers(-2, 3, size=(500, 8)).astype(np.float32)
    q = rng.integers(-2, 3, size=(20, 8)).astype(np.float32)
    want_s, want_r = brute_force(db, q, 25)
    for block_rows in (None, 1, 7, 64):
        scores, rows = topk_inner_product(db, q, 25, block_rows=block_rows)
        np.testing.assert_array_equal(scores, want_s.astype(np.float32))
        np.testing.assert_array_equal(rows, want_r)


def test_duplicate_rows_come_back_in_row_order():
    db = np.repeat(unit_vectors(1, 7), 10, axis=0)
    scores, rows = topk_inner_product(db, db[:1], 4, block_rows=3)
    assert rows.tolist() == [[0, 1, 2, 3]]
    assert len(set(scores[0].tolist())) == 1


def test_memmap_and_read_only_db(tmp_path):
    db, q = unit_vectors(2000, 8), unit_vectors(5, 9)
    np.save(tmp_path / "v.npy", db)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    want = topk_inner_product(db, q, 15)
    for view in (mapped, np.memmap(tmp_path / "v.npy", np.float32, "r", 128, db.shape)):
        got = topk_inner_product(view, q, 15, block_rows=300)
        # Block shape and alignment change the BLAS summation order, so scores may differ
        # in the last bit; the rows of well-separated random data do not.
        np.testing.assert_allclose(got[0], want[0], atol=TOL)
        np.testing.assert_array_equal(got[1], want[1])


def test_float64_queries_are_accepted():
    db, q = unit_vectors(100, 10), unit_vectors(2, 11)
    a = topk_inner_product(db, q.astype(np.float64), 5)
    b = topk_inner_product(db, q, 5)
    np.testing.assert_array_equal(a[1], b[1])


def test_nan_db_row_is_never_returned():
    db = unit_vectors(200, 12)
    db[[0, 150]] = np.nan
    scores, rows = topk_inner_product(db, db[1:3], 10, block_rows=64)
    assert not np.isin(rows, [0, 150]).any()
    assert np.isfinite(scores).all()


def test_empty_inputs():
    db = unit_vectors(10, 13)
    scores, rows = topk_inner_product(db, np.empty((0, D), np.float32), 3)
    assert scores.shape == rows.shape == (0, 3)
    scores, rows = topk_inner_product(np.empty((0, D), np.float32), db[:2], 3)
    assert scores.shape == rows.shape == (2, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_query_is_refused(bad):
    db, q = unit_vectors(10, 14), unit_vectors(3, 15)
    q[1, 4] = bad
    with pytest.raises(ValueError, match="finite"):
        topk_inner_product(db, q, 3)
    with pytest.raises(ValueError, match="finite"):
        range_inner_product(db, q, 0.5)


@pytest.mark.parametrize(
    "db, q, k",
    [
        (np.zeros((10, D), np.float32), np.zeros((2, D + 1), np.float32), 3),  # dim mismatch
        (np.zeros((10, D), np.float32), np.zeros(D, np.float32), 3),  # 1-D query
        (np.zeros(D, np.float32), np.zeros((2, D), np.float32), 3),  # 1-D db
        (np.zeros((10, D), np.float64), np.zeros((2, D), np.float32), 3),  # float64 db
        (np.zeros((10, D), np.float32), np.zeros((2, D), np.int32), 3),  # int queries
        (np.zeros((10, D), np.float32), np.zeros((2, D), np.float32), 0),  # k < 1
    ],
)
def test_bad_input_is_refused(db, q, k):
    with pytest.raises(ValueError):
        topk_inner_product(db, q, k)


def test_bad_block_rows_and_threshold_are_refused():
    db = unit_vectors(10, 16)
    with pytest.raises(ValueError):
        topk_inner_product(db, db, 3, block_rows=0)
    with pytest.raises(ValueError):
        range_inner_product(db, db, float("nan"))


@pytest.mark.parametrize("threshold", [0.3, 0.9, 2.0, -np.inf])
@pytest.mark.parametrize("block_rows", [None, 5, 256])
def test_range_search_matches_brute_force(threshold, block_rows):
    db, q = unit_vectors(1500, 17, d=8), unit_vectors(40, 18, d=8)
    got = range_inner_product(db, q, threshold, block_rows=block_rows)
    s32 = q @ db.T  # same float32 products the kernel compares, up to summation order
    assert len(got) == len(q)
    for i, (scores, rows) in enumerate(got):
        assert scores.dtype == np.float32 and rows.dtype == np.int64
        assert np.all(scores >= threshold)
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, s32[i, rows], atol=TOL)
        certain = np.flatnonzero(s32[i] >= threshold + TOL)
        unsure = np.flatnonzero(np.abs(s32[i] - threshold) < TOL)
        assert set(certain) <= set(rows.tolist()) <= set(certain) | set(unsure)


def test_range_search_orders_ties_by_row():
    db = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # rows 0-2 equal, 3-5 equal, ...
    scores, rows = range_inner_product(db, db[[4]], 1.0, block_rows=2)[0]
    assert rows.tolist() == [3, 4, 5]
    assert scores.tolist() == [1.0, 1.0, 1.0]


def test_range_threshold_is_inclusive_at_float32_resolution():
    db = np.array([[0.5], [0.25], [0.75]], np.float32)
    _, rows = range_inner_product(db, np.ones((1, 1), np.float32), 0.5)[0]
    assert rows.tolist() == [2, 0]


def test_flat_codes_view_is_zero_copy_and_read_only():
    db = unit_vectors(300, 19)
    index = faiss.IndexFlatIP(D)
    index.add(db)
    view = flat_codes_view(index)
    np.testing.assert_array_equal(view, db)
    assert view.shape == (300, D) and view.dtype == np.float32
    assert not view.flags.writeable
    assert view.ctypes.data == faiss.rev_swig_ptr(index.get_xb(), 1).ctypes.data
    np.testing.assert_array_equal(flat_ids(index), np.arange(300))


def test_flat_codes_view_of_idmap2_with_ids_and_search_agrees_with_faiss():
    db, q = unit_vectors(400, 20), unit_vectors(5, 21)
    ids = np.arange(400, dtype=np.int64) * 10 + 7
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    index.add_with_ids(db, ids)
    view, view_ids = flat_codes_view(index), flat_ids(index)
    np.testing.assert_array_equal(view, db)
    np.testing.assert_array_equal(view_ids, ids)
    inner = faiss.downcast_index(index.index)
    assert np.shares_memory(view, faiss.rev_swig_ptr(inner.get_xb(), 400 * D))
    _, f_ids = index.search(q, 5)
    _, rows = topk_inner_product(view, q, 5)
    np.testing.assert_array_equal(view_ids[rows], f_ids)


def test_flat_codes_view_keeps_the_index_alive():
    db = unit_vectors(50, 22)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    index.add_with_ids(db, np.arange(50, dtype=np.int64))
    view = flat_codes_view(index)
    del index
    np.testing.assert_array_equal(view, db)


def test_flat_codes_view_of_mmapped_index_reads_the_file(tmp_path):
    db = unit_vectors(64, 23)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    index.add_with_ids(db, np.arange(64, dtype=np.int64) + 100)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_MMAP_IFC
    mapped = faiss.read_index(str(tmp_path / "i.faiss"), flags)
    np.testing.assert_array_equal(flat_codes_view(mapped), db)
    np.testing.assert_array_equal(flat_ids(mapped), np.arange(64) + 100)


def test_empty_index_and_non_flat_index():
    assert flat_codes_view(faiss.IndexFlatIP(D)).shape == (0, D)
    with pytest.raises(ValueError):
        flat_codes_view(faiss.IndexHNSWFlat(D, 8))
