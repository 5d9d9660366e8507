import numpy as np
import pytest

import indexer.store as store_mod
from indexer.embed import FakeEmbedder
from indexer.errors import ModelMismatchError, StoreError, StoreLockedError
from indexer.store import Batch, Store
from indexer.types import Failure, ImageMeta, ScanEntry


def _vec(seed, dim=16):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _item(path, sha, seed, size=10, mtime=1):
    return (ScanEntry(path, size, mtime), ImageMeta(sha, 4, 4, "PNG", size), _vec(seed))


@pytest.fixture
def store(store_path, fake_embedder):
    s = Store.create_or_open(store_path, fake_embedder.identity)
    yield s
    s.close()


def test_same_bytes_under_two_paths_stored_once(store):
    store.commit(Batch(embedded=[_item("/a.png", "s1", 1), _item("/b.png", "s1", 1)]))
    assert store.counts()["vectors"] == 1
    assert store.image("s1").paths == ("/a.png", "/b.png")


def test_reopen_keeps_committed_data_and_generation(store_path, fake_embedder):
    with Store.create_or_open(store_path, fake_embedder.identity) as s:
        s.commit(Batch(embedded=[_item("/a.png", "s1", 1)]))
        gen = s.generation()
    with Store.open(store_path) as s:
        assert s.generation() == gen == 1
        np.testing.assert_array_equal(s.vector(s.image("s1").id), _vec(1))


def test_changed_content_at_a_path_replaces_the_old_image(store):
    store.commit(Batch(embedded=[_item("/a.png", "old", 1)]))
    store.commit(Batch(embedded=[_item("/a.png", "new", 2, mtime=2)]))
    assert store.image("old") is None
    assert store.counts()["vectors"] == 1


def test_failure_unlinks_the_path_and_success_clears_the_failure(store):
    store.commit(Batch(embedded=[_item("/a.png", "s1", 1)]))
    store.commit(Batch(failures=[Failure("/a.png", "truncated", "cut", 5, 2)]))
    assert store.counts()["vectors"] == 0
    assert dict(store.iter_failures())["/a.png"]["reason"] == "truncated"
    store.commit(Batch(embedded=[_item("/a.png", "s2", 2, mtime=3)]))
    assert list(store.iter_failures()) == []


def test_unchanged_means_same_size_and_mtime(store):
    store.commit(Batch(embedded=[_item("/a.png", "s1", 1, size=10, mtime=5)]))
    assert store.is_unchanged(ScanEntry("/a.png", 10, 5))
    assert not store.is_unchanged(ScanEntry("/a.png", 10, 6))
    assert not store.is_unchanged(ScanEntry("/b.png", 10, 5))


def test_prune_forgets_vanished_paths_under_the_roots_only(store):
    store.commit(Batch(embedded=[_item("/r/a.png", "s1", 1), _item("/r/b.png", "s2", 2),
                                 _item("/other/c.png", "s3", 3)]))
    assert store.prune({"/r/a.png"}, ["/r"]) == 1
    assert sorted(store.iter_paths()) == ["/other/c.png", "/r/a.png"]
    assert store.counts()["vectors"] == 2


def test_map_full_grows_and_retries_the_whole_batch(store_path, fake_embedder, monkeypatch):
    monkeypatch.setattr(store_mod, "INITIAL_MAP_SIZE", 64 * 1024)
    with Store.create_or_open(store_path, fake_embedder.identity) as s:
        before = s.env.info()["map_size"]
        items = [_item(f"/p{i}.png", f"sha{i}", i) for i in range(2000)]
        s.commit(Batch(embedded=items))
        assert s.env.info()["map_size"] > before
        assert s.counts()["vectors"] == 2000
        assert s.generation() == 1  # one batch, one transaction, counted once


def test_second_writer_fails_clearly(store_path, fake_embedder, store):
    with pytest.raises(StoreLockedError, match="another clipdex process"):
        Store.create_or_open(store_path, fake_embedder.identity)


def test_readers_open_while_a_writer_holds_the_lock(store_path, store):
    import subprocess
    import sys

    store.commit(Batch(embedded=[_item("/a.png", "s1", 1)]))
    code = ("import sys; from indexer.store import Store; s = Store.open(sys.argv[1]); "
            "print(s.counts()['vectors'])")
    out = subprocess.run([sys.executable, "-c", code, store_path], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1"


def test_other_model_is_refused_with_the_differences(store_path, store):
    store.close()
    with pytest.raises(ModelMismatchError, match="dim: 16 != 8"):
        Store.create_or_open(store_path, FakeEmbedder(dim=8).identity)


def test_network_filesystem_is_refused(store_path, fake_embedder, monkeypatch):
    monkeypatch.setattr(store_mod, "filesystem_type", lambda path: "nfs4")
    with pytest.raises(StoreError, match="network filesystem"):
        Store.create_or_open(store_path, fake_embedder.identity)


def test_newer_schema_is_refused(store_path, store):
    store._write(lambda txn: txn.put(b"schema_version", b"99", db=store._db["meta"]))
    store.close()
    with pytest.raises(StoreError, match="newer"):
        Store._open(store_path, readonly=False, wait=0)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="index build"):
        Store.open(str(tmp_path / "nothing"))
