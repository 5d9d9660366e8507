"""Searching and near-duplicate grouping on a store built with the fake embedder."""

import numpy as np
import pytest

from indexer.build import BuildSettings, Indexer
from indexer.store import Store
from search.dedup import near_duplicate_groups
from search.index import open_index
from search.query import Searcher

from .conftest import near_copy, scene


@pytest.fixture
def built(image_dir, store_path, fake_embedder):
    near_copy(scene(4)).save(image_dir / "scene4-reupload.jpg", quality=70)
    with Store.create_or_open(store_path, fake_embedder.identity) as st:
        Indexer(fake_embedder, st, BuildSettings(workers=1)).build([str(image_dir)])
    st = Store.open(store_path)
    yield st, Searcher(st, open_index(st), lambda: fake_embedder)
    st.close()


def test_unindexed_near_copy_finds_its_original_first(built, tmp_path, image_dir):
    _, searcher = built
    near_copy(scene(6)).save(tmp_path / "query.jpg")
    res = searcher.query("image", str(tmp_path / "query.jpg"), k=3)
    assert res.ok and res.hits[0].paths[0].endswith("scene6.jpg")
    assert res.hits[0].score > res.hits[1].score


def test_indexed_file_uses_its_stored_vector_without_the_model(built, image_dir):
    st, _ = built
    searcher = Searcher(st, open_index(st), embedder=None)  # no model available at all
    res = searcher.query("image", str(image_dir / "scene2.png"), k=2)
    assert res.ok and res.hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_stored_path_query_and_threshold(built, image_dir):
    _, searcher = built
    res = searcher.query("path", str(image_dir / "scene4.png"), k=5, threshold=0.9)
    assert [h.paths[0].rsplit("/", 1)[1] for h in res.hits][:2] == [
        "scene4.png", "scene4-reupload.jpg"]
    assert all(h.score >= 0.9 for h in res.hits)


def test_failed_query_is_reported_not_raised(built, tmp_path):
    _, searcher = built
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for kind, q in [("image", str(tmp_path / "bad.png")), ("image", "/no/such.png"),
                    ("path", "/not/indexed.png"), ("text", "  ")]:
        res = searcher.query(kind, q, k=3)
        assert not res.ok and res.error and not res.hits


def test_nan_query_embedding_is_refused(built, tmp_path, fake_embedder, monkeypatch):
    st, searcher = built
    monkeypatch.setattr(fake_embedder, "embed_texts",
                        lambda texts: np.full((1, 16), np.nan, np.float32))
    res = searcher.query("text", "anything", k=3)
    assert not res.ok and "refused" in res.error


def test_dedup_groups_the_reupload_with_its_original_only(built):
    st, searcher = built
    groups = near_duplicate_groups(st, searcher.index, threshold=0.97)
    assert len(groups) == 1
    names = sorted(m.paths[0].rsplit("/", 1)[1] for m in groups[0].members)
    assert names == ["scene4-reupload.jpg", "scene4.png"]
    assert groups[0].representative.score == pytest.approx(1.0, abs=1e-5)


def test_dedup_threshold_is_validated(built):
    st, searcher = built
    with pytest.raises(ValueError):
        near_duplicate_groups(st, searcher.index, threshold=1.5)
