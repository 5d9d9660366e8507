"""The build pipeline with a deterministic fake embedder and real worker processes."""

import os
import shutil

import numpy as np
import pytest

from indexer.build import BuildSettings, Indexer
from indexer.embed import FakeEmbedder
from indexer.store import Store
from indexer.vectors import is_unit_rows
from indexer.workers import CRASH_HOOK, HANG_HOOK

from .conftest import scene


class CountingEmbedder(FakeEmbedder):
    """Counts model calls; returns NaN for images whose top-left pixel is pure magenta."""

    def __init__(self):
        super().__init__(dim=16)
        self.calls = 0

    def embed_pixels(self, batch):
        self.calls += len(batch)
        out = super().embed_pixels(batch)
        poison = np.isclose(batch[:, :, 0, 0], [0.5, -0.5, 0.5], atol=0.01).all(axis=1)
        out[poison] = np.nan
        return out


def _build(store_path, roots, emb=None, **kw):
    emb = emb or CountingEmbedder()
    settings = BuildSettings(workers=2, batch_size=4, **kw)
    with Store.create_or_open(store_path, emb.identity) as st:
        summary = Indexer(emb, st, settings).build(roots)
    return summary, emb


def _all_vectors(store_path):
    with Store.open(store_path) as st:
        return st.snapshot()


def test_build_embeds_every_image_once_and_records_corrupt_files(image_dir, store_path):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    summary, emb = _build(store_path, [str(image_dir)])
    assert summary.embedded == 8 and emb.calls == 8
    assert summary.failed == {"unidentified": 1} or summary.failed == {"corrupt": 1}
    with Store.open(store_path) as st:
        fails = dict(st.iter_failures())
        assert list(fails) == [str(image_dir / "broken.jpg")]
        assert st.counts()["vectors"] == 8


def test_rerun_on_unchanged_collection_embeds_nothing(image_dir, store_path):
    _build(store_path, [str(image_dir)])
    gen, ids, vecs = _all_vectors(store_path)
    summary, emb = _build(store_path, [str(image_dir)])
    assert emb.calls == 0 and summary.unchanged == 8
    gen2, ids2, vecs2 = _all_vectors(store_path)
    assert gen2 == gen and (ids2 == ids).all() and (vecs2 == vecs).all()


def test_new_file_costs_one_embedding_and_moved_file_costs_none(image_dir, store_path):
    _build(store_path, [str(image_dir)])
    scene(100).save(image_dir / "new.png")
    shutil.move(image_dir / "scene0.jpg", image_dir / "sub" / "moved.jpg")
    summary, emb = _build(store_path, [str(image_dir)], prune=True)
    assert emb.calls == 1
    assert summary.linked == 1 and summary.pruned == 1
    with Store.open(store_path) as st:
        assert str(image_dir / "scene0.jpg") not in set(st.iter_paths())
        assert st.counts()["vectors"] == 9


def test_same_bytes_twice_are_one_vector_with_two_paths(image_dir, store_path):
    shutil.copy(image_dir / "scene2.png", image_dir / "copy-of-2.png")
    _build(store_path, [str(image_dir)])
    with Store.open(store_path) as st:
        sha = st.sha_for_path(str(image_dir / "copy-of-2.png"))
        assert len(st.image(sha).paths) == 2
        assert st.counts()["vectors"] == 8


def test_nan_embedding_is_quarantined_and_never_stored(image_dir, store_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 0, 255)).save(image_dir / "poison.png")
    summary, _ = _build(store_path, [str(image_dir)])
    assert summary.failed == {"bad_embedding": 1}
    _, ids, vecs = _all_vectors(store_path)
    assert len(ids) == 8 and is_unit_rows(vecs)


def test_crashing_decoder_costs_only_its_own_file(image_dir, store_path, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK, "scene3")
    summary, _ = _build(store_path, [str(image_dir)], chunk=4)
    assert summary.failed == {"worker_crash": 1}
    assert summary.embedded == 7
    with Store.open(store_path) as st:
        (path, rec), = st.iter_failures()
        assert "scene3" in path and "died" in rec["message"]


def test_hanging_decoder_times_out_alone(image_dir, store_path, monkeypatch):
    monkeypatch.setenv(HANG_HOOK, "scene5")
    summary, _ = _build(store_path, [str(image_dir)], chunk=2, file_timeout=3.0)
    assert summary.failed == {"timeout": 1}
    assert summary.embedded == 7


def test_quarantined_unchanged_files_are_not_retried_unless_asked(image_dir, store_path):
    (image_dir / "bad.png").write_bytes(b"nope")
    _build(store_path, [str(image_dir)])
    summary, _ = _build(store_path, [str(image_dir)])
    assert not summary.failed and summary.unchanged == 9
    summary, _ = _build(store_path, [str(image_dir)], retry_failed=True)
    assert sum(summary.failed.values()) == 1


def test_settings_are_validated():
    with pytest.raises(ValueError):
        BuildSettings(batch_size=0)
    with pytest.raises(ValueError):
        BuildSettings(file_timeout=0)
    with pytest.raises(ValueError):
        BuildSettings(batch_size=16, min_batch=17)
    with pytest.raises(ValueError):
        BuildSettings(worker_nice=20)
    assert BuildSettings(batch_size=32).partial_batch == 8
    assert BuildSettings(batch_size=2).partial_batch == 1


def test_file_vanishing_mid_run_is_an_io_error(image_dir, store_path):
    from indexer.decode import DecodeLimits
    from indexer.types import ScanEntry
    from indexer.workers import WorkerConfig, process_file

    gone = ScanEntry(str(image_dir / "gone.png"), 10, 1)
    res = process_file(gone, WorkerConfig(FakeEmbedder().preprocess, DecodeLimits(), None),
                       lambda sha: False)
    assert res.reason == "io_error"
    assert not os.path.exists(gone.path)


class BatchRecorder(FakeEmbedder):
    def __init__(self):
        super().__init__(dim=16)
        self.sizes: list[int] = []

    def embed_pixels(self, batch):
        self.sizes.append(len(batch))
        return super().embed_pixels(batch)


@pytest.mark.parametrize(("min_batch", "expected"), [(4, [4, 3]), (32, [7])])
def test_model_takes_a_partial_batch_while_decoding_lags(tmp_path, store_path, monkeypatch,
                                                         min_batch, expected):
    """a0..a3 decode at once; b0 hangs in its worker until its deadline. With partial
    batches the model embeds a0..a3 meanwhile instead of waiting for a full batch (the chunk
    deadline is 4 x 1 s, then b0..b3 are retried one by one)."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i, name in enumerate(("a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3")):
        scene(300 + i).save(root / f"{name}.png")
    monkeypatch.setenv(HANG_HOOK, "b0.png")
    emb = BatchRecorder()
    settings = BuildSettings(workers=1, chunk=4, batch_size=32, min_batch=min_batch,
                             file_timeout=1.0)
    with Store.create_or_open(store_path, emb.identity) as st:
        summary = Indexer(emb, st, settings).build([str(root)])
    assert summary.embedded == 7 and summary.failed == {"timeout": 1}
    assert emb.sizes == expected
