"""FAISS index lifecycle: build, atomic publish, stale/corrupt detection, verify and repair."""

import os

import faiss
import numpy as np
import pytest

from indexer.errors import IndexError_
from indexer.store import Batch, Store
from indexer.types import ImageMeta, ScanEntry
from search.index import build_index, index_dir, load_index, open_index, read_pointer, save_index
from search.verify import verify


def _fill(store, n, start=0, dim=16):
    rng = np.random.default_rng(start)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = [(ScanEntry(f"/img/{start + i}.png", 1, 1),
              ImageMeta(f"sha{start + i}", 2, 2, "PNG", 1), vecs[i]) for i in range(n)]
    store.commit(Batch(embedded=items))
    return vecs


@pytest.fixture
def store(store_path, fake_embedder):
    s = Store.create_or_open(store_path, fake_embedder.identity)
    yield s
    s.close()


def test_built_index_finds_each_vector_as_its_own_neighbour(store):
    vecs = _fill(store, 50)
    vindex = build_index(store)
    scores, ids = vindex.search(vecs, 1)
    with_ids = [store.image_by_id(int(i)).sha256 for i in ids[:, 0]]
    assert with_ids == [f"sha{i}" for i in range(50)]
    np.testing.assert_allclose(scores[:, 0], 1, atol=1e-5)


def test_published_index_is_tagged_and_reloaded(store):
    _fill(store, 10)
    info = save_index(store, build_index(store))
    assert read_pointer(store).generation == store.generation() == info.generation
    assert load_index(store).ntotal == 10
    assert [f for f in os.listdir(index_dir(store)) if f.startswith(".tmp")] == []


def test_stale_index_is_rebuilt_on_open(store):
    _fill(store, 10)
    save_index(store, build_index(store))
    _fill(store, 5, start=100)
    vindex = open_index(store)
    assert vindex.ntotal == 15 and vindex.info.generation == store.generation()
    assert read_pointer(store).ntotal == 15  # the rebuilt index was published


def test_corrupt_index_is_reported_by_verify_and_repaired(store):
    _fill(store, 10)
    info = save_index(store, build_index(store))
    path = os.path.join(index_dir(store), info.file)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(IndexError_, match="corrupt or truncated"):
        load_index(store)
    report = verify(store)
    assert not report.ok and "corrupt" in report.problems[0]
    assert verify(store, repair=True).repaired
    assert verify(store).ok


def test_index_disagreeing_with_store_is_reported(store):
    _fill(store, 10)
    vindex = build_index(store)
    vindex.index.remove_ids(np.array([3], dtype=np.int64))
    save_index(store, vindex)
    report = verify(store)
    assert any("disagree" in p for p in report.problems)


def test_failed_index_write_leaves_previous_index_and_no_temp_file(store, monkeypatch):
    _fill(store, 10)
    save_index(store, build_index(store))
    _fill(store, 3, start=50)

    def disk_full(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(OSError):
        save_index(store, build_index(store))
    monkeypatch.undo()
    assert load_index(store).ntotal == 10
    assert [f for f in os.listdir(index_dir(store)) if f.startswith(".tmp")] == []


def test_ivf_index_trains_and_answers(store):
    vecs = _fill(store, 400)
    vindex = build_index(store, "IVF4,Flat")
    vindex.tune(nprobe=4)
    _, ids = vindex.search(vecs[:20], 1)
    assert (ids[:, 0] == np.arange(1, 21)).all()


def test_refine_index_gives_exact_scores_and_range_search_survives_reload(store):
    """IVF + 8-bit codes + exact re-rank (what `auto` picks above AUTO_FLAT_MAX): scores are
    exact inner products, not quantised ones, also for range search after a reload."""
    vecs = _fill(store, 600)
    save_index(store, build_index(store, "IVF8,SQ8,RFlat"))
    vindex = load_index(store)
    vindex.tune(nprobe=8)  # every list: the candidates are exhaustive, the order must be exact
    q = vecs[:30]
    scores, ids = vindex.search(q, 5)
    exact = q @ vecs.T
    want = np.argsort(-exact, axis=1)[:, :5] + 1  # store ids start at 1
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want - 1, axis=1), atol=1e-6)
    for i, (sc, got) in enumerate(vindex.range_search(q, 0.5)):
        expect = np.flatnonzero(exact[i] >= 0.5) + 1
        assert set(got.tolist()) == set(expect.tolist())
        np.testing.assert_allclose(sc, exact[i][got - 1], atol=1e-6)


def test_ivf_with_too_few_vectors_is_a_clear_error(store):
    _fill(store, 10)
    with pytest.raises(IndexError_, match="at least 64"):
        build_index(store, "IVF64,Flat")


def test_bad_factory_string_and_nan_query_are_refused(store):
    _fill(store, 4)
    with pytest.raises(IndexError_, match="bad --index-type"):
        build_index(store, "NotAnIndex")
    vindex = build_index(store)
    with pytest.raises(IndexError_, match="NaN"):
        vindex.search(np.full((1, 16), np.nan, np.float32), 3)
    with pytest.raises(IndexError_, match="dimension"):
        vindex.search(np.ones((1, 8), np.float32), 3)


def test_auto_picks_flat_for_small_and_ivf_for_large_collections(store):
    from search.index import AUTO_FLAT_MAX, choose_index_type

    assert choose_index_type(1000) == "Flat"
    assert choose_index_type(AUTO_FLAT_MAX + 1) == "IVF1024,SQ8,RFlat"
    assert choose_index_type(1_000_000) == "IVF2048,SQ8,RFlat"
    _fill(store, 20)
    info = save_index(store, build_index(store, "auto"))
    assert (info.index_type, info.requested, info.wanted) == ("Flat", "auto", "auto")


def test_flat_search_with_exact_kernel_matches_faiss_ids(store):
    vecs = _fill(store, 300)
    vindex = build_index(store, "Flat")
    q = vecs[:5] + 0.05
    scores, ids = vindex.search(q, 10)
    fs, fi = vindex.index.search(np.ascontiguousarray(q, np.float32), 10)
    assert (ids == fi).all()
    np.testing.assert_allclose(scores, fs, atol=1e-5)
    (rs, rids), = vindex.range_search(q[:1], float(fs[0, 3]) - 1e-6)
    assert list(rids[:4]) == list(fi[0, :4])
